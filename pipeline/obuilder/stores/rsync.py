"""A store of plain directories, copied with rsync: works on any filesystem, slowly.

Results are ordinary directories. A build copies its base's whole result directory with rsync
into a private directory and runs there, so every build pays for a full copy.

Mode `hardlink` saves disk space, not time: on commit, files the step left identical to its
base (same content by checksum, same metadata) become hard links to the base's files instead of
copies. This is safe because a hard-linked inode is only ever shared between *committed*
results, which nothing writes to: a build never runs on links, it runs on its own full copy
(made without `--link-dest`), so a step that edits a file in place (`>>`, `truncate`,
`chmod`, `touch`) edits a private inode. Cache copies are full copies in both modes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.stores.common import STAGING, DirectoryStore, require, run

MODES = ("copy", "hardlink")

# Archive mode, plus hard links, ACLs and xattrs; ids as numbers, as a rootfs's own
# /etc/passwd need not match the host's.
_RSYNC = ("rsync", "-aHAX", "--numeric-ids")


class RsyncStore(DirectoryStore):
    """Results as plain directories under `root`, on any filesystem.

    `mode` is `copy` or `hardlink` (see the module's documentation). Raises BuildError for
    another mode, MissingTool if rsync is not installed.
    """

    kind = "rsync"

    def __init__(self, root: Path, mode: str = "copy") -> None:
        if mode not in MODES:
            raise BuildError(f"unknown rsync mode {mode!r}: expected copy or hardlink")
        require("rsync")
        super().__init__(root)
        self.mode = mode

    async def _copy(self, src: Path, dst: Path) -> None:
        await run(*_RSYNC, f"{src}/", dst)

    async def _commit(self, tmp: Path, dst: Path, base: Path | None) -> None:
        """In hardlink mode, copy `tmp` linking files unchanged from `base` into a staging
        directory beside it, then rename that into place; `tmp` itself is then removed."""
        if self.mode == "copy" or base is None:
            await super()._commit(tmp, dst, base)
            return
        staging = tmp.with_name(tmp.name + STAGING)
        try:
            # --checksum: compare contents, not size and mtime, which a step can leave unchanged
            # while changing a file.
            await run(*_RSYNC, "--checksum", f"--link-dest={base}", f"{tmp}/", staging)
            staging.rename(dst)
        except BaseException:
            await self._remove_if_present(staging)
            raise
        await self._remove(tmp)
