"""The docker sandbox: each command runs in a container of a container engine (docker or
podman, see `container_engine.py`) started from an image, as OBuilder's Docker sandbox does; it
is also the `Workspaces` of the docker store's steps, whose root filesystems are images.

`run(config, image)` makes a container of the image (`ENGINE create`) with the step's user,
workdir, whole environment (nothing the engine would add), OBuilder's capability set
(`runc.CAPABILITIES`), hostname `builder`, no network unless `(network host)` (`--network
none`, else `--network host`) and the engine's own seccomp profile; makes the workdir if it is
missing (root's, mode 0755, as runc does: podman refuses a missing one); then starts it attached
(`ENGINE start --attach`). A command that exits 0 has its container committed over the image's
tag. The container, named `PREFIX-Run-TOKEN-N`, is always removed; cancelling kills it first.

Caches are the store's volumes, mounted by their host directory. Secrets are files (mode 0400,
owned by the step's user) in a private directory of the state directory, bound read-only at
their targets and removed when the command ends; a bind mount is never part of a commit, so no
secret is ever in an image. Unlike the runc sandbox's, their values are on the host's disk while
the command runs (and until `clean` if the builder is killed), and the mount points the engine
makes for caches and secrets stay in the result as empty files and directories.

The workspace of a step (`workspace`) unpacks a base by importing the fetched rootfs (`tar` into
`ENGINE import`); copies files by streaming a tar of them into a container that never starts
(`ENGINE cp - C:DIR`, owners kept), after finding which directories on the way are missing
(those are made owned by the step's user, the others are left as they are); and reads a file
with `ENGINE cp C:PATH -`, following symlinks inside the image. A stage's files (`files`) are
the whole filesystem of its image (`ENGINE export`), unpacked with `fetchers.unpack` into a
private directory.

Several processes may share a state directory (they share the store): each names what it makes
there and in the engine after its owner token, and `clean` removes what processes that have
gone left, running containers included.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import tarfile
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pipeline.obuilder.container_engine import ContainerEngine, Names, summary
from pipeline.obuilder.fetchers.unpack import extract
from pipeline.obuilder.locks import Owner, is_live_owner
from pipeline.obuilder.manifest import Dir, Entry, File, Symlink
from pipeline.obuilder.protocols import (
    BuildError,
    Fetcher,
    ImageInfo,
    Log,
    SandboxConfig,
)
from pipeline.obuilder.sandboxes.process import exit_error, supervise, to_the_end
from pipeline.obuilder.sandboxes.runc import CAPABILITIES
from pipeline.obuilder.stores.common import failure
from pipeline.obuilder.stores.common import run as run_tool

if TYPE_CHECKING:
    from pipeline.obuilder.manifest import Manifest

OWNER = "owner"
"""The subdirectory of the state directory holding the owner locks of the processes using it."""
NOFILE = 1024
"""The open-file limit of a command, as in the runc sandbox."""
NPROC = 4096
"""The process limit of a command (counted per user, over the host). Given explicitly: the
engines' defaults may exceed what their processes may set, and podman then fails to start any
container ("error setting rlimit")."""
MAX_READ = 64 * 2**20
"""The largest file the builder reads from an image (`/etc/passwd`)."""
_MAX_SYMLINKS = 40
_CHUNK = 1 << 16
# The engine's words when `cp` finds nothing at a path (podman's, then docker's).
_MISSING = re.compile(r"could not be found|could not find|no such file", re.IGNORECASE)


def _mount(source: Path, target: str, readonly: bool) -> str:
    """A `--mount` option binding `source` at `target`, each field quoted as CSV (the engines
    parse it so) so that no target can add options of its own."""
    if not target.startswith("/"):
        raise BuildError(f"mount target {target!r} is not an absolute path")
    fields = ["type=bind", f"source={source}", f"target={target}"]
    if readonly:
        fields.append("readonly")
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(fields)
    return line.getvalue()


class _Hashing:
    """A file read for a tar member, hashing what is read."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.sha256.update(data)
        return data


