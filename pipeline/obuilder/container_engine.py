"""The container engine behind the docker store and sandbox, `docker` or `podman`, driven through
the Docker command line that both speak; and the names of what one store keeps in it.

A docker store is named by a PREFIX (`--store docker:PREFIX`). In the engine it keeps:

- results as images `localhost/PREFIX:ID` (ID the step id, a valid tag), a step being built
  too (until the store has its metadata, see `stores.docker`);
- named caches as volumes `PREFIX-Cache-NAME`, and the copies builds work on as volumes
  `PREFIX-Copy-TOKEN-N-NAME` (NAME escaped, see `escape`);
- the containers running commands, copying files in and reading files as `PREFIX-Run-TOKEN-N`.

A prefix is lower case (an image name's rule) and the markers `Cache`, `Copy` and `Run` are not,
so no two prefixes' names meet. TOKEN is the owner token of the process that made the thing
(`locks.Owner`): cleaning removes only what processes that have gone left.

The engine must run on this host: caches are volumes mounted by their host path, and secrets
bind mounts of host files.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.obuilder.locks import FileLock
from pipeline.obuilder.protocols import STATE_DIR, BuildError, MissingTool
from pipeline.obuilder.stores.common import LOCK, communicate, failure

ENGINES = ("docker", "podman")
DEFAULT_ENGINE = "docker"
"""The engine of a new store when none is chosen (an existing store keeps its own)."""

STATE_ENV = "PIPELINE_DOCKER_STATE"
"""The environment variable naming the directory holding the host-side state of docker stores
(one subdirectory per prefix); `DEFAULT_STATE` without it."""
DEFAULT_STATE = Path("/var/lib/pipeline/docker")

_PREFIX = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
MAX_PREFIX = 64
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SAFE = re.compile(r"[a-z0-9_.-]")
# How long a command that only asks the engine something may take: a guard, not a measure.
_ASK_TIMEOUT = 120
_LISTING_ATTEMPTS = 5
# The engines' words for a thing that another process removed while they looked at it.
_GONE = re.compile(r"not known|no such (image|container|volume)", re.IGNORECASE)


ENGINE_FILE = "engine"
"""The file in a docker store's state directory naming the engine its images are in."""


def recorded_engine(root: Path) -> str | None:
    """The engine the docker store at `root` was made with; None for a new store, or for a
    store of another kind (which records none)."""
    try:
        name = (root / STATE_DIR / ENGINE_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if name not in ENGINES:
        raise BuildError(f"{root / STATE_DIR / ENGINE_FILE} names no engine ({name!r})")
    return name


def store_engine(name: str, root: Path) -> ContainerEngine:
    """The engine `name` as the docker store at `root` and its sandbox use it: its name changes
    hold the store's lock `ROOT/state/lock/names`."""
    return ContainerEngine(name, root / STATE_DIR / LOCK / "names")


def state_base() -> Path:
    """Where docker stores keep their host-side state: `$PIPELINE_DOCKER_STATE`, or
    `/var/lib/pipeline/docker`."""
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE)


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it can name a docker store's images; raise BuildError otherwise."""
    if len(prefix) > MAX_PREFIX or not _PREFIX.fullmatch(prefix):
        raise BuildError(f"invalid docker store prefix {prefix!r}: use at most {MAX_PREFIX} "
                         f"lower-case letters and digits, separated by single '.', '_' or "
                         f"'-' (e.g. pipeline-test)")
    return prefix


def check_id(id: str) -> str:
    """Return `id` if it can be an image tag; raise BuildError otherwise."""
    if not _TAG.fullmatch(id):
        raise BuildError(f"invalid result id {id!r}: it must be an image tag (letters, digits, "
                         f"'_', '.' and '-', at most 128)")
    return id


