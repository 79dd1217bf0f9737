"""The contracts between the builder and its backends: `Store`, `Sandbox`, `Fetcher`, and
`Workspaces`, the seam through which the builder changes a step's root filesystem.

Each backend is one module implementing one of these protocols. Adding a backend touches that
module and, for a store, the registry of kinds (`pipeline.obuilder.stores.KINDS`), nothing else:
the builder, the result table (`DbStore`) and the command line use stores only through `Store`.
Nothing here (or anywhere under `pipeline/obuilder/`) imports the engine.

Most stores keep a result's root filesystem as a host directory (`rootfs/` in the result's
directory), which a sandbox such as runc runs commands over; the builder then works on it through
`workspace.HostWorkspaces`. A sandbox that keeps root filesystems itself (the docker sandbox, as
images of a container engine) is also the `Workspaces` of its steps: the builder asks it to
unpack a base, run a command, copy files in and read a file, never touching a rootfs itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pipeline.obuilder.locks import FileLock

if TYPE_CHECKING:
    from pipeline.obuilder.manifest import Manifest


class BuildError(Exception):
    """A build step failed: the message says which and why, in one line a user can act on."""

class MissingTool(BuildError):
    """A system tool is missing; the message names the Debian package that provides it."""

class StoreFull(BuildError):
    """The store's filesystem is full: the message names the store, says how much is free and
    what to run to free space (see `full_store.py`)."""

STATE_DIR = "state"
"""The name of every store's state directory under its root (see `Store.state_dir`)."""

@dataclass(frozen=True)
class DiskUsage:
    """Space on the store's filesystem, in bytes."""

    total: int
    free: int

@runtime_checkable
class Store(Protocol):
    """Keeps build results (snapshots of root filesystems), named caches and build logs.

    A result is a directory holding `rootfs/` (and whatever metadata the builder writes beside
    it), identified by the step id that produced it. Results are immutable once committed.

    Several processes may use one store at once, each with its own `Store` object: they take
    turns through `lock`, and `clean` removes only what crashed processes left.
    """

    @property
    def kind(self) -> str:
        """The store's kind, as in `KIND:PATH` (its key in `pipeline.obuilder.stores.KINDS`)."""
        ...

    root: Path
    """The directory (or mount point) holding the store; for a store keeping its results in a
    container engine (docker), the directory of its host-side state."""

    state_dir: Path
    """`root / STATE_DIR`, whatever the kind: where the store's users keep their own state
    beside it (the result table, the sandbox's bundles, the registry's layers), each in a
    subdirectory of its own. It exists, private (mode 0700), once the store object is made, and
    is shared by every process using the store. Its place is fixed so that it can be found from
    `root` alone, without opening the store (`setup.sandbox_dir`)."""

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """Make result `id` by running `fn(tmpdir)` on a writable copy of result `base`.

        `tmpdir` is a fresh directory: a snapshot of `base`'s result directory, or empty when
        `base` is None. If `fn` returns, `tmpdir` is committed atomically as `id`; if it raises,
        nothing is recorded (the temporary copy is removed) and the exception propagates, so a
        later call may try again. A crash at any point leaves either no result or a complete one;
        leftovers are removed by the next start-up. The caller promises to hold `lock(id)`
        (so no other process builds `id` at once), not to build an `id` that already exists,
        and that `base` exists.
        """
        ...

    def lock(self, id: str, *, shared: bool = False) -> FileLock:
        """The lock of step `id`, shared by every process using the store (not yet taken).

        Held exclusively while looking for result `id` and building it if missing (so that a
        step needed by two processes at once runs once), and while deleting it; held shared
        while building on it (so that it is not deleted meanwhile).
        """
        ...

    async def result(self, id: str) -> Path | None:
        """The directory of result `id`, or None if there is no such result. Its `rootfs` is
        there to read as long as this store object is open (an overlayfs store mounts a view
        of it, held until `close`)."""
        ...

    async def has_result(self, id: str) -> bool:
        """Whether result `id` is in the store. Unlike `result`, it makes nothing readable: a
        cache lookup needs no more (an overlayfs store would mount a view for `result`)."""
        ...

    async def results(self) -> list[str]:
        """The ids of the committed results, sorted. Results that other processes commit or
        delete while this runs may or may not be listed; builds in progress never are."""
        ...

    async def mark_used(self, ids: Iterable[str]) -> None:
        """Note that results `ids` were used just now (cache hits), so that pruning removes the
        least recently used results first; one call notes them all at once. A store that keeps
        no record of use does nothing (the backends: `DbStore` keeps the record); an unknown id
        is ignored. The caller promises nothing about locks: a use noted for a result deleted
        meanwhile is lost."""
        ...

    async def delete(self, id: str) -> None:
        """Remove result `id` (and its log) if present. Results built on it are not touched
        here: removing descendants is the caller's job (the result database knows them)."""
        ...

    def log_file(self, id: str) -> Path:
        """Where the log of step `id` is kept (inside the result directory once committed)."""
        ...

    def cache(self, name: str, uid: int, gid: int) -> AbstractAsyncContextManager[Path]:
        """A writable copy of the named cache, created empty and owned by `uid:gid` if new.

        On leaving the context the copy replaces the shared cache atomically (last writer wins:
        two builds updating the same cache at once each start from the version they saw, and the
        later release is what remains). If the block raises, the copy is discarded.
        """
        ...

    async def delete_cache(self, name: str) -> None:
        """Remove the named cache; copies in use are unaffected and discarded on release."""
        ...

    async def df(self) -> DiskUsage:
        """Size and free space of the store's filesystem."""
        ...

    async def clean(self) -> None:
        """Remove temporary state left by crashed processes (unfinished builds whose step lock
        is free, cache copies of processes that have gone); what live processes hold stays."""
        ...

    def close(self) -> None:
        """Let go of what this object holds (locks, mounts), blocking until done; nothing
        it mounted stays mounted unless another process uses it. Called at exit if not
        before; the store must not be used afterwards."""
        ...

