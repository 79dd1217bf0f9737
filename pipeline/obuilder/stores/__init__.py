"""The stores, one module each; `KINDS`, the one registry of them; and `open_store` to pick one
from a `KIND:PATH` string.

Adding a kind of store means writing its module (a `Store`, usually a `DirectoryStore`) and
adding it to `KINDS`; the command line, the build primitive and the tests' list of kinds follow.
Backends are imported only when asked for, so a command pays only for the store it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.obuilder.protocols import BuildError, Store


def _btrfs(root: Path, rsync_mode: str) -> Store:
    from pipeline.obuilder.stores.btrfs import BtrfsStore

    return BtrfsStore(root)


def _overlayfs(root: Path, rsync_mode: str) -> Store:
    from pipeline.obuilder.stores.overlayfs import OverlayfsStore

    return OverlayfsStore(root)


def _xfs(root: Path, rsync_mode: str) -> Store:
    from pipeline.obuilder.stores.xfs import XfsStore

    return XfsStore(root)


def _rsync(root: Path, rsync_mode: str) -> Store:
    from pipeline.obuilder.stores.rsync import RsyncStore

    return RsyncStore(root, rsync_mode)


KINDS: Mapping[str, Callable[[Path, str], Store]] = {
    "btrfs": _btrfs,
    "overlayfs": _overlayfs,
    "xfs": _xfs,
    "rsync": _rsync,
}
"""Every kind of store, in the order the help lists them: each opens a store of its kind on an
existing directory, given the rsync mode (which only the rsync store uses)."""


def spec_help() -> str:
    """The accepted `KIND:PATH` forms, for messages and help: `btrfs:DIR, ... or rsync:DIR`."""
    forms = [f"{kind}:DIR" for kind in KINDS]
    return f"{', '.join(forms[:-1])} or {forms[-1]}"


def open_store(spec: str, *, rsync_mode: str = "copy") -> Store:
    """The store described by `spec` (`KIND:DIR` with KIND a key of `KINDS`); `rsync_mode`
    (`copy` or `hardlink`) applies to rsync stores only.

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
    return KINDS[kind](root, rsync_mode)
