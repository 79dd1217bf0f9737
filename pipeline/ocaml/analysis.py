"""What a commit of an OCaml project needs: its opam files and dependencies, dune, ocamlformat.

`analyse` finds the `*.opam` files of a checkout (as ocaml-ci does: up to depth 3, ignoring build
and VCS directories), reads each one's `depends` with `parse_opam`, and notes whether the project
has a `dune-project` and which ocamlformat version its `.ocamlformat` asks for. The result is a
frozen `Analysis`, serialised with `to_json` / `from_json` so the pipeline can cache it per commit.

`parse_opam` implements the opam file syntax (opam-file-format's lexer and grammar): fields
`name: value`, sections `name ["label"] { ... }`, strings (with escapes, over several lines, and
`\"\"\"triple-quoted\"\"\"`), idents, integers, booleans, lists `[ ... ]`, groups `( ... )`, options
`value { ... }`, the operators `& | ! ?`, relational and environment operators, and the comments
`# ...` and `(* ... *)` (nested). Any syntax error raises `AnalysisError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


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


# --- Tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    # kind: "string", "ident", "int", "bool", "op" (operators), or the punctuation itself
    # ("{", "}", "[", "]", "(", ")", ":"); "eof" at the end.
    kind: str
    text: str
    line: int


_IDENT = r"[A-Za-z0-9_-]*[A-Za-z_][A-Za-z0-9_-]*"
# A variable may be qualified by packages: `ocaml:version`, `foo+bar:installed`.
_IDENT_RE = re.compile(rf"(?:{_IDENT}(?:\+{_IDENT})*:)?{_IDENT}")
_INT_RE = re.compile(r"-?[0-9]+(?![A-Za-z0-9_-])")
# Longest first, so `>=` is not read as `>` then `=`.
_OPS = ("=+=", "+=", "=+", ":=", "=:", "!=", "<=", ">=", "=", "<", ">", "&", "|", "!", "?", "~")
_RELOPS = frozenset({"=", "!=", "<", "<=", ">", ">=", "~", "+=", "=+", ":=", "=:", "=+="})
_PUNCTUATION = frozenset("{}[]():")
_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", "r": "\r", "\\": "\\", '"': '"', "'": "'", " ": " "}
_NUMERIC_ESCAPE = re.compile(r"[0-9]{3}|x[0-9a-fA-F]{2}")
_CONTINUATION = re.compile(r"\r?\n[ \t]*")


class _Lexer:
    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.i = 0
        self.line = 1

    def error(self, line: int, message: str) -> AnalysisError:
        return AnalysisError(f"{self.path}:{line}: {message}")

    def _advance_to(self, end: int) -> None:
        self.line += self.text.count("\n", self.i, end)
        self.i = end

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        text = self.text
        while True:
            self._skip_blanks_and_comments()
            if self.i >= len(text):
                out.append(_Token("eof", "", self.line))
                return out
            c = text[self.i]
            if text.startswith('"""', self.i):
                out.append(self._string('"""'))
            elif c == '"':
                out.append(self._string('"'))
            elif c == ":" and text.startswith(":=", self.i):
                out.append(self._op())
            elif c in _PUNCTUATION:
                out.append(_Token(c, c, self.line))
                self.i += 1
            elif m := _INT_RE.match(text, self.i):
                out.append(_Token("int", m.group(), self.line))
                self.i = m.end()
            elif m := _IDENT_RE.match(text, self.i):
                kind = "bool" if m.group() in ("true", "false") else "ident"
                out.append(_Token(kind, m.group(), self.line))
                self.i = m.end()
            elif text.startswith(_OPS, self.i):
                out.append(self._op())
            else:
                raise self.error(self.line, f"expected a value, a field or a section; got `{c}`")

    def _op(self) -> _Token:
        op = next(o for o in _OPS if self.text.startswith(o, self.i))
        self.i += len(op)
        return _Token("op", op, self.line)

    def _skip_blanks_and_comments(self) -> None:
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c == "\n":
                self.line += 1
                self.i += 1
            elif c in " \t\r":
                self.i += 1
            elif c == "#":
                newline = text.find("\n", self.i)
                self.i = len(text) if newline < 0 else newline
            elif text.startswith("(*", self.i):
                self._comment()
            else:
                return

    def _comment(self) -> None:
        # OCaml-style comments nest, so count the openings still unclosed.
        start_line = self.line
        depth = 0
        pattern = re.compile(r"\(\*|\*\)")
        while True:
            m = pattern.search(self.text, self.i)
            if m is None:
                raise self.error(start_line, "expected `*)` to close the comment opened here")
            self._advance_to(m.end())
            depth += 1 if m.group() == "(*" else -1
            if depth == 0:
                return

    def _string(self, quote: str) -> _Token:
        text = self.text
        start_line = self.line
        self.i += len(quote)
        out: list[str] = []
        while True:
            if self.i >= len(text):
                raise self.error(start_line, f"expected `{quote}` to close the string opened here")
            if text.startswith(quote, self.i):
                self.i += len(quote)
                return _Token("string", "".join(out), start_line)
            c = text[self.i]
            if c == "\\":
                self._escape(out)
            else:
                if c == "\n":
                    self.line += 1
                out.append(c)
                self.i += 1

    def _escape(self, out: list[str]) -> None:
        after = self.i + 1
        if m := _CONTINUATION.match(self.text, after):
            self._advance_to(m.end())
        elif (c := self.text[after : after + 1]) in _ESCAPES:
            out.append(_ESCAPES[c])
            self.i = after + 1
        elif m := _NUMERIC_ESCAPE.match(self.text, after):
            digits = m.group()
            out.append(chr(int(digits[1:], 16) if digits[0] == "x" else int(digits)))
            self.i = m.end()
        else:
            raise self.error(self.line, f"expected a valid escape after `\\`; got `\\{c}`")


