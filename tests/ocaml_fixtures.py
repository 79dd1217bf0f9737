"""The OCaml CI tests' shared session store (Debian 12 debootstrapped once for every module), the
Debian indexes (the recorded excerpt in tests/data/debian, and the real mirror's, each fetched
once per session when first asked for and served locally), and the check that the diagram's
labels are for people."""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
import urllib.error
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
EMULATED_HANG_GUARD = 3600
"""The same for a test building an emulated platform for the first time in the session: its
debootstrap's second stage and its apt-get run under qemu."""


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


# Real lines of trixie's indexes for two architectures: the libraries are in an arch-specific
# directory, and a package's version can differ between architectures (binary rebuilds, `+b5`).
_TRIXIE_EXCERPT = {
    "amd64": (b"""\
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/alcotest/META ocaml/libalcotest-ocaml-dev
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/alcotest/alcotest.cmxa ocaml/libalcotest-ocaml-dev
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/astring/META ocaml/libastring-ocaml
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/astring/astring.cmxa ocaml/libastring-ocaml-dev
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/fmt/META ocaml/libfmt-ocaml
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/fmt/fmt.cmxs ocaml/libfmt-ocaml
usr/lib/x86_64-linux-gnu/ocaml/5.3.0/fmt/fmt.cmxa ocaml/libfmt-ocaml-dev
usr/bin/ocamlformat ocaml/ocamlformat
usr/bin/odoc ocaml/ocaml-odoc
""", b"""\
Package: libalcotest-ocaml-dev
Version: 1.8.0-2+b3

Package: libastring-ocaml-dev
Version: 0.8.5-2+b4

Package: libfmt-ocaml
Version: 0.10.0-1+b1

Package: libfmt-ocaml-dev
Version: 0.10.0-1+b1

Package: ocamlformat
Source: ocamlformat (0.27.0-1)
Version: 0.27.0-1+b6

Package: ocaml-odoc
Version: 3.0.0-2+b1

Package: ocaml-nox
Version: 5.3.0-3
"""),
    "riscv64": (b"""\
usr/lib/riscv64-linux-gnu/ocaml/5.3.0/alcotest/META ocaml/libalcotest-ocaml-dev
usr/lib/riscv64-linux-gnu/ocaml/5.3.0/astring/META ocaml/libastring-ocaml
usr/lib/riscv64-linux-gnu/ocaml/5.3.0/astring/astring.cmxa ocaml/libastring-ocaml-dev
usr/bin/ocamlformat ocaml/ocamlformat
""", b"""\
Package: libalcotest-ocaml-dev
Version: 1.8.0-2+b3

Package: libastring-ocaml-dev
Version: 0.8.5-2+b5

Package: ocamlformat
Version: 0.27.0-1+b6

Package: ocaml-nox
Version: 5.3.0-3
"""),
}


def trixie_index(arch: str) -> D.DebianIndex:
    """The index of the recorded lines of trixie's indexes for `arch` (amd64 or riscv64)."""
    contents, packages = _TRIXIE_EXCERPT[arch]
    return D.parse_index("trixie", arch, contents.splitlines(True), packages.splitlines(True))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of its `directory` without logging each request: the tests' output is
    theirs."""

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing."""


class _CachingMirror(QuietHandler):
    """Serves the files of `directory`, each fetched from `upstream` (the real mirror) on its
    first request: a test reads what the mirror says, and the session downloads each index (a
    Contents file is 12 MB) once, only if a test asks for it."""

    upstream = ""
    lock = threading.Lock()

    def do_GET(self) -> None:
        """Fetch the file from the upstream mirror unless it is here, then serve it (404 when
        the mirror has none)."""
        relative = self.path.partition("?")[0].lstrip("/")
        # Only the index files this fixture exists for, never a path leaving the directory.
        if re.fullmatch(r"dists/[a-z0-9-]+/main/[A-Za-z0-9/_.-]+", relative) \
                and ".." not in relative:
            path = Path(self.directory) / relative
            with self.lock:
                if not path.exists():
                    try:
                        with urllib.request.urlopen(f"{self.upstream}/{relative}",
                                                    timeout=HANG_GUARD) as response:
                            data = response.read()
                    except urllib.error.HTTPError:
                        data = None
                    if data is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
        super().do_GET()


@pytest.fixture(scope="session")
def debian_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a local copy of the host's Debian mirror's indexes, each fetched on first use
    and kept for the session (see `_CachingMirror`)."""
    root = tmp_path_factory.mktemp("debian-mirror")
    handler = type("Handler", (_CachingMirror,), {"upstream": find_mirror().rstrip("/"),
                                                  "lock": threading.Lock()})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                         functools.partial(handler, directory=str(root))) as server:
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
