"""Fakes of the builder's protocols (`pipeline/obuilder/protocols.py`), as OBuilder's
mock_store and mock_sandbox: fast, needing no root, no runc, no mounts and no special
filesystem, for testing the builder's own rules (sharing, cancellation, failures, caching).

- `FakeStore`: a `Store` whose results are plain directories under a temporary directory (the
  protocol hands out paths, so results must be real directories) and whose bookkeeping is in
  memory: it counts builds, records uses, and checks the promises its callers make (holding the
  step's lock, never building an id twice, building on an existing base).
- `ScriptedSandbox`: a `Sandbox` running no process: each command (the last word of its argv,
  the shell text of a `run` step) does what the test scripted with a `Command`.
- `FakeFetcher`: a `Fetcher` making a tiny rootfs for every image it knows.

The real backends are tested against the same protocols in test_stores.py, test_runc.py and
test_builder.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.obuilder.locks import FileLock, LockDir, if_free
from pipeline.obuilder.protocols import (
    STATE_DIR,
    BuildError,
    DiskUsage,
    ImageInfo,
    Log,
    SandboxConfig,
)

ROOMY = DiskUsage(total=100 * 2**30, free=50 * 2**30)
"""A store with plenty of space left."""


class FakeStore:
    """A `Store` under `root` (an existing, empty directory); see the module's documentation.

    `builds` counts the builds of each id that committed, `used` lists the ids `mark_used` was
    told of, `cache_owners` the `uid:gid` each named cache was created with, and `usage` is what
    `df` reports (set it to make the store look full).
    """

    kind = "fake"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / STATE_DIR
        self.state_dir.mkdir(mode=0o700)
        (root / "result").mkdir()
        (root / "tmp").mkdir()
        self.builds: Counter[str] = Counter()
        self.used: list[str] = []
        self.cache_owners: dict[str, tuple[int, int]] = {}
        self.usage = ROOMY
        self.closed = False
        self._locks = LockDir(self.state_dir / "lock")
        self._caches: dict[str, Path] = {}
        self._cache_copies = 0

    def _result(self, id: str) -> Path:
        return self.root / "result" / id

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """See `Store.build`. Raises AssertionError if the caller breaks a promise."""
        with if_free(self.lock(id)) as free:
            assert not free, f"building {id} without holding its lock"
        assert not self._result(id).exists(), f"building {id}, which exists already"
        tmp = self.root / "tmp" / id
        if base is None:
            tmp.mkdir()
        else:
            assert self._result(base).is_dir(), f"building {id} on {base}, which does not exist"
            await asyncio.to_thread(shutil.copytree, self._result(base), tmp, symlinks=True)
        try:
            await fn(tmp)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp)
            raise
        tmp.rename(self._result(id))
        self.builds[id] += 1

    def lock(self, id: str, *, shared: bool = False) -> FileLock:
        """See `Store.lock`: real file locks, which need no privilege."""
        return self._locks.lock(id, shared=shared)

    async def result(self, id: str) -> Path | None:
        """See `Store.result`."""
        path = self._result(id)
        return path if path.is_dir() else None

    async def has_result(self, id: str) -> bool:
        """See `Store.has_result`."""
        return self._result(id).is_dir()

    async def results(self) -> list[str]:
        """See `Store.results`."""
        return sorted(path.name for path in (self.root / "result").iterdir())

    async def mark_used(self, ids: Iterable[str]) -> None:
        """See `Store.mark_used`: appended to `used`."""
        self.used.extend(ids)

    async def delete(self, id: str) -> None:
        """See `Store.delete`."""
        if self._result(id).exists():
            await asyncio.to_thread(shutil.rmtree, self._result(id))

    def log_file(self, id: str) -> Path:
        """See `Store.log_file`."""
        return self._result(id) / "log"

    @asynccontextmanager
    async def cache(self, name: str, uid: int, gid: int) -> AsyncIterator[Path]:
        """See `Store.cache`: ownership is recorded in `cache_owners`, not given to files."""
        if name not in self._caches:
            self._caches[name] = self.root / f"cache-{name}"
            self._caches[name].mkdir()
            self.cache_owners[name] = (uid, gid)
        shared = self._caches[name]
        self._cache_copies += 1
        copy = self.root / "tmp" / f"cache-{self._cache_copies}-{name}"
        await asyncio.to_thread(shutil.copytree, shared, copy, symlinks=True)
        try:
            yield copy
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, copy)
            raise
        if self._caches.get(name) is shared:
            # Last writer wins.
            await asyncio.to_thread(shutil.rmtree, shared)
            copy.rename(shared)
        else:
            # Deleted since the copy was taken.
            await asyncio.to_thread(shutil.rmtree, copy)

    def cache_files(self, name: str) -> dict[str, str]:
        """The files of the named cache as last released (a test's view, not the protocol's)."""
        shared = self._caches[name]
        return {path.name: path.read_text() for path in shared.iterdir()}

    async def delete_cache(self, name: str) -> None:
        """See `Store.delete_cache`."""
        shared = self._caches.pop(name, None)
        if shared is not None:
            await asyncio.to_thread(shutil.rmtree, shared)

    async def df(self) -> DiskUsage:
        """See `Store.df`: `usage`."""
        return self.usage

    async def clean(self) -> None:
        """See `Store.clean`: a fake store is never shared with a crashed process."""
        return

    def close(self) -> None:
        """See `Store.close`."""
        self.closed = True


@dataclass
class Command:
    """What a scripted command does each time it runs, in order: writes `output` to the log,
    writes `files` (paths relative to the rootfs) and calls `effect(config, rootfs)` if given,
    then waits for `release()` if `blocked`, then exits with `exit_status`.

    While blocked it can be cancelled (the `cancelled` event, or cancelling the task); a
    cancelled run counts in `cancellations`, sets `killed` and, if `dies_slowly`, ends only once
    `let_die()` is called, like a process slow to exit after being killed. `started` is set
    when a run begins; `runs` counts them.
    """

    output: bytes = b""
    files: Mapping[str, str] = field(default_factory=dict)
    effect: Callable[[SandboxConfig, Path], None] | None = None
    exit_status: int = 0
    blocked: bool = False
    dies_slowly: bool = False
    runs: int = 0
    cancellations: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _dead: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Let blocked runs go on to exit."""
        self._released.set()

    def let_die(self) -> None:
        """Let cancelled runs end."""
        self._dead.set()

    async def wait_until_released(self, cancelled: asyncio.Event | None) -> None:
        """Wait for `release()`; raise CancelledError once `cancelled` is set or the task is
        cancelled (after `let_die()` if the command dies slowly)."""
        waits = [asyncio.ensure_future(self._released.wait())]
        if cancelled is not None:
            waits.append(asyncio.ensure_future(cancelled.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not self._released.is_set():
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            self.cancellations += 1
            self.killed.set()
            if self.dies_slowly:
                await asyncio.shield(self._dead.wait())
            raise
        finally:
            for wait in waits:
                wait.cancel()


class ScriptedSandbox:
    """A `Sandbox` in which each command does what `script` said (see `Command`); running a
    command never scripted raises AssertionError. `configs` lists every config run, in order."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}
        self.configs: list[SandboxConfig] = []
        self.closed = False

    def script(self, shell: str, command: Command | None = None) -> Command:
        """Make the command whose shell text is `shell` do what `command` (default: nothing,
        successfully) says; returns it, for the test to watch and steer."""
        self.commands[shell] = command or Command()
        return self.commands[shell]

    async def run(
        self,
        config: SandboxConfig,
        rootfs: Path,
        *,
        log: Log,
        stdin: bytes | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        """See `Sandbox.run`."""
        shell = config.argv[-1]
        command = self.commands.get(shell)
        assert command is not None, f"unexpected command {shell!r}"
        self.configs.append(config)
        command.runs += 1
        command.started.set()
        log.write(command.output)
        for name, text in command.files.items():
            path = rootfs / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if command.effect is not None:
            command.effect(config, rootfs)
        if command.blocked:
            await command.wait_until_released(cancelled)
        if command.exit_status != 0:
            raise BuildError(f"command exited with status {command.exit_status}")

    async def clean(self) -> None:
        """See `Sandbox.clean`: nothing ever outlives a fake run."""
        return

    def close(self) -> None:
        """See `Sandbox.close`."""
        self.closed = True


class FakeFetcher:
    """A `Fetcher` knowing the images of `images` (reference -> environment): each becomes a
    rootfs holding `/etc/passwd` with root and `opam` (uid 1000). `fetches` counts them."""

    def __init__(self, images: Mapping[str, Mapping[str, str]]) -> None:
        self.images = images
        self.fetches: Counter[str] = Counter()

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """See `Fetcher.fetch`."""
        if image not in self.images:
            raise BuildError(f"unknown image {image!r}")
        self.fetches[image] += 1
        (rootfs / "etc").mkdir()
        (rootfs / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nopam:x:1000:1000::/home/opam:/bin/sh\n")
        log.write(f"made {image}\n".encode())
        return ImageInfo(env=self.images[image], digest=f"sha256:{image}")
