"""What a commit of an OCaml project needs: its opam files and dependencies, dune, ocamlformat.

`analyse` finds the `*.opam` files of a checkout (as ocaml-ci does: up to depth 3, ignoring build
and VCS directories), reads each one's `depends` with `parse_opam`, and notes whether the project
has a `dune-project` and which ocamlformat version its `.ocamlformat` asks for. The result is a
frozen `Analysis`, serialised with `to_json` / `from_json` so the pipeline can cache it per commit.

`parse_opam` reads an opam file with `pipeline.ocaml.opam_syntax` (opam-file-format's lexer and
grammar); any syntax error raises `AnalysisError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.ocaml.opam_syntax import Document, Field, OpamSyntaxError, Value, parse


class AnalysisError(Exception):
    """The project cannot be analysed; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Dependency:
    """A package in `depends`; `with_test` / `build` / `with_doc` when its filter holds only with
    that variable true (`{with-test}`, `{with-doc & >= "2.0"}`; not `{with-test | with-doc}`):
    the package is needed only to run the tests, to build, or to make the documentation."""

    name: str
    with_test: bool = False
    build: bool = False
    with_doc: bool = False


@dataclass(frozen=True)
class OpamFile:
    """An opam file: its path relative to the repository root, its package name (the file's stem)
    and its dependencies, each name once, in the order first written."""

    path: str
    name: str
    depends: tuple[Dependency, ...]


@dataclass(frozen=True)
class Analysis:
    """The opam files sorted by path; whether `dune-project` exists; `.ocamlformat`'s `version=`."""

    opam_files: tuple[OpamFile, ...]
    dune_project: bool
    ocamlformat_version: str | None


# --- Dependencies -------------------------------------------------------------------------------


# The filter variables that make a dependency conditional, with the `Dependency` field each sets.
_ONLY_WHEN = {"with-test": "with_test", "build": "build", "with-doc": "with_doc"}


def _holds(value: Value, false: str) -> bool | None:
    """Whether the filter `value` holds when the variable `false` is false: True, False, or None
    when that depends on something else (another variable, a version constraint).

    Three-valued logic, as for unknowns: `a & b` is false when either is, `a | b` when both are,
    `!a` negates, a group is the conjunction of its items; anything else is unknown.
    """
    if value.kind == "ident":
        return False if value.text == false else None
    if value.kind == "bool":
        return value.text == "true"
    if value.kind == "prefix" and value.text == "!":
        inner = _holds(value.args[0], false)
        return None if inner is None else not inner
    if value.kind == "logop" and value.text == "|":
        left, right = (_holds(arg, false) for arg in value.args)
        if left is True or right is True:
            return True
        return False if left is False and right is False else None
    if value.kind in ("logop", "group"):
        return _all_hold(value.args, false)
    return None


def _all_hold(values: tuple[Value, ...], false: str) -> bool | None:
    """The conjunction of the filters `values` (the items of an option `{...}`), as `_holds`."""
    results = [_holds(value, false) for value in values]
    if False in results:
        return False
    return True if all(result is True for result in results) else None


def _dependencies(value: Value, path: str, only_when: frozenset[str],
                  out: list[Dependency]) -> None:
    """Append the packages of a package formula to `out`; `only_when` holds the variables
    (`with-test`, `build`, `with-doc`) without which the enclosing filters cannot hold.

    Of an alternative `a | b` only `a` is kept: there is no solver here to choose, and the first
    alternative is the one the authors prefer.
    """
    if value.kind == "string":
        out.append(Dependency(value.text, **{_ONLY_WHEN[v]: True for v in only_when}))
    elif value.kind == "option":
        # `{with-doc & >= "2.0"}` needs with-doc; `{with-test | with-doc}` needs neither.
        needed = {v for v in _ONLY_WHEN if _all_hold(value.args[1:], v) is False}
        _dependencies(value.args[0], path, only_when | needed, out)
    elif value.kind == "logop" and value.text == "|":
        _dependencies(value.args[0], path, only_when, out)
    elif value.kind in ("logop", "group"):
        for arg in value.args:
            _dependencies(arg, path, only_when, out)
    else:
        shown = value.text or value.kind
        raise AnalysisError(f"{path}:{value.line}: expected a package name (a string); "
                            f"got `{shown}`")


def _merge(deps: list[Dependency]) -> tuple[Dependency, ...]:
    """Each name once, first occurrence first: test-only (build-only, doc-only) if every mention
    is."""
    merged: dict[str, Dependency] = {}
    for dep in deps:
        seen = merged.get(dep.name)
        merged[dep.name] = dep if seen is None else Dependency(
            dep.name, seen.with_test and dep.with_test, seen.build and dep.build,
            seen.with_doc and dep.with_doc,
        )
    return tuple(merged.values())


