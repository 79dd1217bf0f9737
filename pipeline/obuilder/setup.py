"""Putting a builder together: a store from `KIND:PATH`, a fetcher from its name, and the
store's sandbox (the docker sandbox for a docker store, runc for the others).

Shared by `pipeline obuilder` and by the engine's build primitive, so that both read the same
options the same way. Modules are imported only when used, so that a fully cached build starts
fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.obuilder.builder import Builder
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.platforms import host_platform, parse_platform
from pipeline.obuilder.protocols import STATE_DIR, BuildError, Fetcher, Sandbox


async def open_db_store(store_spec: str, *, rsync_mode: str = "copy",
                        engine: str | None = None) -> DbStore:
    """The store `store_spec` (`KIND:PATH`) with its result table, cleaned (what a crash left
    is removed). Raises what `open_store` raises for a malformed spec, an unknown kind, a
    missing directory, a refused filesystem or engine, and sqlite3.Error for an unusable
    table."""
    from pipeline.obuilder.stores import open_store

    store = DbStore(open_store(store_spec, rsync_mode=rsync_mode, engine=engine))
    try:
        await store.clean()
    except BaseException:
        store.close()
        raise
    return store


def select_fetcher(state_dir: Path, *, fetcher: str | None = None, image_dir: str | None = None,
                   fetcher_map: Path | None = None, platform: str | None = None,
                   insecure: Sequence[str] = (), mirror: str | None = None) -> Fetcher:
    """The fetcher chosen as `pipeline obuilder` documents it: `image_dir` (short for
    `local:DIR`), else `fetcher` by name, else the default; `fetcher_map` sends chosen images
    elsewhere. A registry keeps its layers and resolved tags in `registry/` under `state_dir`,
    the store's state directory (`Store.state_dir`). Every fetcher makes images of `platform`
    (any form `platforms.parse_platform` takes; None: the host's), except `local:DIR`, whose
    tarballs are used as they are, whatever their architecture.

    Raises BuildError for an unknown fetcher, platform or a malformed fetcher map. Nothing is
    fetched, and nothing beyond the map is checked, until an image is asked for.
    """
    from pipeline.obuilder.fetchers.select import (
        default_fetcher,
        parse_fetcher,
        read_fetcher_map,
    )

    settings = {"cache_dir": state_dir / "registry",
                "platform": parse_platform(platform or host_platform()),
                "insecure": insecure, "mirror": mirror}
    chosen: Fetcher
    if image_dir is not None:
        chosen = parse_fetcher(f"local:{image_dir}", **settings)
    elif fetcher is not None:
        chosen = parse_fetcher(fetcher, **settings)
    else:
        chosen = default_fetcher(**settings)
    if fetcher_map is not None:
        chosen = read_fetcher_map(fetcher_map, default=chosen, **settings)
    return chosen


def sandbox_dir(store_root: Path) -> Path:
    """Where the sandbox of the store at `store_root` keeps its state (runc's bundles, docker's
    secrets): `sandbox/` in the store's state directory, found from the root alone (see
    `Store.state_dir`) so that sandboxes can be cleaned without opening their store."""
    return store_root / STATE_DIR / "sandbox"


def open_sandbox(store_root: Path, *, memory: int | None = None, cpus: float | None = None,
                 fast_sync: bool = False) -> Sandbox:
    """The sandbox of the store at `store_root`: for a docker store (whose state names the
    engine its images are in, see `stores.docker`), the docker sandbox on that engine; for the
    others, runc (see `RuncSandbox` for the options and what it raises). Raises BuildError for
    `fast_sync` with a docker store, which keeps the engine's seccomp profile."""
    from pipeline.obuilder.container_engine import recorded_engine

    engine = recorded_engine(store_root)
    if engine is None:
        from pipeline.obuilder.sandboxes.runc import RuncSandbox

        return RuncSandbox(sandbox_dir(store_root), memory=memory, cpus=cpus,
                           fast_sync=fast_sync)
    if fast_sync:
        raise BuildError("--fast-sync is for the runc sandbox: the docker sandbox keeps the "
                         "engine's seccomp profile")
    from pipeline.obuilder.container_engine import Names, store_engine
    from pipeline.obuilder.sandboxes.docker import DockerSandbox

    return DockerSandbox(sandbox_dir(store_root), store_engine(engine, store_root),
                         Names(store_root.name), memory=memory, cpus=cpus)


async def open_builder(store_spec: str, *, rsync_mode: str = "copy", fetcher: str | None = None,
                       image_dir: str | None = None, fetcher_map: Path | None = None,
                       platform: str | None = None, insecure: Sequence[str] = (),
                       mirror: str | None = None, memory: int | None = None,
                       cpus: float | None = None, fast_sync: bool = False,
                       engine: str | None = None) -> Builder:
    """A builder on the store `store_spec` with its sandbox (`open_sandbox`: runc, or docker
    for a docker store on `engine`; its state under the store's `state/sandbox`) and the
    fetcher `select_fetcher` chooses; `memory`, `cpus` and `fast_sync` configure the sandbox
    (see `RuncSandbox`). What crashed processes left is cleaned before the builder's first step
    runs (see `Builder.clean`), not here: a fully cached build needs none of it.

    Raises what `open_db_store`, `select_fetcher` and the sandbox raise: BuildError for a
    bad store or fetcher, or when not running as root; MissingTool without runc.
    """
    from pipeline.obuilder.stores import open_store

    store = DbStore(open_store(store_spec, rsync_mode=rsync_mode, engine=engine))
    try:
        chosen = select_fetcher(store.state_dir, fetcher=fetcher, image_dir=image_dir,
                                fetcher_map=fetcher_map, platform=platform, insecure=insecure,
                                mirror=mirror)
        sandbox = open_sandbox(store.root, memory=memory, cpus=cpus, fast_sync=fast_sync)
    except BaseException:
        store.close()
        raise
    return Builder(store, sandbox, chosen, platform=platform)