@dataclass(frozen=True)
class Mount:
    """A bind mount into the sandbox: `src` on the host at `dst` inside."""

    src: Path
    dst: str
    readonly: bool = False

@dataclass(frozen=True)
class Secret:
    """A value the command reads as the file `dst`: read-only, mode 0400, owned by its user.

    The sandbox keeps it out of the rootfs and off any file system the host can see, and it
    does not outlive the command."""

    value: bytes = field(repr=False)
    dst: str

@dataclass(frozen=True)
class SandboxConfig:
    """One command to run in a sandbox.

    `argv` is the full command (shell included); `cwd` is inside the rootfs; `uid`/`gid` the
    user; `env` the whole environment; `network` is True only for `(network host)`; `secrets`
    are mounted after `mounts`.
    """

    argv: Sequence[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[Mount] = ()
    network: bool = False
    hostname: str = "builder"
    secrets: Sequence[Secret] = ()

class Log(Protocol):
    """Where a step's output goes: written as it arrives."""

    def write(self, data: bytes) -> None:
        """Append output."""
        ...

@runtime_checkable
class Sandbox(Protocol):
    """Runs a command isolated in a root filesystem."""

    async def run(
        self,
        config: SandboxConfig,
        rootfs: Path | str,
        *,
        log: Log,
        stdin: bytes | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        """Run `config` with `rootfs` as `/`, writing stdout and stderr to `log`; what the
        command changes is kept in `rootfs`.

        `rootfs` is a host directory (runc), or for a sandbox over a container engine the name
        of an image, which a command that succeeds replaces with one holding its changes.
        Returns when the process exits 0; raises BuildError naming the exit status otherwise.
        Setting `cancelled` kills the process (and everything it started) and raises
        asyncio.CancelledError; cancelling the calling task does the same.
        """
        ...

    async def clean(self) -> None:
        """Kill and remove what crashed processes using the same state left (commands still
        running, their working files); what live processes are running stays."""
        ...

    def close(self) -> None:
        """Let go of what this object holds; it must not be used afterwards. Called at exit
        if not before."""
        ...

@dataclass(frozen=True)
class ImageInfo:
    """What a fetcher learnt about the image it unpacked."""

    env: Mapping[str, str]
    digest: str | None = None

@runtime_checkable
class Fetcher(Protocol):
    """Turns an image reference (`(from IMAGE)`) into a root filesystem."""

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """Unpack `image` into the empty directory `rootfs`; return its environment.

        Raises BuildError (one line naming the image) for an unknown image.
        """
        ...


@runtime_checkable
class Workspace(Protocol):
    """The root filesystem of one step while `Store.build` makes it: all that the builder's
    work does to it. A workspace serves one step, one call at a time; what its calls leave is
    the step's result once `Store.build` commits, and nothing of it stays if the step fails.

    Every path inside the rootfs is resolved as if the rootfs were `/`: whatever earlier steps
    put there (a symlink to a host path, say), no call reads or writes outside it.
    """

    async def unpack(self, fetcher: Fetcher, image: str, *, log: Log) -> ImageInfo:
        """Make the (empty) rootfs the image `image`, as `fetcher` unpacks it; the image's
        information. Raises what `Fetcher.fetch` raises."""
        ...

    async def run(self, config: SandboxConfig, *, log: Log) -> None:
        """Run `config` in the sandbox over the rootfs, keeping what it changes; fails and is
        cancelled as `Sandbox.run` is."""
        ...

    async def write(self, plan: Manifest, uid: int, gid: int) -> None:
        """Copy the files of a `copy` step into the rootfs, owned by `uid:gid`, as
        `Manifest.write` describes; raises BuildError as it does."""
        ...

    async def read(self, path: str) -> bytes:
        """The content of the regular file at the absolute `path`. Raises BuildError saying
        `no PATH` if there is none, `PATH is not a regular file`, or `PATH: REASON`."""
        ...


@runtime_checkable
class Workspaces(Protocol):
    """Where a builder's steps work: a `Workspace` per step, and the files of results."""

    def workspace(self, directory: Path, id: str) -> Workspace:
        """The workspace of step `id`, which `Store.build` is making in `directory` (the
        temporary result directory it gave the step's function)."""
        ...

    def files(self, result: Path, id: str) -> AbstractAsyncContextManager[Path]:
        """A host directory holding the rootfs of the committed result `id` (whose directory
        is `result`), to read from until the block ends (the files a `copy` takes from a
        stage). Raises BuildError if the rootfs cannot be read."""
        ...