def _write_archive(archive: Path, missing: Sequence[str], items: Sequence[tuple[Entry, str]],
                   src_dir: Path, uid: int, gid: int) -> None:
    """Write to `archive` a tar of the directories `missing` (each inside the one before),
    then of `items` (entries of a manifest, each under its name) inside the last of them, all
    owned by `uid:gid`, with the modes `Manifest.write` gives. Raises BuildError if a file
    changed since the manifest hashed it."""
    now = time.time()

    def header(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, now
        return info

    def add(tar: tarfile.TarFile, entry: Entry, name: str) -> None:
        if isinstance(entry, Dir):
            tar.addfile(header(name, tarfile.DIRTYPE, 0o755))
            for child in entry.entries:
                add(tar, child, posixpath.join(name, posixpath.basename(child.path)))
        elif isinstance(entry, Symlink):
            info = header(name, tarfile.SYMTYPE, 0o777)
            info.linkname = entry.target
            tar.addfile(info)
        else:
            _add_file(tar, header(name, tarfile.REGTYPE, 0o755 if entry.executable else 0o644),
                      entry, src_dir)

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        top = ""
        for part in missing:
            top = posixpath.join(top, part)
            tar.addfile(header(top, tarfile.DIRTYPE, 0o755))
        for entry, name in items:
            add(tar, entry, posixpath.join(top, name))


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: File, src_dir: Path) -> None:
    changed = BuildError(f"copy: {json.dumps(entry.path)} changed during the build")
    with open(src_dir / entry.path, "rb") as file:
        info.size = os.fstat(file.fileno()).st_size
        reader = _Hashing(file)
        try:
            tar.addfile(info, reader)  # type: ignore[arg-type]
        except OSError:
            raise changed from None  # it shrank
        if reader.sha256.hexdigest() != entry.sha256 or file.read(1):
            raise changed


