"""A store in a container engine (docker or podman, see `container_engine.py`): each result is
an image tagged with its step id, as OBuilder's Docker store keeps them, and each named cache a
volume.

`docker:PREFIX` keeps its images and volumes under names made from PREFIX
(`container_engine.Names`) and its host-side state in `$PIPELINE_DOCKER_STATE/PREFIX` (default
`/var/lib/pipeline/docker/PREFIX`), the store's `root`, laid out as `DirectoryStore`'s without
caches:

    ROOT/result/ID/       a committed result's log and metadata (`env.json`, `digest`); the
                          result is this directory and the image `localhost/PREFIX:ID` together
    ROOT/result-tmp/ID/   the same of a build in progress
    ROOT/state/           the result table, locks, owners, the sandbox's files; `engine` names
                          the engine the store's images are in

A build of ID on base B tags B's image as `localhost/PREFIX:ID`, which the step's work (through
the docker sandbox's workspace) replaces with its own commits; the store then renames the
metadata into `result/`, which makes the image a result. A crash leaves an image without
metadata, or metadata without an image: `clean` removes each once its step's lock is free.

A cache's shared version is the volume `PREFIX-Cache-NAME`; a build takes a copy (a volume of
its own, filled by `cp -a` on the host) and releasing it swaps the two volumes' directories in
one rename, as the directory stores swap theirs.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from pipeline.obuilder.container_engine import (
    DEFAULT_ENGINE,
    ENGINE_FILE,
    STATE_ENV,
    Names,
    check_prefix,
    escape,
    recorded_engine,
    store_engine,
)
from pipeline.obuilder.locks import if_free, is_live_owner
from pipeline.obuilder.protocols import STATE_DIR, BuildError, DiskUsage
from pipeline.obuilder.stores.common import (
    RESULT,
    RESULT_TMP,
    CacheState,
    DirectoryStore,
    check_name,
    exchange,
    require,
    run,
)


def _empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    return buffer.getvalue()


class DockerStore(DirectoryStore):
    """Results as images of a container engine, with their metadata under `state_base/prefix`.

    `engine` is `docker` or `podman`; None means the one the store was made with, or
    `docker` for a new store. Raises BuildError for a malformed prefix, an engine other than
    the store's, or an engine that does not answer (saying to use `--engine podman` or to
    install the package); MissingTool if the engine's client or `cp` is not installed.
    """

    kind = "docker"
    layout = (RESULT, RESULT_TMP, STATE_DIR)

    def __init__(self, prefix: str, state_base: Path, engine: str | None = None) -> None:
        self.prefix = check_prefix(prefix)
        root = state_base / prefix
        recorded = recorded_engine(root)
        if recorded is not None and engine is not None and engine != recorded:
            raise BuildError(f"the images of store docker:{prefix} are in {recorded}, not "
                             f"{engine}: use --engine {recorded} (or another prefix)")
        self.engine = store_engine(engine or recorded or DEFAULT_ENGINE, root)
        require("cp")
        self._storage = self.engine.check()
        try:
            super().__init__(root)
        except OSError as exc:
            raise BuildError(f"cannot make the state directory of store docker:{prefix} in "
                             f"{state_base}: {exc.strerror} (set {STATE_ENV} to a directory "
                             f"root can write)") from None
        if recorded is None:
            (self.state_dir / ENGINE_FILE).write_text(self.engine.name + "\n")
        self.names = Names(prefix)

    # Backend primitives: the metadata directories.

    async def _copy(self, src: Path, dst: Path) -> None:
        await asyncio.to_thread(shutil.copytree, src, dst, symlinks=True)

    async def _commit(self, tmp: Path, dst: Path, base: Path | None) -> None:
        """Rename the metadata into place, which makes the step's image a result (an empty
        image is made first if a step on no base made none)."""
        image = self.names.result(dst.name)
        if base is None and not await self.engine.image_exists(image):
            await self._import_empty(image)
        await super()._commit(tmp, dst, base)

    async def _import_empty(self, image: str) -> None:
        # A file with no name: nothing is left behind whatever happens.
        with tempfile.TemporaryFile(dir=self.state_dir) as empty:
            empty.write(_empty_tar())
            empty.seek(0)
            await self.engine.rename("import", "-", image, stdin=empty)

    # The Store protocol.

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """See `Store.build` (the caller holds `lock(id)`): `fn`'s workspace (the docker
        sandbox's) works on the image `localhost/PREFIX:ID`, B's image at first, which stays
        no result until the metadata is committed. Raises BuildError if `base` has no result;
        whatever `fn` raises (cancellation included) propagates once the image and the
        temporary metadata are removed."""
        image = self.names.result(id)
        if base is None:
            # A killed build's image, which the step's work must not start from.
            await self.engine.untag([image])
        else:
            try:
                # Replaces whatever a killed build of the step left under the name.
                await self.engine.rename("tag", self.names.result(base), image)
            except BuildError:
                if await self.has_result(base):
                    raise
                raise BuildError(f"cannot build {id}: its base result {base} does not exist"
                                 ) from None
        try:
            await super().build(base, id, fn)
        except BaseException:
            await self.engine.untag([image])
            raise

    async def result(self, id: str) -> Path | None:
        """See `Store.result`: the metadata directory, if the image is there too (it holds no
        `rootfs/`: the image is read through the docker sandbox's `Workspaces.files`)."""
        return self._result(id) if await self.has_result(id) else None

    async def has_result(self, id: str) -> bool:
        """See `Store.has_result`: both the metadata and the image are there."""
        return self._result(id).is_dir() and await self.engine.image_exists(
            self.names.result(id))

    async def results(self) -> list[str]:
        """See `Store.results`: ids with both metadata and an image."""
        tags = await self.engine.tags(self.names.repository)
        found = await asyncio.to_thread(os.listdir, self.root / RESULT)
        return sorted(id for id in found if f"{self.names.repository}:{id}" in tags)

    async def delete(self, id: str) -> None:
        """See `Store.delete`: the image's tag (the image with it, unless a result built on it
        still uses its layers) and the metadata. Raises BuildError if the engine refuses."""
        await self.engine.untag([self.names.result(id)])
        await super().delete(id)

    @asynccontextmanager
    async def cache(self, name: str, uid: int, gid: int) -> AsyncIterator[Path]:
        """See `Store.cache`: the copy is the host directory of a new volume
        `PREFIX-Copy-TOKEN-N-NAME`, made with `cp -a` from the cache's volume
        `PREFIX-Cache-NAME`; releasing it swaps the two volumes' directories in one rename,
        then removes the copy's volume. Taking and releasing hold the cache's lock, as in
        `DirectoryStore.cache`."""
        check_name("cache name", name)
        state = self._caches.setdefault(name, CacheState())
        copy = f"{self.names.copy}{self._owner.token}-{next(self._copies)}-{escape(name)}"
        async with state.lock, self._cache_locks.lock(name):
            shared = await self._shared_cache(name, uid, gid)
            generation = state.generation
            try:
                await self.engine("volume", "create", copy)
                copy_dir = await self._volume_dir(copy)
                # The engine made it empty: replaced by an exact copy, top directory included.
                copy_dir.rmdir()
                await run("cp", "-a", "--no-target-directory", shared, copy_dir)
            except BaseException:
                await self.engine.remove_volume(copy)
                raise
        try:
            yield copy_dir
        except BaseException:
            await self.engine.remove_volume(copy)
            raise
        try:
            async with state.lock, self._cache_locks.lock(name):
                if state.generation == generation:
                    exchange(copy_dir, shared)
        finally:
            await self.engine.remove_volume(copy)

    async def _shared_cache(self, name: str, uid: int, gid: int) -> Path:
        """The directory of the cache `name`'s volume, made (owned by `uid:gid`) if missing."""
        volume = self.names.cache(name)
        found = await self.engine.volume_path(volume)
        if found is not None:
            return found
        await self.engine("volume", "create", volume)
        made = await self._volume_dir(volume)
        os.chown(made, uid, gid)
        return made

    async def _volume_dir(self, volume: str) -> Path:
        found = await self.engine.volume_path(volume)
        if found is None:
            raise BuildError(f"{self.engine.name} lost the volume {volume} just made")
        return found

    async def delete_cache(self, name: str) -> None:
        """See `Store.delete_cache`: removes the cache's volume."""
        state = self._caches.setdefault(check_name("cache name", name), CacheState())
        async with state.lock, self._cache_locks.lock(name):
            state.generation += 1
            await self.engine.remove_volume(self.names.cache(name))

    async def df(self) -> DiskUsage:
        """See `Store.df`: the filesystem holding the engine's images (the state directory's
        if the engine's directory is not on this host)."""
        place = self._storage if self._storage.is_dir() else self.root
        stats = os.statvfs(place)
        return DiskUsage(total=stats.f_blocks * stats.f_frsize,
                         free=stats.f_bavail * stats.f_frsize)

    async def clean(self) -> None:
        """See `Store.clean`: removes, once their step's lock is free, unfinished builds' metadata
        and images (images without metadata), and metadata without an image; and the cache
        copies' volumes of processes that have gone. Raises BuildError if the engine refuses a
        removal."""
        await self._clean_builds()
        repository = self.names.repository
        tags = await self.engine.tags(repository)
        for tag in sorted(tags):
            id = tag.rpartition(":")[2]
            with if_free(self.lock(id)) as free:
                if free and not self._result(id).is_dir():
                    await self.engine.untag([tag])
        for id in sorted(await asyncio.to_thread(os.listdir, self.root / RESULT)):
            if f"{repository}:{id}" in tags:
                continue
            with if_free(self.lock(id)) as free:
                # Asked again: a live process may have committed it since the listing.
                if free and not await self.engine.image_exists(self.names.result(id)):
                    await self._remove_if_present(self._result(id))
        for volume in await self.engine.volumes(self.names.copy):
            if not is_live_owner(self._owners, volume.removeprefix(self.names.copy)):
                await self.engine.remove_volume(volume)
