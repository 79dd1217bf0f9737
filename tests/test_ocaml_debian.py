"""The opam-name → Debian-package table, against the recorded excerpt of Debian bookworm's amd64
indexes (tests/data/debian), parsed directly and fetched from a local HTTP mirror serving it."""

from __future__ import annotations

import gzip
import json
import lzma
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ocaml_fixtures import RECORDED_DEBIAN, recorded_index, trixie_index

from pipeline.ocaml import debian as D

INDEX = recorded_index()

@pytest.mark.parametrize(("name", "package"), [
    ("odoc", "libodoc-ocaml-dev"),
    ("js_of_ocaml", "libjs-of-ocaml-dev"),
    ("alcotest", "libalcotest-ocaml-dev"),
    ("dune", "libdune-ocaml-dev"),
    # META in the runtime package, the .cmi/.cmxa in the -dev one: the build needs the latter.
    ("ANSITerminal", "libansi-terminal-ocaml-dev"),
    ("fmt", "libfmt-ocaml-dev"),
    ("ppx_deriving", "libppx-deriving-ocaml-dev"),
])
def test_libraries_are_their_dev_packages(name: str, package: str) -> None:
    found = INDEX.library(name)
    assert found is not None and found.name == package


@pytest.mark.parametrize(("name", "package"), [
    ("odoc", "ocaml-odoc"),
    ("dune", "ocaml-dune"),
    ("ocamlfind", "ocaml-findlib"),
    ("js_of_ocaml", "js-of-ocaml"),
    # In section devel, but named as an OCaml library.
    ("menhir", "menhir"),
])
def test_tools_are_the_packages_shipping_them(name: str, package: str) -> None:
    found = INDEX.tool(name)
    assert found is not None and found.name == package


def test_versions_come_from_the_packages_index() -> None:
    assert str(INDEX.tool("odoc")) == "ocaml-odoc 2.1.1+dfsg-2"
    assert INDEX.library("alcotest") == D.DebianPackage("libalcotest-ocaml-dev", "1.6.0-1+b1")
    assert INDEX.tool("odoc").upstream_version == "2.1.1"  # type: ignore[union-attr]


def test_what_debian_lacks_is_none() -> None:
    assert INDEX.library("nosuchlibrary") is None
    assert INDEX.tool("nosuchlibrary") is None
    assert INDEX.opam_packages("nosuchlibrary") == ()
    # bookworm has no ocamlformat, and `fmt` (coreutils) is no OCaml tool.
    assert INDEX.tool("ocamlformat") is None
    assert INDEX.tool("fmt") is None
    # The excerpt's first lines are no OCaml package's.
    assert "abpoa" not in INDEX.versions


def test_opam_packages_give_library_and_tool_and_the_compiler_from_the_table() -> None:
    assert [p.name for p in INDEX.opam_packages("odoc")] == ["libodoc-ocaml-dev", "ocaml-odoc"]
    assert [p.name for p in INDEX.opam_packages("alcotest")] == ["libalcotest-ocaml-dev"]
    assert [p.name for p in INDEX.opam_packages("ocamlfind")] == ["ocaml-findlib"]
    assert [str(p) for p in INDEX.opam_packages("ocaml")] == ["ocaml-nox 4.13.1-4"]
    assert [p.name for p in INDEX.opam_packages("base-bytes")] == ["ocaml-findlib"]


def test_the_excerpt_is_a_few_hundred_ocaml_packages() -> None:
    assert 300 <= len(INDEX.libraries) <= 1000 and 100 <= len(INDEX.tools) <= 500


def test_a_package_the_packages_index_lacks_is_left_out() -> None:
    contents = (b"usr/lib/ocaml/foo/META ocaml/libfoo-ocaml\n"
                b"usr/lib/ocaml/foo/foo.cmxa ocaml/libfoo-ocaml-dev\n"
                b"usr/lib/ocaml/bar/META ocaml/libbar-ocaml-dev\n")
    packages = b"Package: libfoo-ocaml\nVersion: 1.0-1\n"
    index = D.parse_index("x", "amd64", contents.splitlines(True), packages.splitlines(True))
    # Without its -dev package, the runtime package shipping META is the best there is.
    assert index.library("foo") == D.DebianPackage("libfoo-ocaml", "1.0-1")
    assert index.library("bar") is None


def test_several_packages_shipping_meta_pick_the_dev_one_then_by_name() -> None:
    contents = (b"usr/lib/ocaml/foo/META ocaml/libfoo-b,ocaml/libfoo-a\n"
                b"usr/lib/ocaml/bar/META ocaml/libbar-z-dev,ocaml/libbar-a\n"
                b"usr/lib/ocaml/bar/x.cmi ocaml/libbar-b-dev\n"
                b"usr/bin/foo ocaml/foo-b,ocaml/foo-a,utils/foo-0\n")
    packages = b"".join(f"Package: {name}\nVersion: 1\n\n".encode() for name in (
        "libfoo-a", "libfoo-b", "libbar-z-dev", "libbar-a", "libbar-b-dev", "foo-a", "foo-b",
        "foo-0"))
    index = D.parse_index("x", "amd64", contents.splitlines(True), packages.splitlines(True))
    assert index.libraries == {"foo": "libfoo-a", "bar": "libbar-z-dev"}
    # Section ocaml first; then by name.
    assert index.tools == {"foo": "foo-a"}


