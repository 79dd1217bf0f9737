"""A store on btrfs: every result and every cache is a subvolume; a build starts from a
snapshot of its base, which takes milliseconds whatever the size of the rootfs.

Subvolumes are made and snapshotted with the kernel's btrfs ioctls, as `btrfs subvolume create`
and `btrfs subvolume snapshot` do, without starting that program at every step; the rarer
operations (deleting, syncing) run btrfs-progs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from pathlib import Path

from pipeline.obuilder.full_store import min_free
from pipeline.obuilder.protocols import BuildError, DiskUsage
from pipeline.obuilder.stores.common import DirectoryStore, require, require_filesystem, run

# The inode number of the root directory of every btrfs subvolume.
_SUBVOLUME_ROOT_INODE = 256

# From linux/btrfs.h: `struct btrfs_ioctl_vol_args` (a descriptor, then a name of up to 4087
# bytes) and the two requests taking it, _IOW(0x94, N, struct btrfs_ioctl_vol_args).
_VOL_ARGS = struct.Struct("q4088s")
_IOC_SNAP_CREATE = 0x50009401
"""Make entry `name` of the directory the call is made on a snapshot of the subvolume `fd`."""
_IOC_SUBVOL_CREATE = 0x5000940E
"""Make entry `name` of the directory the call is made on a new, empty subvolume."""


def _subvolume_ioctl(request: int, path: Path, source: Path | None) -> None:
    """Make `path` a subvolume with `request`: a snapshot of the subvolume `source`, or (with
    no source) an empty one. Raises OSError, as the kernel reports it."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    source_fd = -1
    try:
        if source is not None:
            source_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # A mutable buffer: an immutable one is limited to 1024 bytes.
        fcntl.ioctl(parent, request, bytearray(_VOL_ARGS.pack(source_fd, os.fsencode(path.name))))
    finally:
        if source_fd >= 0:
            os.close(source_fd)
        os.close(parent)


async def _make_subvolume(request: int, path: Path, source: Path | None = None) -> None:
    """`_subvolume_ioctl` in a worker thread (btrfs commits may block it); BuildError, raised
    from the OSError (so that a full disk is known as one, see `full_store`), if it fails."""
    try:
        await asyncio.to_thread(_subvolume_ioctl, request, path, source)
    except OSError as exc:
        what = f"snapshot of {source}" if source is not None else "subvolume"
        raise BuildError(f"cannot make {path} a btrfs {what}: {exc.strerror}") from exc


class BtrfsStore(DirectoryStore):
    """Results and caches as btrfs subvolumes under `root`.

    Raises MissingTool if btrfs-progs is not installed, BuildError (saying how to make one) if
    `root` is not on a btrfs filesystem.
    """

    kind = "btrfs"

    def __init__(self, root: Path) -> None:
        require("btrfs")
        require_filesystem(root, "btrfs", "btrfs", "mkfs.btrfs")
        super().__init__(root)

    async def _create(self, path: Path) -> None:
        await _make_subvolume(_IOC_SUBVOL_CREATE, path)

    async def _copy(self, src: Path, dst: Path) -> None:
        await _make_subvolume(_IOC_SNAP_CREATE, dst, src)

    async def _remove(self, path: Path) -> None:
        # A leftover may be a plain directory (say, made by hand); rmtree cannot remove a
        # subvolume, and `subvolume delete` refuses a plain directory.
        if path.stat().st_ino == _SUBVOLUME_ROOT_INODE:
            await run("btrfs", "subvolume", "delete", "--", path)
        else:
            await super()._remove(path)

    async def df(self) -> DiskUsage:
        """See `Store.df`. A deleted subvolume keeps its space until btrfs has cleaned it up in
        the background and committed that, up to a minute later: when the store looks full
        (see `full_store`), wait for that and look again, so that the space just freed by
        `prune`, `delete` or a failed step counts."""
        usage = await super().df()
        if usage.free >= min_free(usage):
            return usage
        # A commit starts the cleaner, which `subvolume sync` waits for; the second commit
        # releases the blocks the cleaner freed.
        await run("btrfs", "filesystem", "sync", "--", self.root)
        await run("btrfs", "subvolume", "sync", "--", self.root)
        await run("btrfs", "filesystem", "sync", "--", self.root)
        return await super().df()
