"""Choosing a fetcher: names, mapping files, the default, and fetchers made on first use."""

from __future__ import annotations

from pathlib import Path

import pytest
from obuilder_fixtures import RecordingLog

from pipeline.obuilder.fetchers.debootstrap import DebootstrapFetcher
from pipeline.obuilder.fetchers.local import LocalFetcher
from pipeline.obuilder.fetchers.registry import RegistryFetcher
from pipeline.obuilder.fetchers.select import (
    Deferred,
    FetcherMap,
    choose,
    default_fetcher,
    parse_fetcher,
    read_fetcher_map,
)
from pipeline.obuilder.protocols import BuildError, Fetcher


def test_names(tmp_path: Path) -> None:
    registry = choose(parse_fetcher("registry", cache_dir=tmp_path), "busybox")
    assert isinstance(registry, RegistryFetcher)
    debootstrap = choose(parse_fetcher("debootstrap", cache_dir=tmp_path, mirror="http://m/d"),
                         "debian:12")
    assert isinstance(debootstrap, DebootstrapFetcher) and debootstrap.mirror == "http://m/d"
    local = choose(parse_fetcher("local:/srv/images", cache_dir=tmp_path), "busybox")
    assert isinstance(local, LocalFetcher) and local.image_dir == Path("/srv/images")
    for bad, message in [("docker", "unknown fetcher 'docker': expected registry, debootstrap "
                                    "or local:DIR"),
                         ("local:", "fetcher 'local:': expected local:DIR")]:
        with pytest.raises(BuildError, match=message):
            parse_fetcher(bad, cache_dir=tmp_path)


def test_fetchers_are_made_on_first_use(tmp_path: Path) -> None:
    made: list[str] = []

    def make() -> Fetcher:
        made.append("local")
        return LocalFetcher(tmp_path)

    deferred = Deferred("local", make)
    assert made == []
    assert deferred.get() is deferred.get()
    assert made == ["local"]


def test_default_sends_debian_to_debootstrap(tmp_path: Path) -> None:
    fetcher = default_fetcher(cache_dir=tmp_path / "registry", platform="linux/arm64",
                              insecure=["example.org:5000"])
    for image in ("debian", "debian:12", "debian:trixie-slim"):
        assert isinstance(fetcher.choose(image), DebootstrapFetcher), image
    for image in ("ubuntu:24.04", "debianish", "ocaml/opam:debian-12-ocaml-5.2",
                  "127.0.0.1:5000/debian:12"):
        assert isinstance(fetcher.choose(image), RegistryFetcher), image


async def test_map_file_routes_by_first_matching_glob(busybox_images: Path,
                                                      tmp_path: Path) -> None:
    mapping = tmp_path / "fetchers"
    mapping.write_text(f"""\
# images made here
busy* -> local:{busybox_images}   # the test's busybox
busybox -> local:/nonexistent
debian:* -> debootstrap
""")
    default = parse_fetcher(f"local:{tmp_path}", cache_dir=tmp_path)
    fetcher = read_fetcher_map(mapping, default=default, cache_dir=tmp_path)
    assert [pattern for pattern, _ in fetcher.rules] == ["busy*", "busybox", "debian:*"]
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    log = RecordingLog()
    info = await fetcher.fetch("busybox", rootfs, log=log)
    assert (rootfs / "bin" / "busybox").is_file() and info.digest is not None
    assert isinstance(fetcher.choose("debian:13"), DebootstrapFetcher)
    with pytest.raises(BuildError, match=f"unknown image 'alpine': no {tmp_path}/alpine.tar"):
        await fetcher.fetch("alpine", tmp_path / "other", log=log)
    nested = FetcherMap([("*", fetcher)], LocalFetcher(tmp_path))
    assert choose(nested, "alpine") is choose(default, "alpine")
    assert choose(nested, "busybox") is fetcher.choose("busybox")


@pytest.mark.parametrize(("text", "message"), [
    ("busybox local:/x\n", r":1: expected PATTERN -> FETCHER, got 'busybox local:/x'"),
    ("# fine\n\n -> registry\n", r":3: expected PATTERN -> FETCHER, got '-> registry'"),
    ("debian:* ->\n", r":1: expected PATTERN -> FETCHER"),
    ("a -> registry\nb -> docker\n", r":2: unknown fetcher 'docker'"),
])
def test_map_file_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    mapping = tmp_path / "fetchers"
    mapping.write_text(text)
    with pytest.raises(BuildError, match=f"^{mapping}{message}"):
        read_fetcher_map(mapping, default=LocalFetcher(tmp_path), cache_dir=tmp_path)


def test_missing_map_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=f"fetcher map {tmp_path}/none: No such file"):
        read_fetcher_map(tmp_path / "none", default=LocalFetcher(tmp_path), cache_dir=tmp_path)
