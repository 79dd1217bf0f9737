"""The stores, one module each, and `open_store` to pick one from a `KIND:PATH` string.

Backends are imported only when asked for, so a command pays only for the store it uses.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.obuilder.protocols import BuildError, Store

KINDS = ("btrfs", "overlayfs", "xfs", "rsync")


def open_store(spec: str, *, rsync_mode: str = "copy") -> Store:
    """The store described by `spec` (`btrfs:DIR`, `overlayfs:DIR`, `xfs:DIR` or `rsync:DIR`);
    `rsync_mode` (`copy` or `hardlink`) applies to rsync stores only.

    Raises BuildError, in a line a user can act on, for a malformed spec, an unknown kind or a
    directory that does not exist, and whatever the backend raises when it refuses `DIR` (the
    wrong filesystem, a missing tool, an unknown rsync mode).
    """
    kind, sep, path = spec.partition(":")
    expected = f"expected KIND:PATH with KIND one of {', '.join(KINDS)}"
    if not sep or not path:
        raise BuildError(f"store {spec!r}: {expected}")
    if kind not in KINDS:
        raise BuildError(f"unknown store kind {kind!r} in {spec!r}: {expected}")
    root = Path(path)
    if not root.is_dir():
        raise BuildError(f"store directory {root} does not exist (create it, or mount the "
                         f"store's filesystem there)")
    if kind == "btrfs":
        from pipeline.obuilder.stores.btrfs import BtrfsStore

        return BtrfsStore(root)
    if kind == "overlayfs":
        from pipeline.obuilder.stores.overlayfs import OverlayfsStore

        return OverlayfsStore(root)
    if kind == "xfs":
        from pipeline.obuilder.stores.xfs import XfsStore

        return XfsStore(root)
    from pipeline.obuilder.stores.rsync import RsyncStore

    return RsyncStore(root, rsync_mode)
