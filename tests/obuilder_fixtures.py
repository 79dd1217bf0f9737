"""Expensive fixtures shared by the builder's tests: made once per session, real everywhere.

- `busybox_rootfs`: a directory holding a minimal rootfs (Debian's busybox-static plus its
  applet links, /etc/passwd and /etc/group), and `busybox_images`: a directory with that rootfs
  as `busybox.tar` (the `--image-dir` layout: image `busybox` -> `busybox.tar`).
- `btrfs_mount`, `xfs_mount`: loop-mounted filesystem images (xfs with reflink=1).
- `tmpfs_mount`: a tmpfs, for overlayfs.
- `new_store_root`: a fresh directory for a store of a given kind, on the filesystem it needs.
Each fails (never skips) when a tool is missing: CI installs them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.obuilder.log_format import MARK

BUSYBOX = Path("/bin/busybox")

STORE_FILESYSTEMS: dict[str, str | None] = {
    "btrfs": "btrfs_mount",
    "overlayfs": "tmpfs_mount",
    "xfs": "xfs_mount",
    "rsync": None,
}
"""The filesystem fixture stores of each kind (`pipeline.obuilder.stores.KINDS`) are tested on;
None: the test's own temporary directory. `test_stores` checks that every kind has one."""
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
    on the filesystem it needs: several per test may live side by side."""
    filesystem = STORE_FILESYSTEMS[kind.partition("-")[0]]
    parent = tmp_path if filesystem is None else request.getfixturevalue(filesystem)
    return Path(tempfile.mkdtemp(dir=parent, prefix="store-"))


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: apt-get install {package}")


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
