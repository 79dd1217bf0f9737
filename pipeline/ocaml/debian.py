"""Which Debian package gives an opam package, read from a Debian mirror's own indexes.

A system platform takes OCaml libraries and tools from Debian, so each opam dependency must be
turned into a Debian package. Rather than guess names, `fetch_index` reads two indexes of a
release and architecture from the mirror:

- `dists/RELEASE/main/Contents-ARCH.gz` (lines `PATH  SECTION/PACKAGE[,SECTION/PACKAGE...]`,
  paths without the leading slash) says which package ships an OCaml library's `META` (in
  `usr/lib/ocaml/NAME/`, or in `usr/lib/TRIPLET/ocaml/VERSION/NAME/` as from trixie on) and which
  ships a tool `usr/bin/NAME`;
- `dists/RELEASE/main/binary-ARCH/Packages.xz` (or `.gz`) gives each package's version; a package
  it does not list is not installable and is left out.

How a name is chosen when several packages qualify (deterministic, so the same indexes always
give the same table):

- a library: Debian splits one into a runtime package (often the one shipping `META`, with the
  `.cma` and plugins) and a `-dev` package (the `.cmi`, `.cmx`, `.cmxa` a build needs). Among the
  packages shipping files in the library's directory, a `-dev` one is taken, the one shipping
  `META` first, then by name; without a `-dev` one, the package shipping `META` (by name, if
  several do);
- a tool: the packages of section `ocaml` first, then by name. Only the tools of OCaml packages
  (section `ocaml`, or shipping an OCaml library) and of packages named as their tool and as a
  library (`menhir`, in section `devel`) are kept: the rest of `/usr/bin` says nothing about
  opam packages (`/usr/bin/fmt` is coreutils').

An opam package's Debian packages (`DebianIndex.opam_packages`) are then those of its library
and of its tool (opam's `odoc` package is both, Debian splits it in `libodoc-ocaml-dev` and
`ocaml-odoc`), but for the few names that no file can tell (`COMPILER_PACKAGES`).
"""

from __future__ import annotations

import asyncio
import gzip
import lzma
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.obuilder.fetchers.debootstrap import RELEASES

# What the indexes cannot say: opam's `ocaml` is the compiler, and its `base-*` packages name parts
# of the compiler distribution (and, for `base-bytes`, findlib's compatibility library) that ship
# no META of that name.
COMPILER_PACKAGES: dict[str, str] = {
    "ocaml": "ocaml-nox",
    "base-unix": "ocaml-nox",
    "base-threads": "ocaml-nox",
    "base-bigarray": "ocaml-nox",
    "base-bytes": "ocaml-findlib",
}

# `usr/lib/ocaml/NAME/REST`, or `usr/lib/x86_64-linux-gnu/ocaml/5.3.0/NAME/REST`.
_LIBRARY_FILE = re.compile(r"usr/lib/(?:ocaml|[^/]+-linux-[^/]+/ocaml/[0-9][^/]*)/([^/]+)/(.+)")
_TOOL_FILE = re.compile(r"usr/bin/([^/]+)")
# An epoch (`1:`), a Debian revision (`-1+b1`), and a repack suffix (`+dfsg`, `+ds1`, `~dfsg`).
_UPSTREAM_VERSION = re.compile(r"^(?:[0-9]+:)?(.+?)(?:[+~](?:dfsg|ds|repack)[0-9.]*)?(?:-[^-]*)?$")
_TIMEOUT = 120


