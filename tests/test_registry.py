"""The registry fetcher against a real docker-registry, filled by skopeo from OCI layouts that
the tests write themselves (`oci_images`).

Faults (a corrupted blob, a connection cut half-way) and request counts come from `Proxy`, a
small aiohttp server in front of the registry: images are then fetched as
`127.0.0.1:PROXYPORT/NAME:TAG`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import stat
import tarfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from obuilder_fixtures import HANG_GUARD, RecordingLog
from oci_images import OciLayout, directory, file, member, tar_bytes, tar_directory
from registry_fixtures import Registry, free_port, push_oci_layout

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder, from_id
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers import unpack
from pipeline.obuilder.fetchers.registry import (
    Platform,
    Reference,
    RegistryFetcher,
    parse_reference,
    uses_plain_http,
)
from pipeline.obuilder.protocols import BuildError, Fetcher
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.setup import open_builder
from pipeline.obuilder.stores import open_store

DIGEST = "sha256:" + "ab" * 32

# --- References, schemes, platforms (no registry) ----------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36", None)),
    ("ocaml/opam:debian-12-ocaml-5.2",
     Reference("docker.io", "ocaml/opam", "debian-12-ocaml-5.2", None)),
    ("docker.io/busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("index.docker.io/library/busybox", Reference("docker.io", "library/busybox", "latest", None)),
    (f"busybox@{DIGEST}", Reference("docker.io", "library/busybox", None, DIGEST)),
    (f"busybox:1@{DIGEST}", Reference("docker.io", "library/busybox", "1", DIGEST)),
    ("127.0.0.1:5000/busybox:latest", Reference("127.0.0.1:5000", "busybox", "latest", None)),
    ("127.0.0.1:5000/busybox", Reference("127.0.0.1:5000", "busybox", "latest", None)),
    ("localhost/a/b", Reference("localhost", "a/b", "latest", None)),
    ("localhost:5000/a/b:x", Reference("localhost:5000", "a/b", "x", None)),
    ("ghcr.io/o/r/s:v1.2_3", Reference("ghcr.io", "o/r/s", "v1.2_3", None)),
    ("[::1]:5000/img", Reference("[::1]:5000", "img", "latest", None)),
    ("my-host:80/a__b.c-d", Reference("my-host:80", "a__b.c-d", "latest", None)),
    ("a.b/c@" + DIGEST, Reference("a.b", "c", None, DIGEST)),
])
def test_references_parse_as_docker_does(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_reference_text_and_api_host() -> None:
    hub = parse_reference("busybox")
    assert (str(hub), hub.api_host) == ("docker.io/library/busybox:latest",
                                        "registry-1.docker.io")
    local = parse_reference(f"127.0.0.1:5000/a/b:t@{DIGEST}")
    assert (str(local), local.api_host) == (f"127.0.0.1:5000/a/b:t@{DIGEST}", "127.0.0.1:5000")


@pytest.mark.parametrize(("text", "problem"), [
    ("BusyBox", "bad repository name 'library/BusyBox'"),
    ("busybox:", "bad tag ''"),
    ("busybox:-x", "bad tag '-x'"),
    ("busybox@sha256:abc", "bad digest 'sha256:abc'"),
    ("busybox@md5:" + "a" * 32, "bad digest 'md5:" + "a" * 32 + "'"),
    ("a//b", "bad repository name 'a//b'"),
    ("bad_host:x:1/img", "bad registry 'bad_host:x:1'"),
    ("", "bad repository name 'library/'"),
])
def test_malformed_references_are_refused(text: str, problem: str) -> None:
    with pytest.raises(BuildError) as info:
        parse_reference(text)
    message = str(info.value)
    assert message.startswith(f"invalid image reference {text!r}: {problem}")
    assert "\n" not in message


@pytest.mark.parametrize(("registry", "plain"), [
    ("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:5000", True), ("localhost", True),
    ("[::1]:5000", True), ("registry-1.docker.io", False), ("10.0.0.1:5000", False),
    ("localhost.example.com", False), ("myreg:5000", False),
])
def test_plain_http_only_on_loopback(registry: str, plain: bool) -> None:
    assert uses_plain_http(registry) is plain


def test_plain_http_for_listed_insecure_registries() -> None:
    assert uses_plain_http("myreg:5000", insecure=["myreg:5000"])
    assert not uses_plain_http("myreg:5001", insecure=["myreg:5000"])


def test_platforms() -> None:
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert str(Platform.parse("linux/arm64")) == "linux/arm64"
    assert Platform.host() == Platform("linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(
        platform.machine(), platform.machine()))
    assert Platform("linux", "arm64").matches({"os": "linux", "architecture": "arm64",
                                              "variant": "v8"})
    assert not Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm",
                                                      "variant": "v6"})
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(BuildError, match="expected os/arch"):
            Platform.parse(bad)


# --- Whiteouts and safety, straight on the unpacker --------------------------------------------


def apply(rootfs: Path, entries: list) -> None:
    path = rootfs.parent / "layer.tar"
    path.write_bytes(tar_bytes(entries))
    with tarfile.open(path, mode="r|") as tar:
        unpack.extract(tar, rootfs, layer=True)


@pytest.mark.parametrize(("entries", "message"), [
    ([file("a/.wh...", b"")], "image member 'a/.wh...' whites out the rootfs"),
    ([file(".wh...", b"")], "image member '.wh...' escapes the rootfs"),
    ([file("../x", b"")], "image member '../x' escapes the rootfs"),
    ([(member("l", tarfile.SYMTYPE, linkname="/"), b""), file("l/.wh.x", b"")],
     "image member 'l/.wh.x' passes through the symlink /l"),
    ([file("x", b"", type=tarfile.LNKTYPE, linkname="../outside")],
     "image member 'x' escapes the rootfs"),
])
def test_layers_escaping_the_rootfs_are_refused(tmp_path: Path, entries: list,
                                                message: str) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (tmp_path / "x").write_text("outside\n")
    with pytest.raises(BuildError) as info:
        apply(rootfs, entries)
    assert str(info.value) == message
    assert (tmp_path / "x").read_text() == "outside\n"


def test_a_hard_link_to_a_symlink_links_the_symlink(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    host_file = tmp_path / "secret"
    host_file.write_text("host\n")
    apply(rootfs, [(member("s", tarfile.SYMTYPE, linkname=str(host_file)), b""),
                   file("h", b"", type=tarfile.LNKTYPE, linkname="s")])
    assert os.readlink(rootfs / "h") == str(host_file)
    assert (rootfs / "h").lstat().st_ino != host_file.stat().st_ino


def test_an_opaque_directory_keeps_what_its_own_layer_added(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    apply(rootfs, [directory("d"), file("d/old", b"1"), file("d/.hidden", b"1")])
    apply(rootfs, [directory("d"), file("d/new", b"2"), file("d/.wh..wh..opq", b"")])
    assert sorted(p.name for p in (rootfs / "d").iterdir()) == ["new"]


# --- Images in a real registry -----------------------------------------------------------------

ONE = b"one\n"
TWO = b"two\n"


@dataclass
class Images:
    registry: Registry
    layout: OciLayout

    def name(self, image: str) -> str:
        return f"{self.registry.host}/{image}"

    def push(self, descriptor: dict, image: str, *, all_platforms: bool = False) -> None:
        tag = image.replace("/", "-").replace(":", "-")
        self.layout.tag(descriptor, tag)
        push_oci_layout(self.layout.path, tag, self.name(image), all_platforms=all_platforms)


def layered_layers() -> list[tuple[bytes, str]]:
    """Three layers: a base (owners, modes, links, a device), then a zstd layer deleting a
    file and replacing a directory (whiteout and opaque), then a plain tar layer."""
    base = tar_bytes([
        directory("etc"), file("etc/gone", b"gone\n"), file("etc/kept", b"kept\n"),
        directory("opt"), directory("opt/app"), file("opt/app/old", b"old\n"),
        directory("opt/app/sub"), file("opt/app/sub/deep", b"deep\n"),
        directory("home"), directory("home/u", uid=1000, gid=1000, mode=0o700),
        file("home/u/mine", b"mine\n", uid=1000, gid=1000, mode=0o600),
        file("su", b"#!/bin/sh\n", mode=0o4755),
        (member("sh", tarfile.SYMTYPE, linkname="/su"), b""),
        file("su2", b"", type=tarfile.LNKTYPE, linkname="su", mode=0o4755),
        directory("dev"), (member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3,
                                  mode=0o666), b""),
    ])
    middle = tar_bytes([
        directory("etc"), file("etc/.wh.gone", b""),
        directory("opt/app"), file("opt/app/.wh..wh..opq", b""), file("opt/app/new", b"new\n"),
    ])
    top = tar_bytes([file("etc/kept", b"changed\n"), directory("tmp", mode=0o1777)])
    return [(base, "gzip"), (middle, "zstd"), (top, "none")]


def tree(rootfs: Path) -> dict[str, str]:
    """Every path under `rootfs` -> a description of its type, owner, mode and content."""
    result = {}
    for path in sorted(rootfs.rglob("*")):
        st = path.lstat()
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else f"-> {os.readlink(path)}"
                if stat.S_ISLNK(st.st_mode) else f"chr {os.major(st.st_rdev)},"
                f"{os.minor(st.st_rdev)}" if stat.S_ISCHR(st.st_mode) else path.read_text())
        mode = "" if stat.S_ISLNK(st.st_mode) else f" {stat.S_IMODE(st.st_mode):o}"
        result[str(path.relative_to(rootfs))] = f"{st.st_uid}:{st.st_gid}{mode} {kind}"
    return result


@pytest.fixture(scope="session")
def images(registry: Registry, busybox_rootfs: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The shared images: busybox, layered, multi (amd64 + arm64), shared-a and shared-b."""
    pushed = Images(registry, OciLayout(tmp_path_factory.mktemp("oci") / "layout"))
    layout = pushed.layout
    busybox = layout.add_image([(tar_directory(busybox_rootfs), "gzip")],
                               env=["PATH=/bin:/usr/bin", "GREETING=hello=world"])
    pushed.push(busybox, "busybox:latest")
    pushed.push(layout.add_image(layered_layers()), "layered:latest")
    amd64 = layout.add_image([(tar_bytes([file("arch", b"amd64\n")]), "gzip")])
    arm64 = layout.add_image([(tar_bytes([file("arch", b"arm64\n")]), "gzip")],
                             architecture="arm64")
    pushed.push(layout.add_index({"linux/amd64": amd64, "linux/arm64/v8": arm64}),
                "multi:latest", all_platforms=True)
    shared = (tar_bytes([file("base", b"shared base\n")]), "gzip")
    pushed.push(layout.add_image([shared, (tar_bytes([file("a", ONE)]), "gzip")]),
                "shared-a:1")
    pushed.push(layout.add_image([shared, (tar_bytes([file("b", TWO)]), "gzip")]),
                "shared-b:1")
    return pushed