# --- Values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    # kind: "string", "ident", "int", "bool" (text holds the atom); "list", "group" (args hold
    # the items); "option" (args: the value, then the option's items); "logop", "relop",
    # "prefix" (text holds the operator, args the operands; a prefix relop has one).
    kind: str
    line: int
    text: str = ""
    args: tuple[_Value, ...] = ()


class _Parser:
    def __init__(self, tokens: list[_Token], lexer: _Lexer) -> None:
        self.tokens = tokens
        self.lexer = lexer
        self.pos = 0

    @property
    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def unexpected(self, expected: str) -> AnalysisError:
        token = self.peek
        if token.kind == "eof":
            got = "the end of the file"
        elif token.kind == "string":
            got = f"the string {json.dumps(token.text)}"
        else:
            got = f"`{token.text}`"
        return self.lexer.error(token.line, f"expected {expected}; got {got}")

    def items(self, closing: str) -> list[tuple[_Token, _Value | None]]:
        """Fields (name, value) and sections (name, None) up to `closing` ("eof" or "}")."""
        items: list[tuple[_Token, _Value | None]] = []
        while self.peek.kind != closing:
            name = self.peek
            if name.kind != "ident":
                raise self.unexpected("a field name or a section")
            self.take()
            if self.peek.kind == ":":
                self.take()
                items.append((name, self.value()))
                continue
            if self.peek.kind == "string" and self.tokens[self.pos + 1].kind == "{":
                self.take()  # the section's label, as in `extra-source "file" { ... }`
            if self.peek.kind != "{":
                raise self.unexpected(f"`:` after the field name `{name.text}`")
            opening = self.take()
            self.items("}")
            self.close("}", opening)
            items.append((name, None))
        return items

    def close(self, closing: str, opening: _Token) -> None:
        if self.peek.kind != closing:
            raise self.unexpected(
                f"`{closing}` to close the `{opening.text}` of line {opening.line}"
            )
        self.take()

    def values(self, closing: str, opening: _Token) -> tuple[_Value, ...]:
        values = []
        while self.peek.kind not in (closing, "eof", "}", "]", ")"):
            values.append(self.value())
        self.close(closing, opening)
        return tuple(values)

    def value(self) -> _Value:
        # Precedence as in opam-file-format: `|` < `&` < prefix and relational operators <
        # options `{...}`.
        left = self.conjunction()
        while self.peek.text == "|" and self.peek.kind == "op":
            op = self.take()
            left = _Value("logop", op.line, "|", (left, self.conjunction()))
        return left

    def conjunction(self) -> _Value:
        left = self.unary()
        while self.peek.text == "&" and self.peek.kind == "op":
            op = self.take()
            left = _Value("logop", op.line, "&", (left, self.unary()))
        return left

    def unary(self) -> _Value:
        token = self.peek
        if token.kind == "op" and token.text in ("!", "?"):
            self.take()
            return _Value("prefix", token.line, token.text, (self.unary(),))
        if token.kind == "op" and token.text in _RELOPS:
            # A constraint such as `>= "3.0"` in an option.
            self.take()
            return _Value("relop", token.line, token.text, (self.postfix(),))
        left = self.postfix()
        if self.peek.kind == "op" and self.peek.text in _RELOPS:
            op = self.take()
            return _Value("relop", op.line, op.text, (left, self.postfix()))
        return left

    def postfix(self) -> _Value:
        value = self.atom()
        while self.peek.kind == "{":
            opening = self.take()
            value = _Value("option", value.line, "", (value, *self.values("}", opening)))
        return value

    def atom(self) -> _Value:
        token = self.peek
        if token.kind in ("string", "ident", "int", "bool"):
            self.take()
            return _Value(token.kind, token.line, token.text)
        if token.kind in ("[", "("):
            self.take()
            closing = "]" if token.kind == "[" else ")"
            kind = "list" if token.kind == "[" else "group"
            return _Value(kind, token.line, "", self.values(closing, token))
        raise self.unexpected("a value")


