"""The debootstrap fetcher: image names, mirror discovery, errors, and one real Debian 12.

debootstrap takes about half a minute, so it runs once per session (`debian12`), in a real
build on a btrfs store; two tests use that store.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from obuilder_fixtures import RecordingLog
from ocaml_fixtures import QuietHandler

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder, base_digest, from_id
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.debootstrap import DebootstrapFetcher, find_mirror, suite_of
from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.stores.btrfs import BtrfsStore

ROOT = Path(__file__).resolve().parent.parent
SPEC = '((from debian:12)\n (run (shell "cat /etc/debian_version")))\n'


@dataclass(frozen=True)
class Debian12:
    """The session's one debootstrap: a store holding `SPEC` built, and what it printed."""

    store_root: Path
    result: str
    log: str
    images: Path
    """An `--image-dir` holding the base's rootfs as `debian_12.tar`."""


@pytest.fixture(scope="session")
def debian12(btrfs_mount: Path, tmp_path_factory: pytest.TempPathFactory) -> Debian12:
    root = Path(tempfile.mkdtemp(dir=btrfs_mount))
    images = tmp_path_factory.mktemp("debian-images")

    async def build() -> tuple[str, str]:
        store = DbStore(BtrfsStore(root))
        await store.clean()
        builder = Builder(store, RuncSandbox(root / "state" / "sandbox"), DebootstrapFetcher())
        log = RecordingLog()
        result = await builder.build(S.parse(SPEC), images, log=log)
        base = await store.result(from_id("debian:12"))
        assert base is not None
        # Kept as a tarball so a test can bring this Debian into another store without a
        # second debootstrap.
        with tarfile.open(images / "debian_12.tar", "w") as tar:
            tar.add(base / "rootfs", arcname=".")
        return result, log.text

    result, log = asyncio.run(build())
    return Debian12(root, result, log, images)


def obuilder(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pipeline", "obuilder", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_debian_12_runs_commands(debian12: Debian12) -> None:
    lines = debian12.log.splitlines()
    assert lines[0] == "(from debian:12)"
    assert any(re.fullmatch(r"debootstrap --variant=minbase bookworm from http\S+", line)
               for line in lines)
    assert "I: Base system installed successfully." in lines
    version = lines[lines.index('/: (run (shell "cat /etc/debian_version"))') + 1]
    assert version.startswith("12."), version
    assert len([line for line in lines if line.startswith("---> saved as")]) == 2
    base = Path(debian12.store_root) / "result" / from_id("debian:12")
    digest = base_digest(base)
    assert digest is not None and re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert not list((base / "rootfs" / "var/cache/apt/archives").glob("*.deb"))


def test_second_build_is_cached_and_the_tarball_travels(debian12: Debian12,
                                                        tmp_path: Path) -> None:
    spec = tmp_path / "debian.spec"
    spec.write_text(SPEC)
    again = obuilder("build", "-f", spec, tmp_path, "--store", f"btrfs:{debian12.store_root}",
                     "--fetcher", "debootstrap")
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[-1] == f'Got: "{debian12.result}"'
    assert len([line for line in lines if line.startswith("---> using")]) == 2
    assert not [line for line in lines if line.startswith("---> saved")]
    # The same image, moved as a tarball to another store through a fetcher map.
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "fetchers").write_text(f"debian:12 -> local:{debian12.images}\n")
    moved = obuilder("build", "-f", spec, tmp_path, "--store", f"rsync:{store}",
                     "--fetcher-map", tmp_path / "fetchers")
    assert moved.returncode == 0, moved.stderr
    assert any(line.startswith("12.") for line in moved.stdout.splitlines())
    assert moved.stdout.splitlines()[-1] == f'Got: "{debian12.result}"', "ids are by reference"


@pytest.mark.parametrize(("image", "suite"), [
    ("debian:12", "bookworm"), ("debian:13", "trixie"), ("debian:12-slim", "bookworm"),
    ("debian:bookworm", "bookworm"), ("debian:trixie-slim", "trixie"), ("debian:sid", "sid"),
    ("debian", "stable"), ("debian:latest", "stable"), ("library/debian:11", "bullseye"),
    ("docker.io/library/debian:bookworm", "bookworm"),
])
def test_suites(image: str, suite: str) -> None:
    assert suite_of(image) == suite


@pytest.mark.parametrize("image", ["ubuntu:24.04", "busybox", "debian@sha256:" + "0" * 64,
                                   "example.org/debian:12", "debian:12.5", "debian:Bookworm"])
def test_other_images_are_refused(image: str) -> None:
    with pytest.raises(BuildError, match=rf"^debootstrap fetcher: cannot make {re.escape(image)}"):
        suite_of(image)


async def test_unknown_suite_fails_before_debootstrap(tmp_path: Path) -> None:
    log = RecordingLog()
    with pytest.raises(BuildError, match="debootstrap knows no suite 'nosuchsuite'"):
        await DebootstrapFetcher(mirror="http://127.0.0.1:9/debian").fetch(
            "debian:nosuchsuite", tmp_path, log=log)
    with pytest.raises(BuildError, match="cannot make alpine:3"):
        await DebootstrapFetcher().fetch("alpine:3", tmp_path, log=log)
    assert log.text == "" and not list(tmp_path.iterdir())


def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    (tmp_path / "sources.list").write_text("deb http://old.example/debian bookworm main\n")
    assert find_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main\n")
    assert find_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb http://ppa.example/ubuntu jammy main\n")
    with pytest.raises(BuildError, match=f"no Debian mirror found in the apt sources under "
                                         f"{tmp_path}"):
        find_mirror(tmp_path)


def test_the_hosts_mirror_is_found() -> None:
    assert re.fullmatch(r"https?://\S+", find_mirror())


async def test_a_failing_debootstrap_says_why_in_one_line(tmp_path: Path) -> None:
    """A mirror without the suite: debootstrap's own error line ends the fetcher's message."""
    empty = tmp_path / "mirror"
    empty.mkdir()
    handler = functools.partial(QuietHandler, directory=str(empty))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        mirror = f"http://127.0.0.1:{server.server_address[1]}/debian"
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        try:
            with pytest.raises(BuildError) as error:
                await asyncio.wait_for(DebootstrapFetcher(mirror=mirror).fetch(
                    "debian:13", rootfs, log=RecordingLog()), 120)
        finally:
            server.shutdown()
            thread.join()
    assert str(error.value) == (f"debootstrap exited with status 1: Failed getting release "
                                f"file {mirror}/dists/trixie/Release")
