"""The OCaml CI tests' shared session store (Debian 12 debootstrapped once for every module), the
Debian indexes (the recorded excerpt in tests/data/debian, and the real mirror's, fetched once per
session and served locally), and the check that the diagram's labels are for people."""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.obuilder.fetchers.debootstrap import find_mirror
from pipeline.ocaml import debian as D

PIPELINE = Path(sys.executable).parent / "pipeline"
# Only a guard against a hang, never a measurement: the session's first build debootstraps
# Debian and installs OCaml.
HANG_GUARD = 900


def mounts_under(directory: Path) -> list[str]:
    """The mount points at or below `directory`, deepest first."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [point for point in points if Path(point).is_relative_to(directory)]
    return sorted(inside, key=len, reverse=True)


@pytest.fixture(scope="session")
def ocaml_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An overlayfs store holding Debian 12, shared by every test of the session; its mounted
    results are unmounted at the end, so that the directory can be removed."""
    directory = tmp_path_factory.mktemp("ocaml-store")
    empty = tmp_path_factory.mktemp("empty-context")
    spec = empty / "spec"
    spec.write_text("((from debian:12))\n")
    store = f"overlayfs:{directory}"
    try:
        subprocess.run([str(PIPELINE), "obuilder", "build", "-f", str(spec), str(empty),
                        "--store", store], check=True, capture_output=True, timeout=HANG_GUARD)
        yield store
    finally:
        for point in mounts_under(directory):
            subprocess.run(["umount", "--lazy", point], check=False)


RECORDED_DEBIAN = Path(__file__).parent / "data" / "debian"
"""The recorded excerpt of bookworm's amd64 indexes (`record.py` there refreshes it)."""


def recorded_index() -> D.DebianIndex:
    """The Debian index of the recorded excerpt."""
    with (RECORDED_DEBIAN / "Contents-amd64").open("rb") as contents, \
            (RECORDED_DEBIAN / "Packages").open("rb") as packages:
        return D.parse_index("bookworm", "amd64", contents, packages)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def debian_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a local copy of the host's Debian mirror's bookworm indexes (for the host's
    architecture): fetched once per session, so that each test reads what the real mirror says
    without downloading its 12 MB Contents file again."""
    root = tmp_path_factory.mktemp("debian-mirror")
    mirror = find_mirror()
    for url in (D.contents_url(mirror, "bookworm", D.HOST_ARCH),
                D.packages_urls(mirror, "bookworm", D.HOST_ARCH)[0]):
        path = root / url.removeprefix(mirror.rstrip("/") + "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=HANG_GUARD) as response:
            path.write_bytes(response.read())
    handler = functools.partial(_QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()


LABEL_LIMIT = 40
"""The longest label the OCaml CI pipeline's diagram may show."""
_DOT_LABEL = re.compile(r'\[label=("(?:[^"\\]|\\.)*"|[^ \]]+)')
# What Python's reprs look like: `Commit(repo=...`, a quoted absolute path, `<X object at 0x...>`.
_REPR = re.compile(r"\(.*=|'/|object at")


def drawn_labels(dot: str) -> list[str]:
    """The label of every node in DOT text, unquoted."""
    labels = []
    for found in _DOT_LABEL.findall(dot):
        labels.append(found[1:-1].replace('\\"', '"') if found.startswith('"') else found)
    return labels


def assert_labels_for_people(dot: str) -> list[str]:
    """Check that every label drawn is short and no Python repr; return the labels."""
    labels = drawn_labels(dot)
    assert labels, dot
    for label in labels:
        assert len(label) <= LABEL_LIMIT, f"label over {LABEL_LIMIT} characters: {label!r}"
        assert not _REPR.search(label), f"a Python repr as a label: {label!r}"
    return labels
