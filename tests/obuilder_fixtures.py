"""Expensive fixtures shared by the builder's tests: made once per session, real everywhere.

- `busybox_rootfs`: a directory holding a minimal rootfs (Debian's busybox-static plus its
  applet links, /etc/passwd and /etc/group), and `busybox_images`: a directory with that rootfs
  as `busybox.tar` (the `--image-dir` layout: image `busybox` -> `busybox.tar`).
- `btrfs_mount`, `xfs_mount`: loop-mounted filesystem images (xfs with reflink=1).
- `tmpfs_mount`: a tmpfs, for overlayfs.
- `context`: a build context (`hello.txt`, `src/` with an executable and a `_build/` to exclude).
- `new_store_root`: a fresh directory for a store of a given kind, on the filesystem it needs
  (for a docker store: its state directory, named after a fresh prefix, see `new_docker_root`).
Each fails (never skips) when a tool is missing: CI installs them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.obuilder.container_engine import STATE_ENV, Names
from pipeline.obuilder.log_format import MARK

BUSYBOX = Path("/bin/busybox")

STORE_FILESYSTEMS: dict[str, str | None] = {
    "btrfs": "btrfs_mount",
    "overlayfs": "tmpfs_mount",
    "xfs": "xfs_mount",
    "rsync": None,
}
"""The filesystem fixture stores of each kind (`pipeline.obuilder.stores.KINDS`) are tested on;
None: the test's own temporary directory. `test_stores` checks that every kind has one, but
`docker`, whose results are images (`new_docker_root`)."""
DOCKER_ENGINE = "podman"
"""The engine the docker store and sandbox are tested on: Docker's engine does not run here."""
_ENGINE_PATH = shutil.which(DOCKER_ENGINE) or DOCKER_ENGINE
"""Found once: a test may change PATH before its engine objects are removed."""
# Only a guard against a hung test, never a measurement.
HANG_GUARD = 60


class RecordingLog:
    """A build or sandbox log that keeps everything and lets a test wait for some text."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._changed = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data
        self._changed.set()

    __call__ = write

    @property
    def text(self) -> str:
        """The log as a person reads it: without the builder's markers (`log_format.MARK`)."""
        return self.data.replace(MARK, b"").decode()

    async def wait_for(self, text: str) -> None:
        async with asyncio.timeout(HANG_GUARD):
            while text not in self.text:
                self._changed.clear()
                await self._changed.wait()