def cache_files(cache: Path) -> list[str]:
    """Every file in the blob cache, temporary ones included."""
    blobs = cache / "blobs" / "sha256"
    return sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []


async def fetch(fetcher: RegistryFetcher, image: str, rootfs: Path) -> tuple[str, RecordingLog]:
    rootfs.mkdir(parents=True)
    log = RecordingLog()
    async with asyncio.timeout(HANG_GUARD):
        info = await fetcher.fetch(image, rootfs, log=log)
    assert info.digest is not None
    return info.digest, log


def test_registry_fetcher_implements_the_protocol(tmp_path: Path) -> None:
    assert isinstance(RegistryFetcher(tmp_path), Fetcher)


async def test_a_one_layer_image_with_its_env(images: Images, tmp_path: Path) -> None:
    fetcher = RegistryFetcher(tmp_path / "cache")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    log = RecordingLog()
    info = await fetcher.fetch(images.name("busybox:latest"), rootfs, log=log)
    # WorkingDir and User from the config are not applied: only Env.
    assert info.env == {"PATH": "/bin:/usr/bin", "GREETING": "hello=world"}
    assert info.digest is not None and info.digest.startswith("sha256:")
    assert f"{images.name('busybox:latest')} resolved to {info.digest}\n" in log.text
    assert (rootfs / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/busybox"
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    assert (rootfs / "home" / "opam").stat().st_uid == 1000


async def test_layers_apply_whiteouts_opaque_directories_and_attributes(
        images: Images, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    await fetch(RegistryFetcher(tmp_path / "cache"), images.name("layered:latest"), rootfs)
    assert tree(rootfs) == {
        "dev": "0:0 755 dir",
        "dev/null": "0:0 666 chr 1,3",
        "etc": "0:0 755 dir",
        "etc/kept": "0:0 644 changed\n",
        "home": "0:0 755 dir",
        "home/u": "1000:1000 700 dir",
        "home/u/mine": "1000:1000 600 mine\n",
        "opt": "0:0 755 dir",
        "opt/app": "0:0 755 dir",
        "opt/app/new": "0:0 644 new\n",
        "sh": "0:0 -> /su",
        "su": "0:0 4755 #!/bin/sh\n",
        "su2": "0:0 4755 #!/bin/sh\n",
        "tmp": "0:0 1777 dir",
    }
    assert (rootfs / "su2").stat().st_ino == (rootfs / "su").stat().st_ino


async def test_a_manifest_list_picks_the_platform(images: Images, tmp_path: Path) -> None:
    name = images.name("multi:latest")
    host_digest, log = await fetch(RegistryFetcher(tmp_path / "c1"), name, tmp_path / "host")
    # The tests run on amd64 or arm64; the explicit platform is the other one.
    ours = Platform.host().architecture
    other = {"amd64": "arm64", "arm64": "amd64"}[ours]
    assert (tmp_path / "host" / "arch").read_text() == f"{ours}\n"
    assert f"platform linux/{ours}: sha256:" in log.text
    arm_digest, _ = await fetch(RegistryFetcher(tmp_path / "c2", platform=f"linux/{other}"),
                                name, tmp_path / "other")
    assert (tmp_path / "other" / "arch").read_text() == f"{other}\n"
    # The digest is the index's, whichever platform was picked.
    assert arm_digest == host_digest
    with pytest.raises(BuildError) as info:
        await fetch(RegistryFetcher(tmp_path / "c3", platform="linux/s390x"), name,
                    tmp_path / "s390x")
    assert str(info.value) == (f"cannot fetch {name!r} from registry {images.registry.host}: "
                               f"no image for platform linux/s390x "
                               f"(available: linux/amd64, linux/arm64/v8)")


@pytest.mark.parametrize(("image", "problem"), [
    ("nosuch:latest", "unknown image"),
    ("busybox:nosuch", "unknown tag 'nosuch'"),
    (f"busybox@{DIGEST}", f"unknown manifest {DIGEST}"),
])
async def test_unknown_images_and_tags(images: Images, tmp_path: Path, image: str,
                                       problem: str) -> None:
    with pytest.raises(BuildError) as info:
        await fetch(RegistryFetcher(tmp_path / "cache"), images.name(image), tmp_path / "r")
    assert str(info.value) == (f"cannot fetch {images.name(image)!r} from registry "
                               f"{images.registry.host}: {problem}")


async def test_an_unreachable_registry(tmp_path: Path) -> None:
    image = f"127.0.0.1:{free_port()}/busybox:latest"
    with pytest.raises(BuildError) as info:
        await fetch(RegistryFetcher(tmp_path / "cache"), image, tmp_path / "r")
    assert str(info.value) == (f"cannot fetch {image!r} from registry {image.split('/')[0]}: "
                               f"network unreachable (Connection refused)")


# --- Through a proxy: faults, request counts, recorded tags --------------------------------------


class Proxy:
    """Forwards GETs to the registry, counting them by path; can corrupt a blob (flip its
    first byte) or cut its connection half-way through the body."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.gets: Counter[str] = Counter()
        self.corrupt: set[str] = set()
        self.cut: set[str] = set()
        self.host = ""

    def blob_gets(self) -> int:
        return sum(n for path, n in self.gets.items() if "/blobs/" in path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.gets[request.path] += 1
        headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Authorization")}
        async with self.session.get(f"http://{self.upstream}{request.path_qs}", headers=headers,
                                    allow_redirects=False) as upstream:
            body = await upstream.read()
            status, content_type = upstream.status, upstream.content_type
        digest = request.path.rsplit("/", 1)[-1]
        if digest in self.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if digest in self.cut:
            response = web.StreamResponse(headers={"Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[:len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(status=status, body=body, content_type=content_type)


@pytest.fixture
async def proxy(images: Images) -> AsyncIterator[Proxy]:
    async with aiohttp.ClientSession() as session:
        proxy = Proxy(images.registry.host, session)
        app = web.Application()
        app.router.add_get("/{path:.*}", proxy.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy.host = f"127.0.0.1:{runner.addresses[0][1]}"
        yield proxy
        await runner.cleanup()


def layer_digests(images: Images, image: str) -> list[str]:
    """The layer digests of `image` as tagged in the layout."""
    tag = image.replace("/", "-").replace(":", "-")
    entry = next(m for m in images.layout.index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    blob = images.layout.path / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")
    return [layer["digest"] for layer in json.loads(blob.read_text())["layers"]]


async def test_a_changed_layer_digest_is_detected_and_not_cached(
        images: Images, proxy: Proxy, tmp_path: Path) -> None:
    (layer,) = layer_digests(images, "busybox:latest")
    proxy.corrupt.add(layer)
    blob = (images.registry.directory / "storage" / "docker" / "registry" / "v2" / "blobs" /
            "sha256" / layer[7:9] / layer[7:] / "data").read_bytes()
    got = hashlib.sha256(bytes([blob[0] ^ 0xFF]) + blob[1:]).hexdigest()
    image = f"{proxy.host}/busybox:latest"
    with pytest.raises(BuildError) as info:
        await fetch(RegistryFetcher(tmp_path / "cache"), image, tmp_path / "rootfs")
    assert str(info.value) == (f"cannot fetch {image!r} from registry {proxy.host}: "
                               f"digest mismatch for blob {layer} (got sha256:{got})")
    files = cache_files(tmp_path / "cache")
    assert layer[7:] not in files and not [f for f in files if f.startswith(".")]


async def test_an_interrupted_pull_leaves_nothing_and_the_next_succeeds(
        images: Images, proxy: Proxy, tmp_path: Path) -> None:
    fetcher = RegistryFetcher(tmp_path / "cache")
    image = f"{proxy.host}/layered:latest"
    cut = layer_digests(images, "layered:latest")[0]
    proxy.cut.add(cut)
    with pytest.raises(BuildError) as info:
        await fetch(fetcher, image, tmp_path / "first")
    assert str(info.value).startswith(f"cannot fetch {image!r} from registry {proxy.host}: "
                                      f"download of {cut} interrupted (")
    files = cache_files(tmp_path / "cache")
    assert cut[7:] not in files and not [f for f in files if f.startswith(".")]
    proxy.cut.clear()
    await fetch(fetcher, image, tmp_path / "second")
    assert (tmp_path / "second" / "opt" / "app" / "new").read_text() == "new\n"
    assert cut[7:] in cache_files(tmp_path / "cache")


async def test_a_second_image_downloads_no_shared_layer(
        images: Images, proxy: Proxy, tmp_path: Path) -> None:
    fetcher = RegistryFetcher(tmp_path / "cache")
    await fetch(fetcher, f"{proxy.host}/shared-a:1", tmp_path / "a")
    shared, own = layer_digests(images, "shared-b:1")
    assert shared == layer_digests(images, "shared-a:1")[0]
    proxy.gets.clear()
    _, log = await fetch(fetcher, f"{proxy.host}/shared-b:1", tmp_path / "b")
    assert proxy.gets[f"/v2/shared-b/blobs/{shared}"] == 0
    assert proxy.gets[f"/v2/shared-b/blobs/{own}"] == 1
    assert proxy.blob_gets() == 2  # its config and its own layer
    assert f"{shared[:19]}: cached\n" in log.text
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["b", "base"]


async def test_a_tag_is_resolved_once_until_refreshed(
        images: Images, proxy: Proxy, tmp_path: Path) -> None:
    layout = images.layout
    images.push(layout.add_image([(tar_bytes([file("version", ONE)]), "gzip")]), "moving:v")
    image = f"{proxy.host}/moving:v"
    first, log = await fetch(RegistryFetcher(tmp_path / "cache"), image, tmp_path / "1")
    assert f"{image} resolved to {first}\n" in log.text
    tags = json.loads((tmp_path / "cache" / "tags.json").read_text())
    assert tags == {image: first}

    images.push(layout.add_image([(tar_bytes([file("version", TWO)]), "gzip")]), "moving:v")
    proxy.gets.clear()
    again, log = await fetch(RegistryFetcher(tmp_path / "cache"), image, tmp_path / "2")
    assert again == first and f"{image} is {first}\n" in log.text
    assert (tmp_path / "2" / "version").read_bytes() == ONE
    assert not proxy.gets  # recorded tag, cached blobs: the registry is not asked

    fetcher = RegistryFetcher(tmp_path / "cache")
    second = await fetcher.refresh(image)
    assert second != first
    assert json.loads((tmp_path / "cache" / "tags.json").read_text()) == {image: second}
    refreshed, _ = await fetch(fetcher, image, tmp_path / "3")
    assert refreshed == second and (tmp_path / "3" / "version").read_bytes() == TWO


async def test_refresh_of_a_digest_reference_asks_nothing(tmp_path: Path) -> None:
    image = f"127.0.0.1:{free_port()}/img@{DIGEST}"
    assert await RegistryFetcher(tmp_path).refresh(image) == DIGEST


# --- A whole build ---------------------------------------------------------------------------


async def test_a_build_from_a_registry_image_runs_then_is_cached(
        images: Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = DbStore(open_store(f"rsync:{root}", rsync_mode="copy"))
    await store.clean()
    builder = Builder(store, RuncSandbox(tmp_path / "runc"), RegistryFetcher(tmp_path / "cache"))
    spec = S.parse(f'((from {images.name("busybox:latest")})\n'
                   f' (run (shell "echo $GREETING > /out; cat /out")))')
    context = tmp_path / "context"
    context.mkdir()
    outputs = []
    for _ in range(2):
        log = RecordingLog()
        async with asyncio.timeout(HANG_GUARD):
            result = await builder.build(spec, context, log=log)
        outputs.append(log.text)
    assert "resolved to sha256:" in outputs[0] and "hello=world\n" in outputs[0]
    assert outputs[0].count("---> saved as") == 2
    assert outputs[1].count("from cache") == 2 and "saved as" not in outputs[1]
    rootfs = (await store.result(result))
    assert rootfs is not None and (rootfs / "rootfs" / "out").read_text() == "hello=world\n"


async def test_the_builders_platform_picks_an_index_manifest(images: Images,
                                                             tmp_path: Path) -> None:
    """`open_builder(platform=...)` reaches the registry fetcher: each platform's base is the
    index's manifest for it, under a step id of its own; Debian's and the kernel's names of an
    architecture mean the same platform."""
    root = tmp_path / "store"
    root.mkdir()
    name = images.name("multi:latest")
    bases = {}
    for platform_name, arch in [("linux/arm64", "arm64"), ("aarch64", "arm64"),
                                (None, Platform.host().architecture)]:
        builder = await open_builder(f"rsync:{root}", fetcher="registry",
                                     platform=platform_name)
        try:
            log = RecordingLog()
            async with asyncio.timeout(HANG_GUARD):
                id = await builder.fetch_base(name, log=log)
            result = await builder.store.result(id)
            assert result is not None and (result / "rootfs" / "arch").read_text() == f"{arch}\n"
        finally:
            builder.close()
        assert id == from_id(name, platform_name)
        bases[platform_name] = (id, "from cache" in log.text)
    assert bases["linux/arm64"][0] == bases["aarch64"][0] != bases[None][0]
    assert [cached for _, cached in bases.values()] == [False, True, False]