def escape(name: str) -> str:
    """`name` (a cache name, hostile) as part of a volume name: lower-case letters, digits,
    `_`, `.` and `-` are kept, every other byte of its UTF-8 form is `X` and two upper-case hex
    digits. Upper case is never kept, so two names never escape alike."""
    return "".join(char if _SAFE.fullmatch(char) else "".join(f"X{b:02X}" for b in
                                                             char.encode())
                   for char in name)


@dataclass(frozen=True)
class Names:
    """The names of what the docker store `prefix` keeps in its engine (see the module)."""

    prefix: str

    @property
    def repository(self) -> str:
        """The repository of the results' images."""
        return f"localhost/{self.prefix}"

    def result(self, id: str) -> str:
        """The image of result `id`."""
        return f"{self.repository}:{check_id(id)}"

    @property
    def run(self) -> str:
        """What the names of the store's containers start with (then `TOKEN-N`)."""
        return f"{self.prefix}-Run-"

    def cache(self, name: str) -> str:
        """The volume of the named cache `name`."""
        return f"{self.prefix}-Cache-{escape(name)}"

    @property
    def copy(self) -> str:
        """What the names of cache copies' volumes start with (then `TOKEN-N-NAME`)."""
        return f"{self.prefix}-Copy-"


@dataclass(frozen=True)
class _Flavour:
    """What differs between the engines' command lines."""

    package: str
    storage: str
    """`info --format` template printing the directory holding the engine's images."""
    keep_owners: tuple[str, ...]
    """`cp` options keeping the owners a tar stream gives its files."""
    run: tuple[str, ...]
    """Options of `run` that make a container's environment the one given, nothing added."""


_FLAVOURS = {
    "docker": _Flavour("docker.io", "{{.DockerRootDir}}", ("--archive",), ()),
    "podman": _Flavour("podman", "{{.Store.GraphRoot}}", ("--archive=false",),
                       ("--unsetenv-all",)),
}


