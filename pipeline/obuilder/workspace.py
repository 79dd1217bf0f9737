"""`HostWorkspaces`: the builder's workspaces when results are host directories (every store but
docker's): a step's rootfs is `rootfs/` in the directory `Store.build` gives the step, the sandbox
(runc) runs commands over it, and copies and reads go through `confined` so that whatever the
rootfs holds, nothing outside it is touched.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.obuilder import confined
from pipeline.obuilder.protocols import (
    BuildError,
    Fetcher,
    ImageInfo,
    Log,
    Sandbox,
    SandboxConfig,
)

if TYPE_CHECKING:
    from pipeline.obuilder.manifest import Manifest

ROOTFS = "rootfs"
"""The rootfs's name in a result directory."""


class HostWorkspace:
    """The rootfs `rootfs` (a host directory), changed by commands run in `sandbox`."""

    def __init__(self, rootfs: Path, sandbox: Sandbox) -> None:
        self.rootfs = rootfs
        self.sandbox = sandbox

    async def unpack(self, fetcher: Fetcher, image: str, *, log: Log) -> ImageInfo:
        """See `Workspace.unpack`: the fetcher unpacks straight into the rootfs."""
        self.rootfs.mkdir()
        return await fetcher.fetch(image, self.rootfs, log=log)

    async def run(self, config: SandboxConfig, *, log: Log) -> None:
        """See `Workspace.run`."""
        await self.sandbox.run(config, self.rootfs, log=log)

    async def write(self, plan: Manifest, uid: int, gid: int) -> None:
        """See `Workspace.write`."""
        await asyncio.to_thread(plan.write, self.rootfs, uid, gid)

    async def read(self, path: str) -> bytes:
        """See `Workspace.read`: the file is opened confined to the rootfs (symlinks resolved as
        if it were `/`), never blocking on a FIFO planted there."""
        return await asyncio.to_thread(_read_confined, self.rootfs, path)


def _read_confined(rootfs: Path, path: str) -> bytes:
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent, _, name = confined.resolve(root_fd, path).rpartition("/")
        directory = confined.open_dir(root_fd, parent, follow_in_root=False)
        try:
            # O_NONBLOCK: a FIFO planted there must not hang the builder.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=directory)
        finally:
            os.close(directory)
    except FileNotFoundError:
        raise BuildError(f"no {path}") from None
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BuildError(f"{path} is not a regular file")
        return file.read()


class HostWorkspaces:
    """The `Workspaces` of a store of host directories, whose commands run in `sandbox`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def workspace(self, directory: Path, id: str) -> HostWorkspace:
        """See `Workspaces.workspace`: the rootfs is `directory/rootfs`."""
        return HostWorkspace(directory / ROOTFS, self.sandbox)

    @asynccontextmanager
    async def files(self, result: Path, id: str) -> AsyncIterator[Path]:
        """See `Workspaces.files`: the result's own `rootfs/`, read where it is."""
        yield result / ROOTFS
