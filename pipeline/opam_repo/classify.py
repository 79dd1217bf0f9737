"""What a pull request does to each package version it touches, from the paths it changes.

The layout of an opam repository is `packages/NAME/NAME.VERSION/opam`, with the version's
patches and other files under `packages/NAME/NAME.VERSION/files/`. `touched_packages` maps the
changed paths onto package versions (a path elsewhere under `packages/` is a `LayoutError`;
paths outside `packages/` are ignored), and `classify` gives each one's kind, as opam-repo-ci
does:

- its opam file gone: "deleted";
- `available: false`: "unavailable" (linted, not built);
- no opam file on the base: "new-package" when the base has no `packages/NAME` either, else
  "new-release";
- a file under `files/` changed: "significant";
- the opam files equal once parsed, after dropping the fields that cannot change a build
  (`INSIGNIFICANT_FIELDS`, and `x-*` fields but `x-ci-*`): "insignificant" (not built);
  formatting and comments never count, since parsed values ignore them;
- anything else: "significant".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.ocaml.analysis import AnalysisError, dependencies
from pipeline.ocaml.opam_syntax import Document, Field, OpamSyntaxError, Section, parse
from pipeline.opam_repo.model import BUILT_KINDS, Kind, PackageChange

LAYOUT = "packages/NAME/NAME.VERSION/opam or packages/NAME/NAME.VERSION/files/..."
"""The paths a pull request may change under `packages/`."""

INSIGNIFICANT_FIELDS = frozenset({
    "description", "synopsis", "maintainer", "authors", "homepage", "doc", "bug-reports",
    "dev-repo", "tags"})
"""The fields whose changes cannot affect a build (beside `x-*` fields other than `x-ci-*`)."""


class LayoutError(ValueError):
    """A changed path under `packages/` outside the repository's layout; the message names the
    path and the layout."""


@dataclass(frozen=True)
class Touched:
    """A package version ("NAME.VERSION") whose files a pull request changes: its opam file,
    files under its `files/`, or both."""

    name: str
    version: str
    opam_changed: bool = False
    files_changed: bool = False

    @property
    def package(self) -> str:
        """"NAME.VERSION"."""
        return f"{self.name}.{self.version}"

    @property
    def directory(self) -> str:
        """`packages/NAME/NAME.VERSION`, relative to the repository's root."""
        return f"packages/{self.name}/{self.package}"

    @property
    def opam_path(self) -> str:
        """Its opam file, relative to the repository's root."""
        return f"{self.directory}/opam"


def touched_packages(paths: Iterable[str]) -> list[Touched]:
    """The package versions that the changed `paths` touch, sorted by package; raises
    `LayoutError` for the first path under `packages/` that is outside the layout."""
    touched: dict[tuple[str, str], Touched] = {}
    for path in paths:
        parts = path.split("/")
        if parts[0] != "packages":
            continue
        name = parts[1] if len(parts) > 1 else ""
        directory = parts[2] if len(parts) > 2 else ""
        version = directory.removeprefix(f"{name}.") if directory.startswith(f"{name}.") else ""
        is_opam = len(parts) == 4 and parts[3] == "opam"
        is_file = len(parts) >= 5 and parts[3] == "files"
        if not name or not version or not (is_opam or is_file):
            raise LayoutError(f"{path}: not in the repository's layout (expected {LAYOUT})")
        seen = touched.get((name, version), Touched(name, version))
        touched[(name, version)] = Touched(name, version, seen.opam_changed or is_opam,
                                           seen.files_changed or is_file)
    return [touched[key] for key in sorted(touched, key=lambda key: f"{key[0]}.{key[1]}")]


def significant_items(document: Document) -> tuple[Field | Section, ...]:
    """The items of an opam file that can affect a build: all but `INSIGNIFICANT_FIELDS` and
    `x-*` fields other than `x-ci-*` (which tell the CI what to do)."""
    return tuple(item for item in document.items if not (
        isinstance(item, Field) and (item.name in INSIGNIFICANT_FIELDS or (
            item.name.startswith("x-") and not item.name.startswith("x-ci-")))))


def has_tests(document: Document) -> bool:
    """Whether the package has tests to run: a `run-test` field or a `{with-test}`
    dependency (an unreadable `depends` has none: the lint reports it)."""
    if "run-test" in document.fields:
        return True
    try:
        return any(dependency.with_test for dependency in dependencies(document))
    except AnalysisError:
        return False


def _parsed(text: str | None, path: str) -> Document | None:
    """`text` parsed; None when missing or malformed (the lint reports the syntax error)."""
    if text is None:
        return None
    try:
        return parse(text, path=path)
    except OpamSyntaxError:
        return None


def classify(touched: Touched, base_opam: str | None, merged_opam: str | None, *,
             name_on_base: bool) -> PackageChange:
    """The kind of change to `touched` whose opam file is `base_opam` on the base and
    `merged_opam` merged (None where there is none); `name_on_base` when the base has
    `packages/NAME`. Raises `LayoutError` for files of a version that has no opam file."""
    if merged_opam is None:
        if base_opam is None:
            raise LayoutError(f"{touched.directory}: no opam file beside files/ "
                              f"(expected {LAYOUT})")
        return PackageChange(touched.package, "deleted")
    merged = _parsed(merged_opam, touched.opam_path)
    kind: Kind
    available = None if merged is None else merged.value("available")
    if available is not None and [(v.kind, v.text) for v in available.as_list()] == [
            ("bool", "false")]:
        kind = "unavailable"
    elif base_opam is None:
        kind = "new-release" if name_on_base else "new-package"
    elif touched.files_changed or merged is None:
        kind = "significant"
    else:
        base = _parsed(base_opam, touched.opam_path)
        same = base is not None and significant_items(base) == significant_items(merged)
        kind = "insignificant" if same else "significant"
    tests = kind in BUILT_KINDS and merged is not None and has_tests(merged)
    return PackageChange(touched.package, kind, tests)