def dependencies(document: Document) -> tuple[Dependency, ...]:
    """The packages of the `depends` field of the opam file `document`, each name once, in
    the order first written. Raises `AnalysisError` "PATH:LINE: expected ..." for a repeated
    `depends` or an entry that is not a package formula."""
    depends: Value | None = None
    for item in document.items:
        if not isinstance(item, Field) or item.name != "depends":
            continue
        if depends is not None:
            raise AnalysisError(f"{document.path}:{item.line}: expected one `depends` field; "
                                f"line {depends.line} has another")
        depends = item.value
    deps: list[Dependency] = []
    if depends is not None:
        for formula in depends.as_list():
            _dependencies(formula, document.path, frozenset(), deps)
    return _merge(deps)


def parse_opam(text: str, *, path: str) -> OpamFile:
    """Parse the opam file `text` found at `path` (relative to the repository root).

    Only `depends` is read (`depopts` and every other field are checked for syntax only); the
    package name is the file's stem, as opam takes it for `NAME.opam`. Raises `AnalysisError`
    "PATH:LINE: expected ..." for a syntax error, a repeated `depends`, or a `depends` entry that
    is not a package formula.
    """
    try:
        document = parse(text, path=path)
    except OpamSyntaxError as error:
        raise AnalysisError(str(error)) from None
    stem = Path(path).name.removesuffix(".opam")
    return OpamFile(path=path, name=stem, depends=dependencies(document))


# --- The project --------------------------------------------------------------------------------

_IGNORED_DIRS = frozenset({"_build", "_opam", ".git"})
_MAX_DEPTH = 3
_VERSION_LINE = re.compile(r"\s*version\s*=\s*(\S+)\s*$")


def _opam_paths(root: Path) -> list[str]:
    """Relative paths of the `*.opam` files at depth 1 (the root) to `_MAX_DEPTH`, sorted.

    Symlinks are not followed: a checkout could point them outside itself.
    """
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        rel = Path(directory).relative_to(root)
        depth = 1 if rel == Path(".") else len(rel.parts) + 1
        dirs[:] = [] if depth >= _MAX_DEPTH else [d for d in dirs if d not in _IGNORED_DIRS]
        for name in files:
            full = Path(directory, name)
            if name.endswith(".opam") and name != ".opam" and not full.is_symlink():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def _ocamlformat_version(root: Path) -> str | None:
    """The `version=` of `.ocamlformat`; None if the file or the line is missing."""
    path = root / ".ocamlformat"
    if path.is_symlink() or not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if m := _VERSION_LINE.match(line):
            return m.group(1)
    return None


def analyse(root: Path) -> Analysis:
    """Analyse the checkout at `root`.

    Raises `AnalysisError("No opam files found")` when there is no opam file within depth 3
    (outside `_build`, `_opam` and `.git`), "PATH: not valid UTF-8" for an undecodable opam file,
    and `parse_opam`'s "PATH:LINE: ..." for a malformed one.
    """
    paths = _opam_paths(root)
    if not paths:
        raise AnalysisError("No opam files found")
    opam_files = []
    for path in paths:
        try:
            text = (root / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AnalysisError(f"{path}: not valid UTF-8") from None
        opam_files.append(parse_opam(text, path=path))
    return Analysis(
        opam_files=tuple(opam_files),
        dune_project=(root / "dune-project").is_file(),
        ocamlformat_version=_ocamlformat_version(root),
    )


def to_json(a: Analysis) -> str:
    """`a` as JSON text (keys sorted, so the same analysis always gives the same text)."""
    return json.dumps({
        "opam_files": [
            {"path": f.path, "name": f.name,
             "depends": [[d.name, d.with_test, d.build, d.with_doc] for d in f.depends]}
            for f in a.opam_files
        ],
        "dune_project": a.dune_project,
        "ocamlformat_version": a.ocamlformat_version,
    }, sort_keys=True)


def from_json(s: str) -> Analysis:
    """The analysis `to_json` wrote; raises `AnalysisError` for text of any other shape."""
    try:
        data = json.loads(s)
        return Analysis(
            opam_files=tuple(
                OpamFile(path=str(f["path"]), name=str(f["name"]), depends=tuple(
                    Dependency(str(name), bool(with_test), bool(build), bool(with_doc))
                    for name, with_test, build, with_doc in f["depends"]
                ))
                for f in data["opam_files"]
            ),
            dune_project=bool(data["dune_project"]),
            ocamlformat_version=data["ocamlformat_version"],
        )
    except (ValueError, KeyError, TypeError) as err:
        raise AnalysisError(f"invalid analysis JSON: {err}") from None
