"""A store on btrfs: every result and every cache is a subvolume; a build starts from a
snapshot of its base, which takes milliseconds whatever the size of the rootfs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.obuilder.stores.common import DirectoryStore, require, require_filesystem, run

# The inode number of the root directory of every btrfs subvolume.
_SUBVOLUME_ROOT_INODE = 256


class BtrfsStore(DirectoryStore):
    """Results and caches as btrfs subvolumes under `root`.

    Raises MissingTool if btrfs-progs is not installed, BuildError (saying how to make one) if
    `root` is not on a btrfs filesystem.
    """

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