def _first_member(data: bytes, content: bool) -> tuple[tarfile.TarInfo, bytes] | None:
    """The first member of the start of a tar stream `data` and, if asked for and it is a
    regular file, its content; None if `data` does not hold that much yet."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            member = tar.next()
            if member is None:
                return None
            if not (content and member.isreg()):
                return member, b""
            extracted = tar.extractfile(member)
            assert extracted is not None
            return member, extracted.read()
    except (tarfile.TarError, EOFError):
        return None


def _unpack(archive: Path, directory: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            extract(tar, directory)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise BuildError(f"cannot unpack an exported image ({e})") from None


class DockerSandbox:
    """Runs commands in containers of `engine`, the engine of the docker store whose names are
    `names`, keeping its own files (secrets, archives being copied) in `state_dir`.

    `memory` (bytes) and `cpus` (a number of CPUs, fractions allowed) limit each command
    (`--memory`, `--cpus`). Raises ValueError for a limit that is not positive.
    """

    def __init__(self, state_dir: Path, engine: ContainerEngine, names: Names, *,
                 memory: int | None = None, cpus: float | None = None) -> None:
        if memory is not None and memory <= 0:
            raise ValueError(f"memory limit must be positive, not {memory}")
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpu limit must be positive, not {cpus}")
        self.state_dir = state_dir
        self.engine = engine
        self.names = names
        self.memory = memory
        self.cpus = cpus
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._owners = state_dir / OWNER
        self._owner = Owner(self._owners)
        self._count = itertools.count()
        self._finalizer = weakref.finalize(self, self._owner.release)

    def close(self) -> None:
        """See `Sandbox.close`: gives up the owner token."""
        self._finalizer()

    def _unique(self) -> str:
        """`TOKEN-N`: unique among every process sharing the state directory."""
        return f"{self._owner.token}-{next(self._count)}"

    def _private(self, what: str) -> Path:
        """A new private directory `STATE/TOKEN-N-what`."""
        path = self.state_dir / f"{self._unique()}-{what}"
        path.mkdir(mode=0o700)
        return path

    async def clean(self) -> None:
        """See `Sandbox.clean`: kills and removes the store's containers whose owner has gone,
        and removes their files in the state directory."""
        for name in await self.engine.containers(self.names.run):
            if not is_live_owner(self._owners, name.removeprefix(self.names.run)):
                await self.engine.quietly("kill", name)
                await self.engine.remove_container(name)
        for entry in sorted(await asyncio.to_thread(os.listdir, self.state_dir)):
            if entry != OWNER and not is_live_owner(self._owners, entry):
                await asyncio.to_thread(shutil.rmtree, self.state_dir / entry, True)

    # Running commands.

    async def run(
        self,
        config: SandboxConfig,
        rootfs: Path | str,
        *,
        log: Log,
        stdin: bytes | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        """See `Sandbox.run`: `rootfs` names an image, whose tag the container is committed
        over when the command exits 0 (the image it named before is left as it is).

        Raises BuildError for a non-zero status ("command exited with status N", "command
        killed by SIGNAME") or, naming the engine and its message, when the engine cannot run
        the command or commit it. Setting `cancelled`, or cancelling the calling task, kills
        the container and raises asyncio.CancelledError. In every case the container and the
        secrets' files are gone on return.
        """
        image = str(rootfs)
        name = f"{self.names.run}{self._unique()}"
        # The secrets' files, and the client's working directory: podman's conmon leaves a
        # file `oom` there when the kernel kills the command for lack of memory.
        scratch = self._private("run")
        try:
            await self.engine(*self._create_argv(config, name, image, scratch,
                                                 interactive=stdin is not None))
            # Made as runc makes it (root's, mode 0755) if missing: podman refuses to start
            # in a missing workdir, and docker would make it differently.
            await self._put(name, image, config.cwd, [], uid=0, gid=0, what="workdir")
            attach = ["--interactive"] if stdin is not None else []
            proc = await asyncio.create_subprocess_exec(
                self.engine.path, "start", "--attach", *attach, name, cwd=scratch,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            tail = _Tail(log)
            status = await supervise(proc, log=tail, stdin=stdin, cancelled=cancelled,
                                     stop=lambda: self._kill(name, proc))
            if status == 0:
                await self.engine.rename("commit", name, image)
            elif not await self._started(name):
                raise BuildError(f"{self.engine.name} could not run the command: "
                                 f"{summary(tail.data)}")
        finally:
            await to_the_end(self._discard(name, scratch))
        if status != 0:
            raise exit_error(status)

    def _create_argv(self, config: SandboxConfig, name: str, image: str, secrets: Path, *,
                     interactive: bool) -> list[str]:
        """The arguments of `ENGINE create` making the container of `config` (writing the
        secrets' files into `secrets`)."""
        argv = ["create", "--name", name, "--pull", "never",
                "--network", "host" if config.network else "none",
                "--hostname", config.hostname, "--workdir", config.cwd,
                "--user", f"{config.uid}:{config.gid}", "--cap-drop", "all",
                *(option for cap in CAPABILITIES for option in ("--cap-add", cap)),
                "--ulimit", f"nofile={NOFILE}:{NOFILE}", "--ulimit", f"nproc={NPROC}:{NPROC}",
                *self.engine.flavour.run]
        for key, value in config.env.items():
            argv += ["--env", f"{key}={value}"]
        for mount in config.mounts:
            argv += ["--mount", _mount(mount.src, mount.dst, mount.readonly)]
        for n, secret in enumerate(config.secrets):
            path = secrets / f"secret-{n}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o400)
            try:
                os.write(fd, secret.value)
                os.fchown(fd, config.uid, config.gid)
            finally:
                os.close(fd)
            argv += ["--mount", _mount(path, secret.dst, readonly=True)]
        if self.memory is not None:
            argv += ["--memory", str(self.memory)]
        if self.cpus is not None:
            argv += ["--cpus", str(self.cpus)]
        if interactive:
            argv.append("--interactive")
        return [*argv, image, *config.argv]

    async def _kill(self, name: str, proc: asyncio.subprocess.Process) -> None:
        """Kill the container `name` until the client `proc` running it has exited (the engine
        may not have made the container yet when asked first)."""
        while proc.returncode is None:
            await self.engine.quietly("kill", name)
            try:
                await asyncio.wait_for(proc.wait(), 0.1)
            except TimeoutError:
                continue

    async def _started(self, name: str) -> bool:
        """Whether the container `name` exists and its command was started (a failure is then
        the command's, not the engine's)."""
        try:
            state = await self.engine("inspect", "--format", "{{.State.Status}}", name)
        except BuildError:
            return False
        return state.strip() not in (b"", b"created")

    async def _discard(self, name: str, scratch: Path) -> None:
        await self.engine.remove_container(name)
        await asyncio.to_thread(shutil.rmtree, scratch, True)

    # Containers that never start, for copying files in and out.

    @asynccontextmanager
    async def _container(self, image: str) -> AsyncIterator[str]:
        name = f"{self.names.run}{self._unique()}"
        try:
            await self.engine("create", "--pull", "never", "--network", "none", "--name", name,
                              image, "true")
            yield name
        finally:
            await to_the_end(self.engine.remove_container(name))

    async def _peek(self, container: str, path: str, *,
                    content: bool) -> tuple[tarfile.TarInfo, bytes] | None:
        """What is at the absolute `path` in `container`, symlinks followed inside it (podman
        follows them itself, docker gives the link): its tar header and, if asked for and it
        is a regular file, its content (b"" otherwise). None if nothing is there.

        `ENGINE cp C:PATH -` is read only as far as needed, then stopped: a directory is known
        by its first header, however much it holds. Raises BuildError for a file larger than
        `MAX_READ`, a symlink loop or another failure of the engine."""
        for _ in range(_MAX_SYMLINKS + 1):
            found = await self._first(container, path, content)
            if found is None or not found[0].issym():
                return found
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path),
                                                     found[0].linkname))
        raise BuildError(f"{path}: too many levels of symbolic links")

    async def _first(self, container: str, path: str,
                     content: bool) -> tuple[tarfile.TarInfo, bytes] | None:
        process = await asyncio.create_subprocess_exec(
            self.engine.path, "cp", f"{container}:{path}", "-", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        data = bytearray()
        try:
            while chunk := await process.stdout.read(_CHUNK):
                data += chunk
                found = _first_member(bytes(data), content)
                if found is not None:
                    return found
                if len(data) > MAX_READ:
                    raise BuildError(f"{path} is larger than {MAX_READ // 2**20} MiB")
            stderr = await process.stderr.read()
            if await process.wait() != 0:
                message = summary(stderr)
                if _MISSING.search(message):
                    return None
                raise failure(f"{self.engine.name} cp failed", message)
            return None
        finally:
            # Stopped half-way when the first member was enough: removing the container
            # releases what the engine held for the copy.
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def import_rootfs(self, rootfs: Path, image: str) -> None:
        """Make the host directory `rootfs` the image `image` (owners, modes, links, devices
        and extended attributes kept)."""
        scratch = self._private("import")
        try:
            archive = scratch / "rootfs.tar"
            await run_tool("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C",
                           rootfs, "-cf", archive, ".")
            await self.engine.rename("import", str(archive), image)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def copy_in(self, plan: Manifest, uid: int, gid: int, image: str) -> None:
        """Copy the files of `plan` into the image `image` (see `Workspace.write`): each
        source's directory (the destination itself for a directory, else its parent) is
        looked for, its missing parts are made owned by `uid:gid`, and the source is written
        into it; the container is then committed over `image`."""
        async with self._container(image) as container:
            for entry, target in zip(plan.sources, plan.targets, strict=True):
                if isinstance(entry, Dir):
                    items = [(child, posixpath.basename(child.path)) for child in entry.entries]
                    await self._put(container, image, target, items, plan.src_dir, uid=uid,
                                    gid=gid)
                else:
                    await self._put(container, image, posixpath.dirname(target),
                                    [(entry, posixpath.basename(target))], plan.src_dir,
                                    uid=uid, gid=gid)
            await self.engine.rename("commit", container, image)

    async def _put(self, container: str, image: str, directory: str,
                   items: Sequence[tuple[Entry, str]], src_dir: Path = Path("/"), *, uid: int,
                   gid: int, what: str = "copy") -> None:
        """Write `items` (read from `src_dir`) into `directory` of `container` (made of
        `image`), making the directory and those above it that are missing (owned by
        `uid:gid`, mode 0755), and only those. Raises BuildError starting with `what` if a
        directory on the way is not one, or if the engine refuses the copy.

        What is there is looked for in a container of its own: `_peek` stops `cp` half-way,
        after which podman may fail to start or commit the container it copied from."""
        missing: list[str] = []
        where = directory
        scratch = self._private("copy")
        async with AsyncExitStack() as stack:
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, scratch, True)
            probe = None
            while True:
                refused = None
                if items or missing:
                    archive = scratch / "copy.tar"
                    await asyncio.to_thread(_write_archive, archive, missing, items, src_dir,
                                            uid, gid)
                    try:
                        with open(archive, "rb") as tar:
                            await self.engine("cp", *self.engine.flavour.keep_owners, "-",
                                              f"{container}:{where}", stdin=tar)
                        return
                    except BuildError as error:
                        refused = error
                if where == "/" and refused is None:
                    return
                if probe is None:
                    probe = await stack.enter_async_context(self._container(image))
                # The engine says the same when `where` is missing and when it is a file.
                found = await self._peek(probe, where, content=False)
                if found is None and where != "/":
                    missing.insert(0, posixpath.basename(where))
                    where = posixpath.dirname(where)
                    continue
                if found is not None and not found[0].isdir():
                    raise BuildError(f"{what}: {json.dumps(where)} in the rootfs is not a "
                                     f"directory")
                if refused is None:
                    return
                raise BuildError(f"{what}: {refused}") from refused

    async def read_file(self, image: str, path: str) -> bytes:
        """See `Workspace.read`, in the image `image`."""
        async with self._container(image) as container:
            found = await self._peek(container, path, content=True)
        if found is None:
            raise BuildError(f"no {path}")
        if not found[0].isreg():
            raise BuildError(f"{path} is not a regular file")
        return found[1]

    # Workspaces.

    def workspace(self, directory: Path, id: str) -> DockerWorkspace:
        """See `Workspaces.workspace`: the step's image, `localhost/PREFIX:ID` (its base's,
        until the step commits; see `stores.docker`)."""
        return DockerWorkspace(self, directory, self.names.result(id))

    @asynccontextmanager
    async def files(self, result: Path, id: str) -> AsyncIterator[Path]:
        """See `Workspaces.files`: the image of result `id`, exported and unpacked into a
        private directory removed when the block ends."""
        scratch = self._private("files")
        try:
            archive = scratch / "image.tar"
            async with self._container(self.names.result(id)) as container:
                with open(archive, "wb") as out:
                    await self.engine("export", container, stdout=out)
            rootfs = scratch / "rootfs"
            rootfs.mkdir()
            await asyncio.to_thread(_unpack, archive, rootfs)
            archive.unlink()
            yield rootfs
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)


