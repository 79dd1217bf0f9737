"""A store on xfs with reflinks: results are plain directories, and a build starts from a
`cp --reflink=always` copy of its base, sharing every data block until a step writes to it.
Time is proportional to the number of files, not their size.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.stores.common import (
    DirectoryStore,
    how_to_create,
    require,
    require_filesystem,
    run,
)

# ioctl(dst_fd, FICLONE, src_fd): make dst share src's blocks (linux/fs.h).
_FICLONE = 0x40049409
_MKFS = "mkfs.xfs -m reflink=1"


class XfsStore(DirectoryStore):
    """Results and caches as reflinked copies under `root`.

    Raises MissingTool if cp is missing, BuildError (saying how to make one) if `root` is not
    on xfs or the filesystem was made without reflink support.
    """

    kind = "xfs"

    def __init__(self, root: Path) -> None:
        require("cp")
        require_filesystem(root, "xfs", "xfs", _MKFS)
        root.mkdir(parents=True, exist_ok=True)
        _require_reflink(root)
        super().__init__(root)

    async def _copy(self, src: Path, dst: Path) -> None:
        await run("cp", "-a", "--reflink=always", "--no-target-directory", src, dst)


def _require_reflink(directory: Path) -> None:
    """Clone a small file in `directory`; raise BuildError if the filesystem cannot (saying
    how to make one that can) or if `directory` is not writable. A full filesystem, where no
    file can be written, passes. The files are unnamed (O_TMPFILE), so that processes opening
    the store at once do not meet, and a crash leaves nothing behind."""
    try:
        with open(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), "w+b") as src, \
                open(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), "wb") as dst:
            # Some data, so that there are blocks to share.
            src.write(b"\0" * 4096)
            src.flush()
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full store cannot be probed, but must open for `prune` and `delete` to free
            # space; it was probed when it was not full, and builds refuse to start on it.
            return
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY):
            raise BuildError(f"cannot write in {directory}: {exc.strerror}") from None
        raise BuildError(
            f"the xfs store needs reflink support, which the filesystem of {directory} lacks; "
            f"{how_to_create(directory, _MKFS)}") from None
