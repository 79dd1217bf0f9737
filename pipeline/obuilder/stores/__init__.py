"""The stores, one module each; `KINDS`, the one registry of them; and `open_store` to pick one
from a `KIND:PATH` string.

Adding a kind of store means writing its module (a `Store`, usually a `DirectoryStore`) and
adding it to `KINDS`; the command line, the build primitive and the tests' list of kinds follow.
Backends are imported only when asked for, so a command pays only for the store it uses.

PATH is an existing directory for every kind but `docker`, whose PATH is a prefix naming the
store's images in a container engine (its directory is under `$PIPELINE_DOCKER_STATE`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.obuilder.protocols import BuildError, Store


@dataclass(frozen=True)
class Options:
    """The settings some kinds of store take: `rsync_mode` (`copy` or `hardlink`) for rsync,
    `engine` (`docker`, `podman`, or None for the store's own) for docker."""

    rsync_mode: str = "copy"
    engine: str | None = None


def _directory(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise BuildError(f"store directory {root} does not exist (create it, or mount the "
                         f"store's filesystem there)")
    return root


def _btrfs(path: str, options: Options) -> Store:
    from pipeline.obuilder.stores.btrfs import BtrfsStore

    return BtrfsStore(_directory(path))


def _overlayfs(path: str, options: Options) -> Store:
    from pipeline.obuilder.stores.overlayfs import OverlayfsStore

    return OverlayfsStore(_directory(path))


def _xfs(path: str, options: Options) -> Store:
    from pipeline.obuilder.stores.xfs import XfsStore

    return XfsStore(_directory(path))


def _rsync(path: str, options: Options) -> Store:
    from pipeline.obuilder.stores.rsync import RsyncStore

    return RsyncStore(_directory(path), options.rsync_mode)


def _docker(path: str, options: Options) -> Store:
    from pipeline.obuilder.container_engine import state_base
    from pipeline.obuilder.stores.docker import DockerStore

    return DockerStore(path, state_base(), options.engine)


KINDS: Mapping[str, Callable[[str, Options], Store]] = {
    "btrfs": _btrfs,
    "overlayfs": _overlayfs,
    "xfs": _xfs,
    "rsync": _rsync,
    "docker": _docker,
}
"""Every kind of store, in the order the help lists them: each opens a store of its kind on
PATH, given the `Options`."""

PREFIX_KINDS = ("docker",)
"""The kinds whose PATH is a prefix of names in a container engine; their `root` is the
directory of their host-side state, named after the prefix."""
DIRECTORY_KINDS = tuple(kind for kind in KINDS if kind not in PREFIX_KINDS)
"""The kinds whose PATH is the store's directory (its `root`), in `KINDS`' order."""


def spec_help() -> str:
    """The accepted `KIND:PATH` forms, for messages and help: `btrfs:DIR, ... or docker:PREFIX`."""
    forms = [f"{kind}:{'DIR' if kind in DIRECTORY_KINDS else 'PREFIX'}" for kind in KINDS]
    return f"{', '.join(forms[:-1])} or {forms[-1]}"


def spec_of(store: Store) -> str:
    """The `KIND:PATH` naming `store` on the command line."""
    path = store.root.name if store.kind in PREFIX_KINDS else store.root
    return f"{store.kind}:{path}"


def open_store(spec: str, *, rsync_mode: str = "copy", engine: str | None = None) -> Store:
    """The store described by `spec` (`KIND:PATH` with KIND a key of `KINDS`); `rsync_mode`
    (`copy` or `hardlink`) applies to rsync stores only, `engine` to docker stores only.

    Raises BuildError, in a line a user can act on, for a malformed spec, an unknown kind or a
    directory that does not exist, and whatever the backend raises when it refuses PATH (the
    wrong filesystem, a missing tool, an unknown rsync mode, a malformed docker prefix, an
    engine that does not answer).
    """
    kind, sep, path = spec.partition(":")
    expected = f"expected KIND:PATH with KIND one of {', '.join(KINDS)}"
    if not sep or not path:
        raise BuildError(f"store {spec!r}: {expected}")
    if kind not in KINDS:
        raise BuildError(f"unknown store kind {kind!r} in {spec!r}: {expected}")
    return KINDS[kind](path, Options(rsync_mode=rsync_mode, engine=engine))
