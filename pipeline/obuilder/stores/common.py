"""What the stores share: the on-disk layout, running tools, checking the filesystem, and
`DirectoryStore`, the `Store` protocol written once over a backend's primitives (make an empty
directory, make a writable copy of one, remove one, commit a finished build).

Layout of a store rooted at ROOT (OBuilder's):

    ROOT/result/ID/        committed results (`rootfs/`, `log`, ...), never modified
    ROOT/result-tmp/ID/    builds in progress; committed by renaming into result/
    ROOT/cache/NAME/       the latest released version of each named cache
    ROOT/cache-tmp/TOKEN-N-NAME/  cache copies in use
    ROOT/state/            the state directory (`Store.state_dir`): the result database
                           (db.sqlite) and other bookkeeping
    ROOT/state/lock/       the locks several processes sharing the store take (`locks.py`):
                           `step/ID` per step, `cache/NAME` per named cache
    ROOT/state/owner/      one lock per live process using the store (`locks.Owner`)

These five directories (and any a backend adds beside them) are private: mode 0700, set when the
store is opened even if they already exist with a wider mode. Images may hold setuid-root
binaries and device nodes, kept as they are for the sandbox; no other host user must be able to
reach them through the store (`ROOT` itself may be world-accessible).

Everything under the two -tmp directories is temporary. Several processes may use one store at
once: a build in `result-tmp/ID` belongs to whoever holds the lock of step ID, a cache copy
`cache-tmp/TOKEN-N-NAME` to the live owner TOKEN, and `clean()` (run before a builder's first
step) removes only what nobody holds, i.e. what crashed processes left. Commits are renames, so a
process killed at any point leaves a result complete or absent; nothing is synced to disk, so
after a power failure a committed result may lack data the filesystem had not yet written.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import os
import re
import shutil
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.obuilder.locks import FileLock, LockDir, Owner, if_free, is_live_owner
from pipeline.obuilder.protocols import STATE_DIR, BuildError, DiskUsage, MissingTool

RESULT = "result"
RESULT_TMP = "result-tmp"
CACHE = "cache"
CACHE_TMP = "cache-tmp"
LOCK = "lock"
OWNER = "owner"
# The mode of the layout's directories (see above).
PRIVATE = 0o700

# The Debian package providing each tool a store runs.
PACKAGES = {"btrfs": "btrfs-progs", "rsync": "rsync", "cp": "coreutils", "tar": "tar"}


def require(tool: str) -> None:
    """Raise MissingTool, naming the Debian package to install, if `tool` is not on PATH."""
    if shutil.which(tool) is None:
        raise MissingTool(f"{tool} not found: apt-get install {PACKAGES[tool]}")


async def run(*argv: str | Path) -> None:
    """Run a command to completion, its output discarded.

    Raises MissingTool if the program does not exist, BuildError (with the command's stderr) if
    it exits non-zero, raised from an OSError (ENOSPC or EDQUOT) if the stderr says the disk is
    full. Cancelling the caller kills the command before the cancellation goes on.
    """
    args = [str(a) for a in argv]
    try:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise MissingTool(f"{args[0]} not found: apt-get install {PACKAGES[args[0]]}") from None
    _, stderr = await communicate(process)
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip().replace("\n", "; ")
        raise failure(f"{' '.join(args)} failed (exit status {process.returncode})", message)


async def communicate(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """`process.communicate()`, killing the process first if the caller is cancelled: a tool
    left running would keep writing where its caller is about to clean up."""
    try:
        return await process.communicate()
    except asyncio.CancelledError:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise


def failure(what: str, message: str) -> BuildError:
    """The error of a tool that failed: `what: message`, where `message` is what the tool said.
    If it says that the disk is full, the error's cause is an OSError (ENOSPC or EDQUOT), so
    that callers say which store is full and how to free space (see `full_store.is_disk_full`)."""
    error = BuildError(f"{what}: {message}")
    full = [OSError(code, os.strerror(code)) for code in (errno.ENOSPC, errno.EDQUOT)
            if os.strerror(code) in message]
    if full:
        error.__cause__ = full[0]
    return error


def _unescape_mount_point(text: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def filesystem_type(path: Path) -> str:
    """The type (`btrfs`, `xfs`, `ext4`, `tmpfs`, ...) of the filesystem `path` is (or would
    be, if it does not exist yet) on, from the mount with the longest mount point above it."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = _unescape_mount_point(fields[4])
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            # `>=`: a later mount on the same mount point hides the earlier one.
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fields[fields.index("-") + 1]
    return kind


def how_to_create(root: Path, mkfs: str) -> str:
    """Advice for making a suitable filesystem at `root` with the command `mkfs`."""
    return (f"create one with: truncate -s 10G img && {mkfs} img && mkdir -p {root} && "
            f"mount -o loop img {root}")


def require_filesystem(root: Path, kind: str, store: str, mkfs: str) -> None:
    """Raise BuildError if `root` is not on a `kind` filesystem; the message shows how to make
    one on a loop-mounted image with the command `mkfs`."""
    found = filesystem_type(root)
    if found != kind:
        raise BuildError(f"the {store} store needs a {kind} filesystem but {root} is on "
                         f"{found}; {how_to_create(root, mkfs)}")


def check_name(what: str, name: str) -> str:
    """Return `name` if it can be used as one directory entry; raise BuildError otherwise."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise BuildError(f"invalid {what} {name!r}: it must be a plain file name")
    return name


@functools.cache
def _renameat2() -> Callable[..., int]:
    # ctypes is imported when first needed (releasing a cache copy), not by every command.
    import ctypes

    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    return renameat2


def exchange(a: Path, b: Path) -> None:
    """Swap the directory entries `a` and `b` in one step (renameat2 RENAME_EXCHANGE), so a
    reader, or a crash, sees either the old pair or the new one. Raises OSError on failure."""
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2()(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        import ctypes  # loaded by `_renameat2` already

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


@dataclass
class CacheState:
    """In-memory state of one named cache. `lock` serialises taking and releasing copies in
    this process (the store's cache lock does so across processes); `generation` changes when
    the cache is deleted by this process, so copies taken before are discarded."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = 0


STAGING = ".staging"
"""The suffix of a backend's second temporary directory for build ID: `result-tmp/ID.staging`."""
DELETED = ".deleted-"
"""The prefix of a result being removed: `result-tmp/.deleted-ID`."""


def step_of(leftover: str) -> str:
    """The step id a `result-tmp` entry belongs to: `ID`, `ID.staging` or `.deleted-ID`."""
    return leftover.removeprefix(DELETED).removesuffix(STAGING)


def _run_in_reverse(callbacks: list[Callable[[], None]]) -> None:
    for callback in reversed(callbacks):
        callback()


class DirectoryStore(ABC):
    """The `Store` protocol over the layout above. A backend subclasses it, names its `kind`
    and provides `_copy`, and may override `_create`, `_remove` and `_commit`.

    Several processes may share `root` (see the module's documentation); each should `close`
    its store when done (or it is closed at exit).
    """

    layout: tuple[str, ...] = (RESULT, RESULT_TMP, CACHE, CACHE_TMP, STATE_DIR)
    """The directories under `root`; a backend keeping its caches elsewhere leaves out `cache`
    and `cache-tmp` (and overrides the cache methods and `clean`)."""

    def __init__(self, root: Path) -> None:
        """Create the layout under `root` (and `root` itself) if missing, make it private, and
        claim a token for this process's cache copies."""
        self.root = root
        self.state_dir = root / STATE_DIR
        for name in self.layout:
            (root / name).mkdir(mode=PRIVATE, parents=True, exist_ok=True)
            os.chmod(root / name, PRIVATE)
        self._caches: dict[str, CacheState] = {}
        self._copies = itertools.count()
        self._step_locks = LockDir(self.state_dir / LOCK / "step")
        self._cache_locks = LockDir(self.state_dir / LOCK / "cache")
        self._owners = self.state_dir / OWNER
        self._owner = Owner(self._owners)
        # What `close` does, last added first; run at exit too, should nobody call `close`.
        # (Callables that do not refer to the store, or it would never be collected.)
        self._on_close: list[Callable[[], None]] = [self._owner.release]
        self._finalizer = weakref.finalize(self, _run_in_reverse, self._on_close)

    @property
    @abstractmethod
    def kind(self) -> str:
        """See `Store.kind`."""

    # Backend primitives.

    async def _create(self, path: Path) -> None:
        """Make `path` an empty, writable directory."""
        path.mkdir()

    @abstractmethod
    async def _copy(self, src: Path, dst: Path) -> None:
        """Make `dst` (which does not exist) a writable copy of directory `src`, preserving
        ownership, modes, times, links and extended attributes. Writing to `dst` must never
        change `src`. Raises BuildError on failure, possibly leaving a partial `dst`."""

    async def _remove(self, path: Path) -> None:
        """Remove the directory `path` (made by `_create` or `_copy`) and all it holds."""
        await asyncio.to_thread(shutil.rmtree, path)

    async def _commit(self, tmp: Path, dst: Path, base: Path | None) -> None:
        """Turn the finished build `tmp` (a copy of `base`, if any) into the result `dst`,
        atomically: `dst` appears complete or not at all."""
        tmp.rename(dst)

    # Paths.

    def _result(self, id: str) -> Path:
        return self.root / RESULT / check_name("result id", id)

    def _result_tmp(self, id: str) -> Path:
        return self.root / RESULT_TMP / check_name("result id", id)

    async def _remove_if_present(self, path: Path) -> None:
        if os.path.lexists(path):
            await self._remove(path)

    # The Store protocol.

    def lock(self, id: str, *, shared: bool = False) -> FileLock:
        """See `Store.lock`: `ROOT/state/lock/step/ID`."""
        return self._step_locks.lock(check_name("result id", id), shared=shared)

    def close(self) -> None:
        """See `Store.close`."""
        self._finalizer()

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """See `Store.build` (the caller holds `lock(id)`). Raises BuildError if `base` has no
        result; whatever `fn` raises (cancellation included) propagates after the temporary
        copy is removed."""
        tmp = self._result_tmp(id)
        base_dir = None if base is None else self._result(base)
        if base_dir is not None and not base_dir.is_dir():
            raise BuildError(f"cannot build {id}: its base result {base} does not exist")
        # A leftover of an earlier process that crashed building the same step, not yet cleaned.
        await self._remove_if_present(tmp)
        try:
            if base_dir is None:
                await self._create(tmp)
            else:
                await self._copy(base_dir, tmp)
            await fn(tmp)
            await self._commit(tmp, self._result(id), base_dir)
        except BaseException:
            await self._remove_if_present(tmp)
            raise

    async def result(self, id: str) -> Path | None:
        """See `Store.result`."""
        path = self._result(id)
        return path if path.is_dir() else None

    async def has_result(self, id: str) -> bool:
        """See `Store.has_result`: whether `ROOT/result/ID` exists."""
        return self._result(id).is_dir()

    async def results(self) -> list[str]:
        """See `Store.results`: the entries of `ROOT/result/`."""
        return sorted(await asyncio.to_thread(os.listdir, self.root / RESULT))

    async def mark_used(self, ids: Iterable[str]) -> None:
        """See `Store.mark_used`: the directory stores keep no record of use."""
        return

    async def delete(self, id: str) -> None:
        """See `Store.delete`. Raises BuildError if the removal fails."""
        await self._remove_if_present(self._result(id))

    def log_file(self, id: str) -> Path:
        """See `Store.log_file`: `ROOT/result/ID/log`."""
        return self._result(id) / "log"

    @asynccontextmanager
    async def cache(self, name: str, uid: int, gid: int) -> AsyncIterator[Path]:
        """See `Store.cache`. The copy is `ROOT/cache-tmp/TOKEN-N-NAME`; releasing it swaps it
        with `ROOT/cache/NAME` in one rename, then removes the old version. Taking and
        releasing hold the cache's lock (`ROOT/state/lock/cache/NAME`), so processes sharing
        the store take turns. Raises BuildError if the copy cannot be made (nothing is left
        behind)."""
        check_name("cache name", name)
        state = self._caches.setdefault(name, CacheState())
        shared = self.root / CACHE / name
        copy = self.root / CACHE_TMP / f"{self._owner.token}-{next(self._copies)}-{name}"
        async with state.lock, self._cache_locks.lock(name):
            if not shared.exists():
                await self._create(shared)
                os.chown(shared, uid, gid)
            generation = state.generation
            try:
                await self._copy(shared, copy)
            except BaseException:
                await self._remove_if_present(copy)
                raise
        try:
            yield copy
        except BaseException:
            await self._remove(copy)
            raise
        try:
            async with state.lock, self._cache_locks.lock(name):
                # Last writer wins: whoever releases later replaces what an earlier release
                # left, unless the cache was deleted since this copy was taken.
                if state.generation == generation:
                    exchange(copy, shared)
        finally:
            # Now the replaced version, or the discarded copy.
            await self._remove(copy)

    async def delete_cache(self, name: str) -> None:
        """See `Store.delete_cache`. Raises BuildError if the removal fails."""
        state = self._caches.setdefault(check_name("cache name", name), CacheState())
        async with state.lock, self._cache_locks.lock(name):
            state.generation += 1
            await self._remove_if_present(self.root / CACHE / name)

    async def df(self) -> DiskUsage:
        """See `Store.df`: the filesystem holding `root`, as statvfs reports it."""
        stats = os.statvfs(self.root)
        return DiskUsage(total=stats.f_blocks * stats.f_frsize,
                         free=stats.f_bavail * stats.f_frsize)

    async def clean(self) -> None:
        """See `Store.clean`: removes the builds under `result-tmp/` whose step lock is free
        and the copies under `cache-tmp/` whose owner has gone. Raises BuildError if a removal
        fails."""
        await self._clean_builds()
        for leftover in sorted((self.root / CACHE_TMP).iterdir()):
            if not is_live_owner(self._owners, leftover.name):
                await self._remove_if_present(leftover)

    async def _clean_builds(self) -> None:
        """Remove the builds under `result-tmp/` whose step lock is free."""
        for leftover in sorted((self.root / RESULT_TMP).iterdir()):
            with if_free(self.lock(step_of(leftover.name))) as free:
                if free:
                    await self._remove_if_present(leftover)