def test_trixie_arch_specific_library_directories() -> None:
    index = trixie_index("amd64")
    assert index.library("alcotest") == D.DebianPackage("libalcotest-ocaml-dev", "1.8.0-2+b3")
    assert index.library("fmt") == D.DebianPackage("libfmt-ocaml-dev", "0.10.0-1+b1")
    assert index.tool("ocamlformat").upstream_version == "0.27.0"  # type: ignore[union-attr]


def test_each_architecture_has_its_own_versions() -> None:
    riscv64 = trixie_index("riscv64")
    assert (riscv64.release, riscv64.arch) == ("trixie", "riscv64")
    # The same package, rebuilt once more on riscv64.
    assert trixie_index("amd64").library("astring") == \
        D.DebianPackage("libastring-ocaml-dev", "0.8.5-2+b4")
    assert riscv64.library("astring") == D.DebianPackage("libastring-ocaml-dev", "0.8.5-2+b5")


def test_release_names() -> None:
    assert D.release_name("trixie") == "Debian 13 (trixie)"
    assert D.release_name("bookworm") == "Debian 12 (bookworm)"
    assert D.release_name("sid") == "Debian sid"


@pytest.mark.parametrize(("version", "upstream"), [
    ("0.26.1-1", "0.26.1"), ("2.1.1+dfsg-2", "2.1.1"), ("1:0.13-2", "0.13"),
    ("20220210+ds-2", "20220210"), ("0.27.0-1+b6", "0.27.0"), ("1.0", "1.0"),
    ("4.0.0~rc1-3", "4.0.0~rc1"), ("1.2-3-4", "1.2-3"),
])
def test_upstream_version(version: str, upstream: str) -> None:
    assert D.upstream_version(version) == upstream


def test_json_round_trip() -> None:
    data = json.loads(json.dumps(INDEX.to_json()))
    assert D.DebianIndex.from_json(data) == INDEX


# Fetching from a mirror

def _mirror_app(packages_suffix: str) -> web.Application:
    """A mirror serving the recorded excerpt as bookworm's compressed indexes (the Packages
    index with `packages_suffix`, ".xz" or ".gz")."""
    contents = gzip.compress((RECORDED_DEBIAN / "Contents-amd64").read_bytes())
    raw = (RECORDED_DEBIAN / "Packages").read_bytes()
    packages = lzma.compress(raw) if packages_suffix == ".xz" else gzip.compress(raw)
    files = {"/debian/dists/bookworm/main/Contents-amd64.gz": contents,
             f"/debian/dists/bookworm/main/binary-amd64/Packages{packages_suffix}": packages,
             "/broken/dists/bookworm/main/Contents-amd64.gz": contents[: len(contents) // 2]}

    async def serve(request: web.Request) -> web.StreamResponse:
        if request.path not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[request.path])

    app = web.Application()
    app.router.add_get("/{path:.*}", serve)
    return app


@pytest.mark.parametrize("suffix", [".xz", ".gz"])
async def test_fetching_from_a_mirror_reads_the_same_table(suffix: str) -> None:
    async with TestServer(_mirror_app(suffix)) as server:
        index = await D.fetch_index(str(server.make_url("/debian")), "bookworm", "amd64")
    assert index == INDEX


async def test_a_missing_index_names_its_url() -> None:
    async with TestServer(_mirror_app(".xz")) as server:
        url = str(server.make_url("/debian"))
        with pytest.raises(D.DebianIndexError, match=(
                rf"^cannot fetch {url}/dists/trixie/main/Contents-amd64.gz: HTTP 404 ")):
            await D.fetch_index(url, "trixie", "amd64")


async def test_a_truncated_index_names_its_url() -> None:
    async with TestServer(_mirror_app(".xz")) as server:
        url = str(server.make_url("/broken"))
        with pytest.raises(D.DebianIndexError,
                           match=rf"^cannot fetch {url}/dists/bookworm/main/Contents-amd64.gz: "):
            await D.fetch_index(url, "bookworm", "amd64")


async def test_an_unreachable_mirror_names_its_url() -> None:
    # A port nothing listens on: bound, then closed.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/debian"
    with pytest.raises(D.DebianIndexError) as raised:
        await D.fetch_index(url, "bookworm", "amd64")
    message = str(raised.value)
    assert message.startswith(f"cannot fetch {url}/dists/bookworm/main/Contents-amd64.gz: ")
    assert "\n" not in message and "refused" in message.lower(), message