class DebianIndexError(Exception):
    """A mirror's index could not be fetched or read; the message names its URL."""


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package and its version (in the release's Packages index)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def upstream_version(self) -> str:
        """The version without epoch, Debian revision or repack suffix: `1:2.1.1+dfsg-2` gives
        `2.1.1`."""
        return upstream_version(self.version)


def release_name(release: str) -> str:
    """How a message names the release `release` (a codename): `Debian 13 (trixie)`, or
    `Debian sid` for one without a number."""
    number = next((n for n, codename in RELEASES.items() if codename == release), None)
    return f"Debian {release}" if number is None else f"Debian {number} ({release})"


def upstream_version(version: str) -> str:
    """The upstream part of the Debian version `version` (see `DebianPackage.upstream_version`)."""
    found = _UPSTREAM_VERSION.match(version)
    return found.group(1) if found else version


@dataclass(frozen=True)
class DebianIndex:
    """The OCaml part of a Debian release's indexes for one architecture.

    `libraries` maps a findlib name to the package to install for it, `tools` an executable's
    name to its package, `versions` every package either names (and those of
    `COMPILER_PACKAGES` the release has) to its version.
    """

    release: str
    arch: str
    libraries: dict[str, str] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def _package(self, name: str | None) -> DebianPackage | None:
        return None if name is None else DebianPackage(name, self.versions[name])

    def library(self, name: str) -> DebianPackage | None:
        """The package giving the OCaml library `name` (its findlib name), or None."""
        return self._package(self.libraries.get(name))

    def tool(self, name: str) -> DebianPackage | None:
        """The package shipping `/usr/bin/NAME` (of an OCaml package), or None."""
        return self._package(self.tools.get(name))

    def opam_packages(self, opam_name: str) -> tuple[DebianPackage, ...]:
        """The packages giving the opam package `opam_name`: its `COMPILER_PACKAGES` entry, else
        its library's and its tool's (both when Debian splits them, each once); empty when
        Debian has none."""
        if opam_name in COMPILER_PACKAGES:
            compiler = self._package(COMPILER_PACKAGES[opam_name])
            return () if compiler is None else (compiler,)
        found = [self.library(opam_name), self.tool(opam_name)]
        return tuple(dict.fromkeys(package for package in found if package is not None))

    def to_json(self) -> dict[str, Any]:
        """The index as JSON data (what the cache keeps); `from_json` reads it back."""
        return {"release": self.release, "arch": self.arch, "libraries": self.libraries,
                "tools": self.tools, "versions": self.versions}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DebianIndex:
        """The index `to_json` gave."""
        return cls(data["release"], data["arch"], dict(data["libraries"]), dict(data["tools"]),
                   dict(data["versions"]))


@dataclass
class _Candidates:
    """What the Contents index says, before the Packages index says what exists."""

    meta: dict[str, set[str]] = field(default_factory=dict)
    in_directory: dict[str, set[str]] = field(default_factory=dict)
    tools: dict[str, set[str]] = field(default_factory=dict)
    ocaml_section: set[str] = field(default_factory=set)

    def wanted(self) -> set[str]:
        """Every package that may end up in the table."""
        return ({*COMPILER_PACKAGES.values()}
                | set().union(*self.in_directory.values())
                | set().union(*self.tools.values()))


def _read_contents(lines: Iterable[bytes]) -> _Candidates:
    found = _Candidates()
    for raw in lines:
        # A cheap test first: the file has over a million lines, few of them OCaml's.
        if not raw.startswith((b"usr/lib/", b"usr/bin/")):
            continue
        parts = raw.decode("utf-8", "replace").rsplit(None, 1)
        if len(parts) != 2:
            continue
        path, locations = parts
        packages = []
        for location in locations.split(","):
            section, _, package = location.rpartition("/")
            packages.append(package)
            if section.rpartition("/")[2] == "ocaml":
                found.ocaml_section.add(package)
        if library := _LIBRARY_FILE.fullmatch(path):
            name, rest = library.groups()
            found.in_directory.setdefault(name, set()).update(packages)
            if rest == "META":
                found.meta.setdefault(name, set()).update(packages)
        elif tool := _TOOL_FILE.fullmatch(path):
            found.tools.setdefault(tool.group(1), set()).update(packages)
    return found


def _read_versions(lines: Iterable[bytes], wanted: set[str]) -> dict[str, str]:
    """`Package` → `Version` of the stanzas of `wanted` packages (the first stanza of each)."""
    versions: dict[str, str] = {}
    package: str | None = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line.strip():
            package = None
        elif line.startswith("Package:"):
            package = line.partition(":")[2].strip()
        elif line.startswith("Version:") and package in wanted:
            versions.setdefault(package, line.partition(":")[2].strip())
    return versions


def _choose_library(meta: set[str], in_directory: set[str]) -> str | None:
    dev = sorted(in_directory, key=lambda package: (package not in meta, package))
    dev = [package for package in dev if package.endswith("-dev")]
    if dev:
        return dev[0]
    return min(meta, default=None)


def parse_index(release: str, arch: str, contents: Iterable[bytes],
                packages: Iterable[bytes]) -> DebianIndex:
    """The index of `release` for `arch` from the lines of its Contents and Packages indexes
    (decompressed); lines of any other shape are ignored."""
    found = _read_contents(contents)
    return _finish(release, arch, found, _read_versions(packages, found.wanted()))


def _finish(release: str, arch: str, found: _Candidates, versions: dict[str, str]) -> DebianIndex:
    """The table from what Contents says, keeping only the packages `versions` has."""
    libraries = {}
    for name, owners in sorted(found.meta.items()):
        existing = {package for package in owners if package in versions}
        nearby = {package for package in found.in_directory[name] if package in versions}
        if (chosen := _choose_library(existing, nearby)) is not None:
            libraries[name] = chosen
    ocaml_packages = found.ocaml_section | set().union(*found.meta.values()) \
        | set(libraries.values())
    tools = {}
    for name, shippers in sorted(found.tools.items()):
        # menhir's package is in section devel: a package named as its tool and as a library
        # counts too (but not coreutils for `fmt`).
        candidates = sorted((package not in found.ocaml_section, package) for package in shippers
                            if (package in ocaml_packages or package == name in libraries)
                            and package in versions)
        if candidates:
            tools[name] = candidates[0][1]
    named = {*libraries.values(), *tools.values(), *COMPILER_PACKAGES.values()}
    return DebianIndex(release, arch, libraries, tools,
                       {package: versions[package] for package in sorted(named & set(versions))})


# Fetching

def contents_url(mirror: str, release: str, arch: str) -> str:
    """The URL of the Contents index of `release` for `arch` on `mirror`."""
    return f"{mirror.rstrip('/')}/dists/{release}/main/Contents-{arch}.gz"


def packages_urls(mirror: str, release: str, arch: str) -> tuple[str, str]:
    """The URLs of the Packages index, `.xz` first, then `.gz` (which older mirrors have)."""
    base = f"{mirror.rstrip('/')}/dists/{release}/main/binary-{arch}/Packages"
    return f"{base}.xz", f"{base}.gz"


@contextmanager
def _open(url: str) -> Iterator[IO[bytes]]:
    """The decompressed stream of `url`, read as it arrives; `DebianIndexError` naming the URL
    when it cannot be fetched or decompressed (`urllib.error.HTTPError` for an HTTP error)."""
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            opener = lzma.open if url.endswith(".xz") else gzip.open
            with opener(response, "rb") as stream:
                yield stream
    except urllib.error.HTTPError:
        raise
    except (OSError, EOFError, lzma.LZMAError) as err:
        reason = getattr(err, "reason", None) or err
        raise DebianIndexError(f"cannot fetch {url}: {reason}") from None


def _fetch(mirror: str, release: str, arch: str) -> DebianIndex:
    contents = contents_url(mirror, release, arch)
    xz, gz = packages_urls(mirror, release, arch)
    try:
        with _open(contents) as stream:
            found = _read_contents(stream)
        try:
            with _open(xz) as stream:
                versions = _read_versions(stream, found.wanted())
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            with _open(gz) as stream:
                versions = _read_versions(stream, found.wanted())
    except urllib.error.HTTPError as err:
        raise DebianIndexError(f"cannot fetch {err.url}: HTTP {err.code} {err.reason}") from None
    return _finish(release, arch, found, versions)


async def fetch_index(mirror: str, release: str, arch: str) -> DebianIndex:
    """The index of `release` for `arch`, fetched from `mirror` (e.g. `http://deb.debian.org/
    debian`) and read as it downloads, in a thread. Raises `DebianIndexError` ("cannot fetch URL:
    REASON") when the mirror cannot be reached or answers with an error."""
    return await asyncio.to_thread(_fetch, mirror, release, arch)
