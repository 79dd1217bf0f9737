"""A store on btrfs: every result and every cache is a subvolume; a build starts from a
snapshot of its base, which takes milliseconds whatever the size of the rootfs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.obuilder.full_store import min_free
from pipeline.obuilder.protocols import DiskUsage
from pipeline.obuilder.stores.common import DirectoryStore, require, require_filesystem, run

# The inode number of the root directory of every btrfs subvolume.
_SUBVOLUME_ROOT_INODE = 256


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
        await run("btrfs", "subvolume", "create", "--", path)

    async def _copy(self, src: Path, dst: Path) -> None:
        await run("btrfs", "subvolume", "snapshot", "--", src, dst)

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