class _Tail:
    """The log of a command, keeping the end of what it wrote (the engine's message, if the
    engine failed to run it)."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self.data = b""

    def write(self, data: bytes) -> None:
        self._log.write(data)
        self.data = (self.data + data)[-4096:]


class DockerWorkspace:
    """The rootfs of one step: the image `image` (see `Workspace`)."""

    def __init__(self, sandbox: DockerSandbox, directory: Path, image: str) -> None:
        self.sandbox = sandbox
        self.directory = directory
        self.image = image

    async def unpack(self, fetcher: Fetcher, image: str, *, log: Log) -> ImageInfo:
        """See `Workspace.unpack`: fetched into `rootfs/` of the step's directory (private),
        imported, then removed."""
        rootfs = self.directory / "rootfs"
        rootfs.mkdir()
        try:
            info = await fetcher.fetch(image, rootfs, log=log)
            await self.sandbox.import_rootfs(rootfs, self.image)
        finally:
            await asyncio.to_thread(shutil.rmtree, rootfs, True)
        return info

    async def run(self, config: SandboxConfig, *, log: Log) -> None:
        """See `Workspace.run`."""
        await self.sandbox.run(config, self.image, log=log)

    async def write(self, plan: Manifest, uid: int, gid: int) -> None:
        """See `Workspace.write`."""
        await self.sandbox.copy_in(plan, uid, gid, self.image)

    async def read(self, path: str) -> bytes:
        """See `Workspace.read`."""
        return await self.sandbox.read_file(self.image, path)