# --- Dependencies -------------------------------------------------------------------------------


# The filter variables that make a dependency conditional, with the `Dependency` field each sets.
_ONLY_WHEN = {"with-test": "with_test", "build": "build", "with-doc": "with_doc"}


def _holds(value: _Value, false: str) -> bool | None:
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


def _all_hold(values: tuple[_Value, ...], false: str) -> bool | None:
    """The conjunction of the filters `values` (the items of an option `{...}`), as `_holds`."""
    results = [_holds(value, false) for value in values]
    if False in results:
        return False
    return True if all(result is True for result in results) else None


def _dependencies(value: _Value, path: str, only_when: frozenset[str],
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


def parse_opam(text: str, *, path: str) -> OpamFile:
    """Parse the opam file `text` found at `path` (relative to the repository root).

    Only `depends` is read (`depopts` and every other field are checked for syntax only); the
    package name is the file's stem, as opam takes it for `NAME.opam`. Raises `AnalysisError`
    "PATH:LINE: expected ..." for a syntax error, a repeated `depends`, or a `depends` entry that
    is not a package formula.
    """
    lexer = _Lexer(text, path)
    parser = _Parser(lexer.tokens(), lexer)
    depends: _Value | None = None
    for name, value in parser.items("eof"):
        if name.text != "depends" or value is None:
            continue
        if depends is not None:
            raise lexer.error(name.line, f"expected one `depends` field; line {depends.line} "
                                         "has another")
        depends = value
    deps: list[Dependency] = []
    if depends is not None:
        # opam accepts a one-element list written without brackets.
        formulas = depends.args if depends.kind == "list" else (depends,)
        for formula in formulas:
            _dependencies(formula, path, frozenset(), deps)
    stem = Path(path).name.removesuffix(".opam")
    return OpamFile(path=path, name=stem, depends=_merge(deps))


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
