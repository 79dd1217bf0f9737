"""A store on overlayfs (OBuilder's `overlayfs_store`): each result keeps only what its step
changed, as an overlayfs upper layer over the layers of the results beneath it.

Layout under ROOT, besides the directory stores' (`common.py`):

    ROOT/result/ID/      the result as the builder sees it: `rootfs/` (an empty directory, the
                         mount point of the merged view, see below), `log` and whatever else the
                         builder wrote beside `rootfs`
    ROOT/layer/ID/       its layer: `diff/` (an overlayfs upper directory: the files the step
                         changed, whiteouts for those it deleted, opaque directories for those it
                         replaced) and `lower` (the ids of the layers beneath, parent first, one
                         a line; empty for a bottom layer)
    ROOT/view/ID/        `upper/` and `work/` of the merged view of result ID
    ROOT/result-tmp/ID/  a build in progress (the `tmpdir` given to `fn`)
    ROOT/layer-tmp/ID/   that build's overlayfs upper and work directories

`layer`, `layer-tmp` and `view` are private (0700) like the directory stores' own.

**Build.** On base B, `tmpdir` gets a copy of B's result directory except `rootfs`, and
`tmpdir/rootfs` is an overlay mount: lower directories B's layer and those beneath it (newest
first), upper and work directories fresh in `layer-tmp/ID`. With no base there is no mount:
`tmpdir` is empty, as the protocol says, and whatever `fn` leaves in `tmpdir/rootfs` becomes a
bottom layer. On success the overlay is unmounted, the layer is renamed into `layer/ID` and then
`tmpdir` into `result/ID`: that last rename is the commit. On failure both are removed.

**Mount options.** The kernel takes at most one page of mount options and *silently truncates*
longer ones (a truncated lowerdir list still mounts, without its last layers and without its
upper directory). So `mount` runs in `ROOT/layer` and names layers relatively (`ID/diff`), and a
build whose base is `MAX_DEPTH` layers deep, or whose options would not fit, is *flattened*: its
rootfs starts as a plain copy of the base's merged view and becomes a bottom layer. That copy
costs time in proportion to the rootfs, once every `MAX_DEPTH` steps at most.

**Views.** `result(id)` mounts, on first use, the merged view of result `id` at
`result/ID/rootfs`: an overlay of its layers under a scratch upper directory in `view/ID`. It is
writable so that a sandbox can run there as in any other store (runc creates mount points), but
what is written there lands in the scratch directory, never in a layer: no build on `id` sees
it. Mounting one takes a few milliseconds. Every process using a view holds a shared lock on it
(`state/lock/view/ID`) until it closes the store (or exits): the last one to let go unmounts it,
so a process that exits normally leaves nothing mounted. Mounting and unmounting a view happen
under `state/lock/view-mount/ID`.

**Crashes and other processes.** `clean()` (before a builder's first step) unmounts and removes
what crashed processes left: builds under the two `-tmp` directories whose step lock is free, views
nobody holds, and layers and views whose result does not exist (left by a crash between the two
renames of a commit, or in the middle of a deletion). What a live process holds is left alone.

**Caches** are the directory stores' own: plain directories copied with `cp -a`, swapped into
place atomically on release.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from pipeline.obuilder.locks import FileLock, LockDir, if_free
from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.stores.common import (
    DELETED,
    LOCK,
    PRIVATE,
    RESULT,
    RESULT_TMP,
    DirectoryStore,
    check_name,
    filesystem_type,
    how_to_create,
    require,
    run,
    step_of,
)

LAYER = "layer"
LAYER_TMP = "layer-tmp"
VIEW = "view"

# Layers in a stack before a build is flattened. Each layer of a stack costs a lookup on every
# miss (a PATH search tries each layer), so deep stacks slow builds down; 40 layers named by
# 64-digit ids take under 3 KiB of mount options.
MAX_DEPTH = 40

# Filesystems on which overlayfs can keep an upper layer (it needs trusted.* extended
# attributes and d_type): the ones the store's error message suggests, and the other common
# local ones.
_UPPER_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs", "tmpfs", "f2fs")

# The same layers whatever the kernel's defaults. With metacopy or redirect_dir a layer can hold
# files that mean something only when read with the same feature on (a metadata-only copy-up
# has no data of its own); with both off a layer is plain files, whiteouts and opaque
# directories. index=on would tie each upper directory to the lower layers it was first
# mounted over, and nothing here needs its hard-link bookkeeping.
_FEATURES = "index=off,metacopy=off,redirect_dir=off"


class OverlayfsStore(DirectoryStore):
    """Results as overlayfs layers under `root`; see the module's documentation.

    Raises MissingTool if cp is missing, BuildError (saying how to make a suitable one) if
    `root` is on a filesystem that cannot hold overlayfs upper layers.
    """

    kind = "overlayfs"

    def __init__(self, root: Path) -> None:
        require("cp")
        found = filesystem_type(root)
        if found not in _UPPER_FILESYSTEMS:
            raise BuildError(
                f"the overlayfs store needs ext4, xfs, btrfs or tmpfs, but {root} is on {found}; "
                f"{how_to_create(root, 'mkfs.ext4 -q')} (or mount a tmpfs there: mount -t tmpfs "
                f"-o size=10g tmpfs {root})")
        super().__init__(root)
        for name in (LAYER, LAYER_TMP, VIEW):
            (root / name).mkdir(mode=PRIVATE, exist_ok=True)
            os.chmod(root / name, PRIVATE)
        self._layers = root / LAYER
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        # Serialises mounting views in this process (the view-mount locks do across processes).
        self._views_lock = asyncio.Lock()
        self._views = _Views(root, self.state_dir)
        self._on_close.append(self._views.close)

    async def _copy(self, src: Path, dst: Path) -> None:
        # Used only for cache copies: results are layers (see `build`).
        await run("cp", "-a", "--no-target-directory", src, dst)

    # Paths. Ids become directory names, relative paths in mount options (where `:`, `,` and `\`
    # are separators or escapes) and lines of `lower` files; a leading `.` marks this store's
    # own trash.

    def _check_id(self, id: str) -> str:
        check_name("result id", id)
        if id.startswith(".") or any(c in id for c in ":,\\\n"):
            raise BuildError(f"invalid result id {id!r}: it cannot start with '.' nor "
                             f"contain ':', ',', '\\' or a newline")
        return id

    def _result(self, id: str) -> Path:
        return self.root / RESULT / self._check_id(id)

    def _result_tmp(self, id: str) -> Path:
        return self.root / RESULT_TMP / self._check_id(id)

    def _layer_tmp(self, id: str) -> Path:
        return self.root / LAYER_TMP / self._check_id(id)

    def _options(self, lowers: list[str], upper: str | None = None,
                 work: str | None = None) -> str:
        """Mount options for an overlay of the directories `lowers` (newest first), paths
        relative to `ROOT/layer`; read-only without `upper`."""
        options = "lowerdir=" + ":".join(lowers)
        if upper is not None:
            options += f",upperdir={upper},workdir={work}"
        return f"{options},{_FEATURES}"

    def _build_options(self, id: str, chain: list[str]) -> str:
        return self._options(_diffs(chain), f"../{LAYER_TMP}/{id}/diff",
                             f"../{LAYER_TMP}/{id}/work")

    def _view_options(self, id: str, chain: list[str]) -> str:
        return self._options(_diffs(chain), f"../{VIEW}/{id}/upper", f"../{VIEW}/{id}/work")

    def _fits(self, options: str) -> bool:
        # The kernel copies one page, which must hold the terminating NUL.
        return len(options.encode()) < self._page_size

    def _chain(self, id: str) -> list[str]:
        """`id` and the ids of the layers beneath it, newest first. Raises BuildError if
        result `id` or one of those layers is missing."""
        if not self._result(id).is_dir():
            raise BuildError(f"result {id} does not exist")
        try:
            lower = (self._layers / id / "lower").read_text().splitlines()
        except FileNotFoundError:
            raise BuildError(f"result {id} has no layer in {self._layers} (the store is "
                             f"damaged: delete {id})") from None
        for below in lower:
            if not (self._layers / below / "diff").is_dir():
                raise BuildError(f"result {id} is built on {below}, which was deleted: delete "
                                 f"{id} too (and rebuild it)")
        return [id, *lower]

    # Mounting.

    async def _mount(self, options: str, target: Path) -> None:
        """Mount an overlay with `options` (relative to `ROOT/layer`) at `target`. Raises
        BuildError with mount's message on failure."""
        if not self._fits(options):
            # Builds flatten long chains before getting here; this catches what they cannot
            # foresee (odd ids), which the kernel would not: it truncates silently.
            raise BuildError(f"overlayfs mount options for {target} exceed one page "
                             f"({len(options)} bytes): use shorter result ids")
        process = await asyncio.create_subprocess_exec(
            # An absolute target: mount runs in ROOT/layer.
            "mount", "-t", "overlay", "overlay", "-o", options, os.path.abspath(target),
            cwd=self._layers, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        # Not killed on cancellation: a half-done mount(2) cannot be interrupted anyway, and
        # whoever cleans up after the cancellation unmounts what it left.
        _, stderr = await process.communicate()
        if process.returncode != 0:
            message = stderr.decode(errors="replace").strip().replace("\n", "; ")
            raise BuildError(f"cannot mount overlayfs at {target}: {message}")

    async def _unmount_all(self, target: Path) -> None:
        """Detach whatever is mounted at `target`, even if busy (lazy unmount). Raises
        BuildError if umount fails."""
        while await asyncio.to_thread(os.path.ismount, target):
            await run("umount", "--lazy", target)

    # The Store protocol.

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """See `Store.build`. Raises BuildError if `base` has no result (or a layer beneath it
        is missing) or if mounting fails; whatever `fn` raises (cancellation included)
        propagates after the temporary directories are unmounted and removed."""
        tmp = self._result_tmp(id)
        chain = [] if base is None else await asyncio.to_thread(self._chain, base)
        flatten = bool(chain) and (
            len(chain) >= MAX_DEPTH
            or not self._fits(self._build_options(id, chain))
            or not self._fits(self._view_options(id, [id, *chain])))
        overlay = bool(chain) and not flatten
        # A leftover of an earlier process that crashed building the same step, not yet cleaned.
        await self._discard(id)
        try:
            await asyncio.to_thread(self._prepare, id, base, overlay, flatten)
            if flatten:
                await self._copy_merged(id, chain, tmp / "rootfs")
            elif overlay:
                await self._mount(self._build_options(id, chain), tmp / "rootfs")
            await fn(tmp)
            if overlay:
                # Not lazy: a process still writing in the rootfs would write into a committed
                # layer.
                await run("umount", tmp / "rootfs")
            await asyncio.to_thread(self._commit_layer, id, chain if overlay else [])
        except BaseException:
            await self._discard(id)
            raise

    def _prepare(self, id: str, base: str | None, overlay: bool, flatten: bool) -> None:
        """Make `result-tmp/ID` (with base's files but `rootfs`, and an empty `rootfs` to mount
        on if `overlay`) and `layer-tmp/ID` (with the directories the mounts need). Raises
        OSError on failure; the caller removes what was made."""
        tmp, layer = self._result_tmp(id), self._layer_tmp(id)
        tmp.mkdir()
        layer.mkdir()
        if base is None:
            return
        for entry in self._result(base).iterdir():
            if entry.name == "rootfs":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        if overlay:
            (tmp / "rootfs").mkdir()
            _make_upper(layer / "diff", like=self._layers / base / "diff")
            (layer / "work").mkdir()
        if flatten:
            (layer / "merged").mkdir()
            (layer / "empty").mkdir()

    async def _copy_merged(self, id: str, chain: list[str], rootfs: Path) -> None:
        """Copy the merged view of the layers `chain` to `rootfs` (which does not exist), through
        a read-only overlay mounted in `layer-tmp/ID/merged`. Not through the base's view: what
        was written into that view's scratch directory is not part of the result."""
        merged = self._layer_tmp(id) / "merged"
        # An overlay without an upper directory needs two lower ones: the empty directory makes
        # the second when the base is a bottom layer.
        await self._mount(self._options([*_diffs(chain), f"../{LAYER_TMP}/{id}/empty"]), merged)
        try:
            await run("cp", "-a", "--no-target-directory", merged, rootfs)
        finally:
            await run("umount", merged)

    def _commit_layer(self, id: str, lower: list[str]) -> None:
        """Move the finished build into `layer/ID` and `result/ID` (the commit), `lower` being
        the layers beneath it (none for a bottom layer, whose diff is `tmp/rootfs` itself).
        Raises OSError on failure: then no result exists, and the caller removes the rest (a
        layer already renamed is an orphan that `clean` or the next build of `id` removes)."""
        tmp, layer = self._result_tmp(id), self._layer_tmp(id)
        if lower:
            shutil.rmtree(layer / "work")
        else:
            for scratch in ("merged", "empty"):
                if (layer / scratch).exists():
                    (layer / scratch).rmdir()
            rootfs = tmp / "rootfs"
            if rootfs.is_dir():
                rootfs.rename(layer / "diff")
            else:
                # `fn` made no rootfs: the result is an empty one.
                (layer / "diff").mkdir()
            rootfs.mkdir()
        (layer / "lower").write_text("".join(f"{below}\n" for below in lower))
        final = self._layers / id
        if final.exists():
            # A layer whose result was never committed (a crash between the two renames).
            shutil.rmtree(final)
        layer.rename(final)
        tmp.rename(self._result(id))

    async def _discard(self, id: str) -> None:
        """Unmount and remove the temporary directories of build `id`, if present."""
        tmp, layer = self._result_tmp(id), self._layer_tmp(id)
        await self._unmount_all(tmp / "rootfs")
        await self._unmount_all(layer / "merged")
        for path in (tmp, layer):
            await self._remove_if_present(path)

    async def result(self, id: str) -> Path | None:
        """See `Store.result`: `result/ID`, with the merged view mounted at `rootfs` (and held
        until `close`). Raises BuildError if a layer beneath `id` was deleted or mounting
        fails."""
        path = self._result(id)
        exists, mounted = await asyncio.to_thread(_state, path)
        if not exists:
            return None
        if not (mounted and id in self._views.held):
            async with self._views_lock, self._views.mount_locks.lock(id):
                # A view this process held may have been unmounted by a deletion since.
                self._views.forget(id)
                if not await asyncio.to_thread(os.path.ismount, path / "rootfs"):
                    await self._mount_view(id)
                await self._views.hold(id)
        return path

    async def _mount_view(self, id: str) -> None:
        """Mount the merged view of result `id` at `result/ID/rootfs`, over a fresh scratch
        directory. Raises BuildError if a layer is missing or mounting fails."""
        chain = await asyncio.to_thread(self._chain, id)
        view = self.root / VIEW / id

        def prepare() -> None:
            # Start from an empty scratch directory: one left by an earlier mount (before a
            # reboot, say) may hold anything.
            if view.exists():
                shutil.rmtree(view)
            view.mkdir()
            _make_upper(view / "upper", like=self._layers / id / "diff")
            (view / "work").mkdir()

        await asyncio.to_thread(prepare)
        await self._mount(self._view_options(id, chain), self._result(id) / "rootfs")

    async def delete(self, id: str) -> None:
        """See `Store.delete`: unmounts the view (lazily, should a process still use it), then
        removes the result, its view and its layer. Results built on `id` can no longer be
        mounted (see `_chain`): delete them too. Raises BuildError if a step fails."""
        path = self._result(id)
        self._views.forget(id)
        await self._unmount_all(path / "rootfs")
        if await asyncio.to_thread(path.exists):
            # Out of sight in one rename, so that no half-removed result is ever seen.
            trash = self.root / RESULT_TMP / f"{DELETED}{id}"
            await self._remove_if_present(trash)
            await asyncio.to_thread(path.rename, trash)
            await self._remove(trash)
        await self._remove_if_present(self.root / VIEW / id)
        await self._remove_if_present(self._layers / id)

    async def clean(self) -> None:
        """See `Store.clean`: unmounts and removes the builds under `result-tmp/` and
        `layer-tmp/` whose step lock is free, the copies under `cache-tmp/` whose owner has
        gone, the views no process holds, and the layers and views of results that do not
        exist (unless their step is locked). Raises BuildError if an unmount or a removal
        fails."""
        for directory, mount in ((RESULT_TMP, "rootfs"), (LAYER_TMP, "merged")):
            for leftover in await asyncio.to_thread(_entries, self.root / directory):
                with if_free(self.lock(step_of(leftover.name))) as free:
                    if free:
                        await self._unmount_all(leftover / mount)
                        await self._remove_if_present(leftover)
        await super().clean()
        for directory in (self._layers, self.root / VIEW):
            for entry in await asyncio.to_thread(_entries, directory):
                with if_free(self.lock(entry.name)) as free:
                    if free and not await asyncio.to_thread(
                            (self.root / RESULT / entry.name).is_dir):
                        await self._remove(entry)
        for result in await asyncio.to_thread(_entries, self.root / RESULT):
            if await asyncio.to_thread(os.path.ismount, result / "rootfs"):
                with if_free(self._views.mount_locks.lock(result.name)) as free:
                    if free and self._views.locks.is_free(result.name):
                        await self._unmount_all(result / "rootfs")


class _Views:
    """The views this process holds (a shared lock each), and their unmounting at close."""

    def __init__(self, root: Path, state_dir: Path) -> None:
        self.root = root
        self.locks = LockDir(state_dir / LOCK / VIEW)
        self.mount_locks = LockDir(state_dir / LOCK / "view-mount")
        self.held: dict[str, FileLock] = {}

    async def hold(self, id: str) -> None:
        """Take the shared lock on the view of `id` (its mount lock is held by the caller)."""
        lock = self.locks.lock(id, shared=True)
        await lock.acquire()
        self.held[id] = lock

    def forget(self, id: str) -> None:
        """Let the view of `id` go without unmounting it (it is gone or about to be)."""
        lock = self.held.pop(id, None)
        if lock is not None:
            lock.release()

    def close(self) -> None:
        """Let every held view go, unmounting those no other process holds. Blocks the
        thread (it runs at exit, with or without an event loop)."""
        while self.held:
            id, lock = self.held.popitem()
            mount_lock = self.mount_locks.lock(id)
            mount_lock.acquire_blocking()
            try:
                lock.release()
                if self.locks.is_free(id):
                    subprocess.run(["umount", "--lazy", str(self.root / RESULT / id / "rootfs")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, check=False)
            finally:
                mount_lock.release()


def _make_upper(path: Path, like: Path) -> None:
    """Make the upper directory `path` with the owner and mode of `like`: the root of an
    overlay takes them from its upper directory, not from the layers beneath."""
    path.mkdir()
    info = like.stat()
    os.chown(path, info.st_uid, info.st_gid)
    os.chmod(path, info.st_mode & 0o7777)


def _diffs(chain: list[str]) -> list[str]:
    """The lower directories of the layers `chain`, relative to `ROOT/layer`."""
    return [f"{id}/diff" for id in chain]


def _state(path: Path) -> tuple[bool, bool]:
    """Whether the result directory `path` exists, and whether its view is mounted."""
    return path.is_dir(), os.path.ismount(path / "rootfs")


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())