def summary(stderr: bytes) -> str:
    """The engine's error message in one line: its last line, without podman's dump of the
    request it failed (everything up to the last `}: `) nor an `Error: ` prefix."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "no message")
    return last.rpartition("}: ")[2].removeprefix("Error: ").removeprefix("Error response "
                                                                         "from daemon: ")


class ContainerEngine:
    """One container engine (`docker` or `podman`), run as its command-line client.

    The commands that change the names of images (`tag`, `rmi`, `commit` and `import` with a
    name) go through `rename`, which holds the lock file `names_lock` (shared by every process
    using the store; none if None): podman loses one of two names given to an image at once.

    Raises BuildError for another name, MissingTool naming the Debian package (and, for docker,
    `--engine podman`) if the client is not installed. Nothing is asked of the engine until
    `check` or a call.
    """

    def __init__(self, name: str, names_lock: Path | None = None) -> None:
        self.names_lock = names_lock
        if name not in _FLAVOURS:
            raise BuildError(f"unknown engine {name!r}: expected {' or '.join(ENGINES)}")
        self.name = name
        self.flavour = _FLAVOURS[name]
        path = shutil.which(name)
        if path is None:
            other = ", or use --engine podman" if name != "podman" else ""
            raise MissingTool(f"{name} not found: apt-get install {self.flavour.package}{other}")
        self.path = path

    def check(self) -> Path:
        """Ask the engine where it keeps its images (blocking), which also shows that it
        answers. Raises BuildError saying what to do when it does not."""
        try:
            done = subprocess.run([self.path, "info", "--format", self.flavour.storage],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=_ASK_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            reason = "no answer" if done is None else summary(done.stderr)
            if self.name == "podman":
                raise BuildError(f"podman does not work ({reason}): see 'podman info'")
            raise BuildError(f"the docker engine is not reachable ({reason}): start it (apt-get "
                             f"install {self.flavour.package} provides it), or use --engine "
                             f"podman")
        return Path(done.stdout.decode(errors="replace").strip())

    async def __call__(self, *args: str, stdin: IO[bytes] | None = None,
                       stdout: IO[bytes] | None = None) -> bytes:
        """Run `ENGINE ARGS` to completion; its standard output (b"" when sent to the file
        `stdout`). `stdin` is a file to read from (default: nothing).

        Raises BuildError naming the command with the engine's message (with an OSError cause
        when it says the disk is full, see `stores.common.failure`). Cancelling the caller
        kills the client before the cancellation goes on.
        """
        process = await asyncio.create_subprocess_exec(
            self.path, *args, stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        output, stderr = await communicate(process)
        if process.returncode != 0:
            raise failure(f"{self.name} {args[0]} failed", summary(stderr))
        return output or b""

    async def rename(self, *args: str, stdin: IO[bytes] | None = None) -> bytes:
        """`ENGINE ARGS`, a command changing image names, holding `names_lock` (see the
        class)."""
        if self.names_lock is None:
            return await self(*args, stdin=stdin)
        async with FileLock(self.names_lock):
            return await self(*args, stdin=stdin)

    async def quietly(self, *args: str) -> bool:
        """Run `ENGINE ARGS`, its output discarded; whether it succeeded (for removals that may
        find nothing to remove)."""
        process = await asyncio.create_subprocess_exec(
            self.path, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await process.wait() == 0

    async def lines(self, *args: str) -> list[str]:
        """The non-empty lines `ENGINE ARGS` prints (a listing). A listing that fails because
        something listed went meanwhile (podman's `images` then cannot find an image's parent)
        is asked for again, a few times."""
        for attempt in range(_LISTING_ATTEMPTS):
            try:
                output = await self(*args)
                break
            except BuildError as error:
                if attempt == _LISTING_ATTEMPTS - 1 or not _GONE.search(str(error)):
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        return [line for line in output.decode(errors="replace").splitlines() if line.strip()]

    async def image_exists(self, image: str) -> bool:
        """Whether `image` is in the engine."""
        return await self.quietly("image", "inspect", "--format", "{{.Id}}", image)

    async def tags(self, *repositories: str) -> set[str]:
        """`REPOSITORY:TAG` of every image of `repositories`."""
        listing = await self.lines("images", "--format", "{{.Repository}}:{{.Tag}}")
        return {ref for ref in listing if ref.rpartition(":")[0] in repositories}

    async def untag(self, images: Sequence[str]) -> None:
        """Remove the names `images` (the images too, once nothing else names or uses them).
        Raises BuildError if one is there and cannot be removed."""
        for image in images:
            try:
                await self.rename("rmi", image)
            except BuildError:
                if await self.image_exists(image):
                    raise

    async def containers(self, start: str) -> list[str]:
        """The names of the containers whose names start with `start`, running or not."""
        return [name for name in await self.lines("ps", "-a", "--format", "{{.Names}}")
                if name.startswith(start)]

    async def remove_container(self, name: str) -> None:
        """Remove the stopped container `name`, if there is one. (Kill a running one first: `rm
        -f` may give its command time to stop, podman up to 10 s.)"""
        if not await self.quietly("rm", "-f", name) and name in await self.containers(name):
            await self("rm", "-f", name)

    async def volumes(self, start: str) -> list[str]:
        """The names of the volumes whose names start with `start`."""
        return [name for name in await self.lines("volume", "ls", "--format", "{{.Name}}")
                if name.startswith(start)]

    async def volume_path(self, name: str) -> Path | None:
        """The host directory holding the volume `name`'s files, or None if there is none."""
        try:
            found = await self("volume", "inspect", "--format", "{{.Mountpoint}}", name)
        except BuildError:
            if name in await self.volumes(name):
                raise
            return None
        return Path(found.decode().strip())

    async def remove_volume(self, name: str) -> None:
        """Remove the volume `name`, if there is one."""
        if not await self.quietly("volume", "rm", "-f", name) and name in await self.volumes(
                name):
            await self("volume", "rm", "-f", name)