def new_store_root(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh, empty directory for a store of `kind` (`KIND` or `KIND-MODE`, as `rsync-hardlink`),
    on the filesystem it needs: several per test may live side by side. For `docker`, the root of
    a new docker store (`new_docker_root`), which opening the store makes."""
    if kind == "docker":
        return new_docker_root(request, tmp_path)
    filesystem = STORE_FILESYSTEMS[kind.partition("-")[0]]
    parent = tmp_path if filesystem is None else request.getfixturevalue(filesystem)
    return Path(tempfile.mkdtemp(dir=parent, prefix="store-"))


def new_docker_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The root of a new docker store, `BASE/PREFIX` with a fresh prefix, where BASE (under
    `tmp_path`) is `$PIPELINE_DOCKER_STATE` for the test. What the store puts in the engine
    (images, containers, volumes) is removed when the test ends."""
    require(DOCKER_ENGINE, DOCKER_ENGINE)
    base = tmp_path / "docker-state"
    base.mkdir(exist_ok=True)
    request.getfixturevalue("monkeypatch").setenv(STATE_ENV, str(base))
    prefix = f"pipeline-test-{secrets.token_hex(6)}"
    request.addfinalizer(lambda: remove_from_engine(Names(prefix)))
    return base / prefix


def engine_lines(*args: str) -> list[str]:
    """What `ENGINE ARGS` prints, a line each. Asked again, as the docker store asks, when the
    engine fails because another process removed something it was listing."""
    for attempt in range(5):
        done = subprocess.run([_ENGINE_PATH, *args], capture_output=True, text=True)
        if done.returncode == 0 or "not known" not in done.stderr or attempt == 4:
            break
    done.check_returncode()
    return done.stdout.split()


def engine_things(names: Names) -> dict[str, list[str]]:
    """What the docker store of `names` has in the engine: containers, images and volumes (cache
    copies included), by kind."""
    images = [ref for ref in engine_lines("images", "--format", "{{.Repository}}:{{.Tag}}")
              if ref.rpartition(":")[0] == names.repository]
    volumes = [name for name in engine_lines("volume", "ls", "--format", "{{.Name}}")
               if name.startswith((names.cache(""), names.copy))]
    containers = [name for name in engine_lines("ps", "-a", "--format", "{{.Names}}")
                  if name.startswith(names.run)]
    return {"containers": sorted(containers), "images": sorted(images),
            "volumes": sorted(volumes)}


def remove_from_engine(names: Names) -> None:
    """Remove everything the docker store of `names` has in the engine."""
    things = engine_things(names)
    for name in things["containers"]:
        subprocess.run([_ENGINE_PATH, "kill", name], check=False, capture_output=True)
    for command, kind in ((["rm", "-f"], "containers"), (["rmi", "-f"], "images"),
                          (["volume", "rm", "-f"], "volumes")):
        if things[kind]:
            subprocess.run([_ENGINE_PATH, *command, *things[kind]], check=False,
                           capture_output=True)


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: apt-get install {package}")


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "context"
    (ctx / "src" / "_build").mkdir(parents=True)
    (ctx / "hello.txt").write_text("hello\n")
    (ctx / "src" / "main.ml").write_text("let () = print_endline \"hi\"\n")
    (ctx / "src" / "_build" / "main.exe").write_text("stale\n")
    (ctx / "src" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "src" / "run.sh").chmod(0o755)
    return ctx


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.exists():
        pytest.fail("busybox not found: apt-get install busybox-static")
    rootfs = tmp_path_factory.mktemp("busybox") / "rootfs"
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "home",
                      "proc", "dev", "sys"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    listing = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in listing:
        link = rootfs / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nopam:x:1000:1000:opam:/home/opam:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nopam:x:1000:\nnogroup:x:65534:\n")
    (rootfs / "home" / "opam").mkdir()
    os.chown(rootfs / "home" / "opam", 1000, 1000)
    return rootfs


@pytest.fixture(scope="session")
def busybox_images(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("images")
    with tarfile.open(images / "busybox.tar", "w") as tar:
        tar.add(busybox_rootfs, arcname=".")
    return images


def _loop_mount(image: Path, mount_point: Path, mkfs: list[str]) -> Iterator[Path]:
    with open(image, "wb") as f:
        f.truncate(1024 * 1024 * 1024)
    run(*mkfs, image)
    mount_point.mkdir()
    run("mount", "-o", "loop", image, mount_point)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require("mkfs.btrfs", "btrfs-progs")
    base = tmp_path_factory.mktemp("btrfs")
    yield from _loop_mount(base / "fs.img", base / "mnt", ["mkfs.btrfs", "-q"])


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require("mkfs.xfs", "xfsprogs")
    base = tmp_path_factory.mktemp("xfs")
    yield from _loop_mount(base / "fs.img", base / "mnt", ["mkfs.xfs", "-q", "-m", "reflink=1"])


@pytest.fixture(scope="session")
def tmpfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount_point = tmp_path_factory.mktemp("tmpfs")
    run("mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", mount_point)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="session")
def xfs_noreflink_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An xfs made without reflink support (which the xfs store must refuse)."""
    require("mkfs.xfs", "xfsprogs")
    base = tmp_path_factory.mktemp("xfs-noreflink")
    yield from _loop_mount(base / "fs.img", base / "mnt", ["mkfs.xfs", "-q", "-m", "reflink=0"])
