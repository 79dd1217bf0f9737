"""Record the excerpt of Debian bookworm's amd64 indexes that the tests read.

    .venv/bin/python tests/data/debian/record.py [MIRROR]

MIRROR defaults to http://deb.debian.org/debian. Writes, next to this script:

- `Contents-amd64`: of `dists/bookworm/main/Contents-amd64.gz`, every OCaml library's `META`
  line (`usr/lib/ocaml/NAME/META`), one more line of the library's directory per other package
  shipping files there (what picks the `-dev` package), the `usr/bin` lines of OCaml packages
  (section `ocaml`, or shipping a library) and of tools named as a library, and the file's first
  lines (which are not OCaml's, to check they are ignored);
- `Packages`: of `dists/bookworm/main/binary-amd64/Packages.xz`, the stanza of every package
  those lines name (and of the compiler packages), reduced to `Package`, `Version`, `Section`.

Run it again to refresh the excerpt when Debian updates bookworm, then fix what the tests say.
"""

from __future__ import annotations

import gzip
import lzma
import re
import sys
import urllib.request
from pathlib import Path

from pipeline.ocaml.debian import COMPILER_PACKAGES, contents_url, packages_urls

HERE = Path(__file__).resolve().parent
RELEASE, ARCH = "bookworm", "amd64"
LIBRARY_FILE = re.compile(r"usr/lib/ocaml/([^/]+)/(.+)")
FIELDS = ("Package", "Version", "Section")
NOISE_LINES = 3


def packages_of(locations: str) -> list[tuple[str, str]]:
    """(section, package) of each `SECTION/PACKAGE` of a Contents line."""
    return [tuple(location.rsplit("/", 1)) for location in locations.split(",")]  # type: ignore[misc]


def record_contents(mirror: str) -> tuple[list[str], set[str]]:
    """The excerpt's lines and the packages they name."""
    libraries: dict[str, list[str]] = {}
    seen_in_directory: set[tuple[str, str]] = set()
    tools: list[tuple[str, str]] = []
    noise: list[str] = []
    with urllib.request.urlopen(contents_url(mirror, RELEASE, ARCH)) as response, \
            gzip.open(response, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if len(noise) < NOISE_LINES:
                noise.append(line)
            path, _, locations = line.rstrip("\n").rpartition(" ")
            path = path.rstrip()
            if found := LIBRARY_FILE.fullmatch(path):
                name, rest = found.groups()
                for _, package in packages_of(locations):
                    if rest == "META" or (name, package) not in seen_in_directory:
                        seen_in_directory.add((name, package))
                        libraries.setdefault(name, []).append(line)
            elif path.startswith("usr/bin/"):
                tools.append((path.removeprefix("usr/bin/"), line))
    library_lines = [line for name in sorted(libraries) for line in libraries[name]]
    library_packages = {package for line in library_lines
                        for _, package in packages_of(line.split()[-1])}
    tool_lines = [line for name, line in tools
                  if name in libraries or any(
                      section.endswith("ocaml") or package in library_packages
                      for section, package in packages_of(line.split()[-1]))]
    kept = noise + library_lines + tool_lines
    named = {package for line in kept for _, package in packages_of(line.split()[-1])}
    return kept, named


def record_packages(mirror: str, wanted: set[str]) -> list[str]:
    """The reduced stanzas of the `wanted` packages, in the index's order."""
    stanzas: list[str] = []
    fields: dict[str, str] = {}
    with urllib.request.urlopen(packages_urls(mirror, RELEASE, ARCH)[0]) as response, \
            lzma.open(response, "rt", encoding="utf-8") as lines:
        for line in [*lines, "\n"]:
            if not line.strip():
                if fields.get("Package") in wanted:
                    stanzas.append("".join(f"{key}: {fields[key]}\n" for key in FIELDS
                                           if key in fields) + "\n")
                fields = {}
            elif not line[0].isspace():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return stanzas


def main() -> None:
    mirror = sys.argv[1] if len(sys.argv) > 1 else "http://deb.debian.org/debian"
    lines, named = record_contents(mirror)
    (HERE / f"Contents-{ARCH}").write_text("".join(lines))
    stanzas = record_packages(mirror, named | set(COMPILER_PACKAGES.values()))
    (HERE / "Packages").write_text("".join(stanzas))
    print(f"{len(lines)} Contents lines, {len(stanzas)} Packages stanzas")


if __name__ == "__main__":
    main()
