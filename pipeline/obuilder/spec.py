"""The builder's spec language: parsing, validation, a canonical printer and Dockerfile output.

A spec is an s-expression, in OBuilder's spec language (`builder.py` says what each op does)::

    SPEC ::= ((build NAME SPEC)* (from IMAGE) OP*)
    OP   ::= (comment TEXT) | (workdir DIR) | (shell ARG...) | (env NAME VALUE)
           | (user (uid N) (gid N)) | (user (name NAME))
           | (run [(cache (ID (target PATH))...)] [(network NAME...)]
                  [(secrets (ID (target PATH))...)] (shell CMD))
           | (copy [(from context | (build NAME))] (src PATH...) (dst PATH) [(exclude NAME...)])

`parse` reads one with sexpdata's reader, extended to record where each node starts (so every
`SpecError` names a line and column) and to decode strings with OCaml's escapes, as OBuilder does
through sexplib. The values are frozen dataclasses compared by content; `to_sexp` prints them in a
canonical form and `to_dockerfile` converts them the way OBuilder's `Obuilder_spec.Docker` does.

Whatever the text, `parse` returns a Spec or raises `SpecError`. Lists nest at most `MAX_NESTING`
deep and stages at most `MAX_BUILD_DEPTH` deep, so that reading, comparing, hashing, printing and
building a spec stay far below Python's recursion limit; text with lone surrogates or a leading
byte order mark is refused. Messages quote names from the spec cut short and with invisible
characters escaped, so that an error is one line that cannot drive the terminal showing it.
`decode` turns a file's bytes into text, locating the first byte that is not UTF-8.
"""

from __future__ import annotations

import bisect
import json
import posixpath
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import sexpdata

from pipeline.obuilder.protocols import BuildError

# --- The data model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comment:
    """`(comment TEXT)`: documentation only; building it does nothing."""

    text: str


@dataclass(frozen=True)
class Workdir:
    """`(workdir DIR)`: later steps run in DIR; a relative DIR joins the previous workdir."""

    dir: str


@dataclass(frozen=True)
class Shell:
    """`(shell ARG...)`: a `run` command is appended to these arguments to form its argv."""

    args: tuple[str, ...]


@dataclass(frozen=True)
class Env:
    """`(env NAME VALUE)`: sets a variable for later steps, replacing an earlier binding."""

    name: str
    value: str


@dataclass(frozen=True)
class UserIds:
    """`(user (uid N) (gid N))`: later steps run, and copied files belong to, these ids."""

    uid: int
    gid: int


@dataclass(frozen=True)
class UserName:
    """`(user (name NAME))`: later steps run as a user known by name (as on Windows)."""

    name: str


User = UserIds | UserName
ROOT = UserIds(0, 0)


@dataclass(frozen=True)
class CacheMount:
    """`(ID (target PATH))` in `run`: the persistent cache ID is mounted read-write at PATH."""

    id: str
    target: str


@dataclass(frozen=True)
class SecretMount:
    """`(ID (target PATH))` in `run`: the secret ID, supplied at build time, is mounted at PATH."""

    id: str
    target: str


@dataclass(frozen=True)
class Run:
    """`(run ... (shell CMD))`: runs CMD with the current shell, mounts and network."""

    shell: str
    cache: tuple[CacheMount, ...] = ()
    network: tuple[str, ...] = ()
    secrets: tuple[SecretMount, ...] = ()


@dataclass(frozen=True)
class Build:
    """`(build NAME)` as the source of a `copy`: the result of the stage NAME."""

    name: str


@dataclass(frozen=True, kw_only=True)
class Copy:
    """`(copy (from ...) (src PATH...) (dst PATH) (exclude NAME...))`: copies files into the image.

    `from_` is `"context"` (the build context) or a `Build` naming a stage in scope.
    """

    from_: Literal["context"] | Build = "context"
    src: tuple[str, ...]
    dst: str
    exclude: tuple[str, ...] = ()


Op = Comment | Workdir | Shell | Env | UserIds | UserName | Run | Copy


@dataclass(frozen=True, kw_only=True)
class Spec:
    """A stage: its child stages (name, spec) in order, its base image and its ops."""

    child_builds: tuple[tuple[str, Spec], ...] = ()
    from_: str
    ops: tuple[Op, ...] = ()


class SpecError(BuildError):
    """A spec that cannot be read or is invalid; `line` and `column` (1-based) locate the problem.

    `str(err)` is "LINE:COL: message", prefixed by "FILENAME:" when `filename` is set. An error
    about a whole file (one that cannot be opened) has no line and column: "FILENAME: message".
    """

    def __init__(
        self,
        message: str,
        line: int | None = None,
        column: int | None = None,
        filename: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.filename = filename

    def __str__(self) -> str:
        where = "" if self.line is None else f"{self.line}:{self.column}:"
        if self.filename:
            where = f"{self.filename}:{where}"
        return f"{where} {self.message}" if where else self.message


# --- Reading s-expressions with positions ---------------------------------------------------------


@dataclass(frozen=True)
class _Atom:
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class _List:
    items: tuple[_Atom | _List, ...]
    line: int
    column: int
    # Where its `)` is, to point at the end of a list that lacks an item.
    end_line: int
    end_column: int


_Node = _Atom | _List

# How deeply lists may nest. The deepest valid spec, MAX_BUILD_DEPTH stages nested, needs 2
# levels per stage and 5 for its deepest op, `(run (cache (ID (target PATH))))`; the reader
# recurses once per level, so the limit also keeps it far below Python's recursion limit.
MAX_NESTING = 200
# How deeply `(build NAME SPEC)` stages may nest. Reading, comparing, hashing, printing and
# building a spec recurse into its child stages, several Python frames per stage: a bound keeps
# every one of them far below Python's recursion limit, where making each iterative would not.
MAX_BUILD_DEPTH = 64
# Python strings may hold lone surrogates, which are not Unicode text and cannot be encoded.
_SURROGATE = re.compile("[\ud800-\udfff]")

_SIMPLE_ESCAPES = {
    "n": b"\n", "t": b"\t", "b": b"\b", "r": b"\r",
    "\\": b"\\", '"': b'"', "'": b"'", " ": b" ",
}
_NUMERIC_ESCAPE = re.compile(r"(\d{3})|x([0-9a-fA-F]{2})|o([0-3][0-7]{2})")
_CONTINUATION = re.compile(r"\r?\n[ \t]*")
_STRING_SPECIAL = re.compile(r'["\\]')


class _Reader(sexpdata.Parser):
    """sexpdata's reader, changed to keep each node's position and to read strings as sexplib does.

    sexpdata scans the unquoted atoms and defines the `;` comments; the list and string readers are
    replaced because sexpdata records no positions and knows only a few backslash escapes.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, line_comment=";")
        # As in sexplib, only blanks, parentheses, `"` and `;` end an unquoted atom: `[`, `'`
        # and `\` are ordinary characters there, not sexpdata's brackets, quote and escape.
        self.atom_end = set('();"') | set(string.whitespace)
        self.atom_end_or_escape_re = re.compile("[" + re.escape("".join(self.atom_end)) + "]")
        self._line_starts = [0, *(m.end() for m in re.finditer("\n", text))]

    def position(self, index: int) -> tuple[int, int]:
        """The 1-based line and column of `self.string[index]`."""
        line = bisect.bisect_right(self._line_starts, index)
        return line, index - self._line_starts[line - 1] + 1

    def error(self, index: int, message: str) -> SpecError:
        """A `SpecError` located at `self.string[index]`."""
        return SpecError(message, *self.position(index))

    def atom(self, token: str) -> str:
        """Every atom is text: sexplib has no numbers, `nil` or `t`."""
        return token

    def read(self) -> list[_Node]:
        """All the top-level nodes of the text."""
        if self.string.startswith("\ufeff"):
            # Invisible, it would read as an atom before the spec.
            raise self.error(
                0, "the text starts with a byte order mark (U+FEFF); save the spec without one"
            )
        surrogate = _SURROGATE.search(self.string)
        if surrogate:
            raise self.error(
                surrogate.start(),
                f"invalid character U+{ord(surrogate.group()):04X} (a lone surrogate);"
                " a spec must be Unicode text",
            )
        end, nodes = self.parse_sexp(0, 0)
        if end < len(self.string):
            # parse_sexp stops early only at a `)` that no `(` opened.
            raise self.error(end, "unexpected `)`")
        return nodes

    def parse_sexp(self, i: int, depth: int) -> tuple[int, list[_Node]]:
        """The nodes from `i`, inside `depth` lists, up to an unmatched `)` or the end; returns
        where it stopped."""
        text = self.string
        nodes: list[_Node] = []
        while i < len(text):
            c = text[i]
            if c in string.whitespace:
                i += 1
            elif c == ";":
                newline = text.find("\n", i)
                i = len(text) if newline < 0 else newline + 1
            elif c == "(":
                if depth == MAX_NESTING:
                    raise self.error(
                        i, f"nesting deeper than {MAX_NESTING} levels; a spec needs far fewer"
                    )
                end, items = self.parse_sexp(i + 1, depth + 1)
                if end >= len(text):
                    raise self.error(i, "`(` is never closed; expected `)`")
                nodes.append(_List(tuple(items), *self.position(i), *self.position(end)))
                i = end + 1
            elif c == ")":
                break
            else:
                start = i
                i, value = self.parse_str(i) if c == '"' else self.parse_atom(i)
                nodes.append(_Atom(value, *self.position(start)))
        return i, nodes

    def parse_str(self, i: int) -> tuple[int, str]:
        """The quoted string at `i`, decoded; returns the index after its closing quote."""
        text = self.string
        start = i
        # Escapes denote bytes (OCaml strings are bytes), so decode only once they are all in.
        out = bytearray()
        i += 1
        while True:
            special = _STRING_SPECIAL.search(text, i)
            if special is None:
                raise self.error(start, 'unterminated string; expected a closing `"`')
            out += text[i : special.start()].encode()
            if special.group() == '"':
                break
            i = self._escape(special.start(), out)
        try:
            return special.end(), out.decode()
        except UnicodeDecodeError:
            raise self.error(start, "the string's escapes do not form valid UTF-8") from None

    def _escape(self, backslash: int, out: bytearray) -> int:
        """Decode the escape starting at `backslash` into `out`; returns the index after it."""
        text = self.string
        after = backslash + 1
        continuation = _CONTINUATION.match(text, after)
        if continuation:
            return continuation.end()
        simple = _SIMPLE_ESCAPES.get(text[after : after + 1])
        if simple is not None:
            out += simple
            return after + 1
        numeric = _NUMERIC_ESCAPE.match(text, after)
        if numeric:
            decimal, hexadecimal, octal = numeric.groups()
            if decimal:
                value = int(decimal)
                if value > 255:
                    raise self.error(
                        backslash, f"illegal escape `\\{decimal}`; expected \\000 to \\255"
                    )
            else:
                value = int(hexadecimal, 16) if hexadecimal else int(octal, 8)
            out.append(value)
            return numeric.end()
        # sexplib keeps any other backslash as written, so "sed 's/\./x/'" reads as it looks.
        out += b"\\"
        return after


# --- From s-expressions to a Spec -----------------------------------------------------------------


def _fail(node: _Node, message: str) -> SpecError:
    return SpecError(message, node.line, node.column)


# How many characters of a name from the spec an error message quotes.
_SHOWN_LENGTH = 60


def _shown(text: str) -> str:
    """`text` as an error message quotes it: cut short, so that the message stays one readable
    line, and with invisible characters escaped, so that it cannot drive the terminal."""
    if len(text) > _SHOWN_LENGTH:
        text = text[:_SHOWN_LENGTH] + "…"
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _head(node: _Node) -> str | None:
    """The name of a `(name ...)` form, or None if `node` is not one."""
    if isinstance(node, _List) and node.items and isinstance(node.items[0], _Atom):
        return node.items[0].text
    return None


def _atoms(node: _List, form: str, *, exactly: int | None = None, at_least: int = 0) -> list[str]:
    """The atoms after the head of `node`, which must have the shape `form` ("(env NAME VALUE)")."""
    texts = []
    for arg in node.items[1:]:
        if isinstance(arg, _List):
            raise _fail(arg, f"expected {form}; got a list here")
        texts.append(arg.text)
    if (exactly is not None and len(texts) != exactly) or len(texts) < at_least:
        count = f"{len(texts)} argument" + ("" if len(texts) == 1 else "s")
        raise _fail(node, f"expected {form}; got {count}")
    return texts


def _fields(node: _List, op: str, allowed: tuple[str, ...]) -> dict[str, _List]:
    """The `(field ...)` items of a record-like op, by name; each at most once, all in `allowed`."""
    expected = f"expected one of {', '.join(allowed)}"
    fields: dict[str, _List] = {}
    for item in node.items[1:]:
        name = _head(item)
        if name is None:
            raise _fail(item, f"expected a field (NAME ...) in {op}; {expected}")
        assert isinstance(item, _List)
        if name not in allowed:
            raise _fail(item.items[0], f"unknown field `{_shown(name)}` in {op}; {expected}")
        if name in fields:
            raise _fail(item.items[0], f"duplicate field `{_shown(name)}` in {op}")
        fields[name] = item
    return fields


def _required(fields: dict[str, _List], node: _List, op: str, name: str, form: str) -> _List:
    if name not in fields:
        raise _fail(node, f"{op}: {form} missing")
    return fields[name]


class _Scope:
    """The stages a copy may name: for each enclosing stage, its first `count` children.

    The children of a stage share one dict of their positions, so that the scope of each child
    costs O(depth) rather than a copy of every name: a stage with thousands of children reads
    in linear time, not quadratic.
    """

    def __init__(self, levels: tuple[tuple[dict[str, int], int], ...] = ()) -> None:
        self.levels = levels

    def inner(self, positions: dict[str, int], count: int) -> _Scope:
        """This scope and the children whose `positions` (from 0) are below `count`."""
        return _Scope((*self.levels, (positions, count)))

    def __contains__(self, name: str) -> bool:
        return any(positions.get(name, count) < count for positions, count in self.levels)

    def names(self) -> list[str]:
        """The names in scope, sorted."""
        return sorted(
            {name for names, count in self.levels for name, at in names.items() if at < count}
        )


# How many names an unknown build's error lists.
_NAMES_SHOWN = 10


def _unknown_build(name: str, scope: _Scope) -> str:
    message = f"unknown build `{_shown(name)}`"
    names = scope.names()
    # Imported here: only a misspelt spec needs it, and a cached build starts faster without.
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"{message}; did you mean `{_shown(close[0])}`?"
    shown = ", ".join(_shown(other) for other in names[:_NAMES_SHOWN])
    if len(names) > _NAMES_SHOWN:
        return f"{message}; builds in scope: {shown} and {len(names) - _NAMES_SHOWN} more"
    if names:
        return f"{message}; builds in scope: {shown}"
    return f"{message}; no build is in scope here"


_ID_LIMIT = 2**32
_Mount = TypeVar("_Mount", CacheMount, SecretMount)


def _id(field: _List, name: str) -> int:
    """The number N in the field `(NAME N)`."""
    (text,) = _atoms(field, f"({name} N)", exactly=1)
    # The length check keeps int() away from absurdly long digit strings.
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < _ID_LIMIT):
        raise _fail(
            field.items[1],
            f"{name}: expected a number from 0 to {_ID_LIMIT - 1}, got `{_shown(text)}`",
        )
    return int(text)


def _user(node: _List, scope: _Scope) -> User:
    fields = _fields(node, "user", ("gid", "name", "uid"))
    if fields.keys() == {"name"}:
        return UserName(_atoms(fields["name"], "(name NAME)", exactly=1)[0])
    if fields.keys() == {"uid", "gid"}:
        return UserIds(_id(fields["uid"], "uid"), _id(fields["gid"], "gid"))
    raise _fail(node, "expected (user (uid N) (gid N)) or (user (name NAME))")


def _env(node: _List, scope: _Scope) -> Env:
    name, value = _atoms(node, "(env NAME VALUE)", exactly=2)
    if not name or "=" in name:
        raise _fail(
            node.items[1],
            f"env: invalid variable name `{_shown(name)}`; it must be non-empty, without `=`",
        )
    return Env(name, value)


def _mounts(
    field: _List | None, kind: str, mount: Callable[[str, str], _Mount]
) -> tuple[_Mount, ...]:
    """The `(ID (target PATH))` items of a `cache` or `secrets` field."""
    if field is None:
        return ()
    mounts = []
    for item in field.items[1:]:
        match item:
            case _List(items=(_Atom(text=name), _List() as target)) if _head(target) == "target":
                mounts.append(mount(name, _atoms(target, "(target PATH)", exactly=1)[0]))
            case _:
                raise _fail(item, f"{kind}: expected (ID (target PATH))")
    return tuple(mounts)


def _run(node: _List, scope: _Scope) -> Run:
    fields = _fields(node, "run", ("cache", "network", "secrets", "shell"))
    shell = _required(fields, node, "run", "shell", "(shell CMD)")
    network = fields.get("network")
    return Run(
        shell=_atoms(shell, "(shell CMD)", exactly=1)[0],
        cache=_mounts(fields.get("cache"), "cache", CacheMount),
        network=tuple(_atoms(network, "(network NAME...)")) if network else (),
        secrets=_mounts(fields.get("secrets"), "secrets", SecretMount),
    )


def _source(field: _List, scope: _Scope) -> Literal["context"] | Build:
    """The `(from context)` or `(from (build NAME))` of a copy; NAME must be in scope."""
    form = "(from context) or (from (build NAME))"
    args = field.items[1:]
    if len(args) != 1:
        raise _fail(field, f"expected {form}")
    (arg,) = args
    if isinstance(arg, _Atom):
        if arg.text != "context":
            raise _fail(arg, f"expected {form}")
        return "context"
    if _head(arg) != "build" or len(arg.items) != 2 or isinstance(arg.items[1], _List):
        raise _fail(arg, f"expected {form}")
    name = arg.items[1]
    if name.text not in scope:
        raise _fail(name, _unknown_build(name.text, scope))
    return Build(name.text)


def _copy(node: _List, scope: _Scope) -> Copy:
    fields = _fields(node, "copy", ("dst", "exclude", "from", "src"))
    src = _required(fields, node, "copy", "src", "(src PATH...)")
    dst = _required(fields, node, "copy", "dst", "(dst PATH)")
    exclude = fields.get("exclude")
    return Copy(
        from_=_source(fields["from"], scope) if "from" in fields else "context",
        src=tuple(_atoms(src, "(src PATH...)", at_least=1)),
        dst=_atoms(dst, "(dst PATH)", exactly=1)[0],
        exclude=tuple(_atoms(exclude, "(exclude NAME...)")) if exclude else (),
    )


_OP_READERS: dict[str, Callable[[_List, _Scope], Op]] = {
    "comment": lambda node, _: Comment(_atoms(node, "(comment TEXT)", exactly=1)[0]),
    "copy": _copy,
    "env": _env,
    "run": _run,
    "shell": lambda node, _: Shell(tuple(_atoms(node, "(shell ARG...)", at_least=1))),
    "user": _user,
    "workdir": lambda node, _: Workdir(_atoms(node, "(workdir DIR)", exactly=1)[0]),
}
_OP_NAMES = ", ".join(_OP_READERS)


def _op(node: _Node, scope: _Scope) -> Op:
    name = _head(node)
    if name is None:
        raise _fail(node, f"expected an op (NAME ...); NAME is one of {_OP_NAMES}")
    assert isinstance(node, _List)
    reader = _OP_READERS.get(name)
    if reader is None:
        raise _fail(node.items[0], f"unknown op `{_shown(name)}`; expected one of {_OP_NAMES}")
    return reader(node, scope)


def _spec(node: _Node, scope: _Scope, depth: int = 0) -> Spec:
    """The stage `node`, nested in `depth` stages; `scope` holds the stages its copies may name
    besides its own children."""
    if not isinstance(node, _List):
        raise _fail(node, "expected a spec ((build NAME SPEC)... (from IMAGE) OP...)")
    items = list(node.items)
    children: list[tuple[str, Spec]] = []
    positions: dict[str, int] = {}
    while items and _head(items[0]) == "build":
        build = items.pop(0)
        assert isinstance(build, _List)
        if depth == MAX_BUILD_DEPTH:
            raise _fail(
                build,
                f"builds nested deeper than {MAX_BUILD_DEPTH} levels;"
                " use fewer levels of (build NAME SPEC)",
            )
        if len(build.items) != 3 or isinstance(build.items[1], _List):
            raise _fail(build, "expected (build NAME SPEC)")
        name = build.items[1].text
        if name in positions:
            raise _fail(build.items[1], f"duplicate build `{_shown(name)}`")
        positions[name] = len(children)
        child_scope = scope.inner(positions, len(children))
        children.append((name, _spec(build.items[2], child_scope, depth + 1)))
    if not items:
        raise SpecError("expected (from IMAGE)", node.end_line, node.end_column)
    first = items.pop(0)
    if _head(first) != "from":
        if _head(first) in _OP_READERS:
            raise _fail(first, "expected (from IMAGE) before the first op")
        raise _fail(first, "expected (build NAME SPEC) or (from IMAGE)")
    assert isinstance(first, _List)
    (image,) = _atoms(first, "(from IMAGE)", exactly=1)
    scope = scope.inner(positions, len(children))
    return Spec(
        child_builds=tuple(children), from_=image, ops=tuple(_op(item, scope) for item in items)
    )


def decode(data: bytes, *, filename: str) -> str:
    """The text of the spec file `filename`, whose content is `data`; raises `SpecError` at the
    first byte that is not UTF-8."""
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        before = data[: err.start].decode()
        line = before.count("\n") + 1
        column = len(before) - before.rfind("\n")
        raise SpecError(
            f"invalid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start});"
            " save the spec as UTF-8",
            line,
            column,
            filename,
        ) from None


def parse(text: str, *, filename: str | None = None) -> Spec:
    """Read and validate a spec; raises `SpecError` (located, with `filename` if given)."""
    reader = _Reader(text)
    try:
        nodes = reader.read()
        if not nodes:
            raise reader.error(len(text), "expected a spec ((from IMAGE) OP...); got nothing")
        if len(nodes) > 1:
            raise _fail(nodes[1], "unexpected text after the spec; expected the end of the input")
        return _spec(nodes[0], _Scope())
    except SpecError as err:
        err.filename = filename
        raise


# --- The canonical printer ------------------------------------------------------------------------

# An s-expression to print: an atom or a list of them.
_Sexp = str | list["_Sexp"]

# Atoms printed without quotes: a conservative set that no s-expression reader treats specially.
_BARE = re.compile(r"[A-Za-z0-9_.,/:@+=%~^*!?&<>{}\[\]$-]+")
_CHAR_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b"}


def _escape_char(ch: str) -> str:
    if ch in _CHAR_ESCAPES:
        return _CHAR_ESCAPES[ch]
    if ch.isprintable():
        return ch
    return "".join(f"\\x{byte:02x}" for byte in ch.encode())


def _quote(text: str, column: int) -> str:
    """`text` as an atom starting at `column` (0-based).

    A multi-line string goes on with a backslash-newline after each newline, its lines aligned
    under its first character.
    """
    if _BARE.fullmatch(text):
        return text
    out = ['"']
    at_line_start = False
    for i, ch in enumerate(text):
        # The reader skips blanks after a backslash-newline, so a leading space must be escaped.
        out.append("\\ " if at_line_start and ch == " " else _escape_char(ch))
        at_line_start = ch == "\n" and i + 1 < len(text)
        if at_line_start:
            out.append("\\\n" + " " * (column + 1))
    out.append('"')
    return "".join(out)


def _end_column(text: str, column: int) -> int:
    newline = text.rfind("\n")
    return column + len(text) if newline < 0 else len(text) - newline - 1


def _flat(sexp: _Sexp, column: int) -> str:
    """`sexp` on one line (but for multi-line strings), starting at `column`."""
    if isinstance(sexp, str):
        return _quote(sexp, column)
    parts: list[str] = []
    column += 1
    for item in sexp:
        if parts:
            column += 1
        parts.append(_flat(item, column))
        column = _end_column(parts[-1], column)
    return "(" + " ".join(parts) + ")"


def _op_sexp(op: Op) -> list[_Sexp]:
    match op:
        case Comment(text):
            return ["comment", text]
        case Workdir(directory):
            return ["workdir", directory]
        case Shell(args):
            return ["shell", *args]
        case Env(name, value):
            return ["env", name, value]
        case UserIds(uid, gid):
            return ["user", ["uid", str(uid)], ["gid", str(gid)]]
        case UserName(name):
            return ["user", ["name", name]]
        case Run():
            fields: list[_Sexp] = ["run"]
            if op.cache:
                fields.append(["cache", *([m.id, ["target", m.target]] for m in op.cache)])
            if op.network:
                fields.append(["network", *op.network])
            if op.secrets:
                fields.append(["secrets", *([m.id, ["target", m.target]] for m in op.secrets)])
            return [*fields, ["shell", op.shell]]
        case Copy():
            fields = ["copy"]
            if isinstance(op.from_, Build):
                fields.append(["from", ["build", op.from_.name]])
            fields += [["src", *op.src], ["dst", op.dst]]
            if op.exclude:
                fields.append(["exclude", *op.exclude])
            return fields


def op_text(op: Op, column: int = 0) -> str:
    """One op in canonical form, as if printed starting at `column` (for step headers)."""
    sexp = _op_sexp(op)
    if isinstance(op, Run) and len(sexp) > 2:
        # Like OBuilder's printer: a run with mounts or network has one field per line.
        inner = column + len("(run ")
        return "(run " + ("\n" + " " * inner).join(_flat(f, inner) for f in sexp[1:]) + ")"
    return _flat(sexp, column)


def _spec_text(spec: Spec, column: int) -> str:
    inner = column + 1
    entries = [
        f"(build {_quote(name, inner + len('(build '))}\n{' ' * (inner + 1)}"
        f"{_spec_text(child, inner + 1)})"
        for name, child in spec.child_builds
    ]
    entries.append(_flat(["from", spec.from_], inner))
    entries += [op_text(op, inner) for op in spec.ops]
    return "(" + ("\n" + " " * inner).join(entries) + ")"


def to_sexp(spec: Spec) -> str:
    """The canonical text of `spec`: one op per line, nested stages indented.

    As in OBuilder's printer, a run with mounts or network puts each field on its own line; a
    string with newlines goes on over several lines with backslash-newlines.

    `parse(to_sexp(s)) == s` for every spec, so printing is idempotent.
    """
    return _spec_text(spec, 0) + "\n"


# --- The context of each op -----------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What an op runs with: the state left by the ops before it in its stage."""

    workdir: str = "/"
    user: User = ROOT
    # Each name once, in the order first bound.
    env: tuple[tuple[str, str], ...] = ()
    shell: tuple[str, ...] = ("/bin/sh", "-c")

    def after(self, op: Op) -> Context:
        """The context for the ops that follow `op`."""
        match op:
            case Workdir(directory):
                return replace(self, workdir=posixpath.join(self.workdir, directory))
            case Env(name, value):
                return replace(self, env=tuple({**dict(self.env), name: value}.items()))
            case Shell(args):
                return replace(self, shell=args)
            case UserIds() | UserName():
                return replace(self, user=op)
            case _:
                return self


DEFAULT_CONTEXT = Context()


def contexts(ops: Iterable[Op], start: Context = DEFAULT_CONTEXT) -> Iterator[tuple[Op, Context]]:
    """Each op with the context it runs in, in order; `start` is the stage's initial context."""
    context = start
    for op in ops:
        yield op, context
        context = context.after(op)


# --- Dockerfiles ----------------------------------------------------------------------------------


def _docker_quote(value: str, escape: str) -> str:
    return "".join(escape + ch if ch in ('"', escape) else ch for ch in value)


def _mount_uid(user: User) -> int:
    if isinstance(user, UserName):
        raise BuildError(
            f"BuildKit mounts need a numeric user, not `{_shown(user.name)}`:"
            " use (user (uid N) (gid N))"
        )
    return user.uid


def _docker_run(run: Run, user: User, *, buildkit: bool, escape: str) -> str:
    mounts = [
        f"--mount=type={kind},id={mount.id},target={mount.target},uid={_mount_uid(user)} "
        for kind, group in (("secret", run.secrets), ("cache", run.cache))
        for mount in group
    ] if buildkit else []
    # Trimmed like OCaml's String.trim, which leaves other Unicode blanks alone.
    lines = (line.strip(" \t\n\r\f") for line in run.shell.split("\n"))
    return "RUN " + "".join(mounts) + f" {escape}\n    ".join(lines)


def _docker_copy(copy: Copy, user: User, *, windows: bool) -> str:
    options = []
    match user:
        case UserIds(uid, gid) if user != ROOT:
            options.append(f"--chown={uid}:{gid} ")
        case UserName(name) if not windows:
            options.append(f"--chown={name} ")
    if isinstance(copy.from_, Build):
        options.append(f"--from={copy.from_.name} ")
    return f"COPY {''.join(options)}{' '.join(copy.src)} {copy.dst}"


def _docker_op(op: Op, context: Context, *, buildkit: bool, escape: str) -> str:
    match op:
        case Comment(text):
            return "\n".join(f"# {line}" for line in text.split("\n"))
        case Workdir(directory):
            return f"WORKDIR {directory}"
        case Shell(args):
            return f"SHELL [ {', '.join(json.dumps(arg, ensure_ascii=False) for arg in args)} ]"
        case Env(name, value):
            return f'ENV {name}="{_docker_quote(value, escape)}"'
        case UserIds(uid, gid):
            return f"USER {uid}:{gid}"
        case UserName(name):
            return f"USER {name}"
        case Run():
            return _docker_run(op, context.user, buildkit=buildkit, escape=escape)
        case Copy():
            return _docker_copy(op, context.user, windows=escape == "`")


def _docker_stage(spec: Spec, name: str | None, *, buildkit: bool, escape: str) -> list[str]:
    lines = []
    for child_name, child in spec.child_builds:
        lines += [*_docker_stage(child, child_name, buildkit=buildkit, escape=escape), ""]
    lines.append(f"FROM {spec.from_}" + (f" as {name}" if name is not None else ""))
    lines += [
        _docker_op(op, context, buildkit=buildkit, escape=escape)
        for op, context in contexts(spec.ops)
    ]
    return lines


def to_dockerfile(
    spec: Spec, *, buildkit: bool, os: Literal["unix", "windows"] = "unix"
) -> str:
    """A Dockerfile meant to build what `spec` builds, as OBuilder's converter writes it.

    Child stages come first, as `FROM IMAGE as NAME`. With `buildkit`, a run's secrets and caches
    become `RUN --mount=...` options; without, they are dropped. `network` and `exclude` have no
    Dockerfile form and are dropped (use a `.dockerignore`). Windows output escapes with a backtick.
    Raises `BuildError` if a BuildKit mount is needed while the user is given by name.
    """
    escape = "`" if os == "windows" else "\\"
    header = ["#escape=`"] if os == "windows" else []
    return "\n".join([*header, *_docker_stage(spec, None, buildkit=buildkit, escape=escape)]) + "\n"


def from_text(image: str, column: int = 0) -> str:
    """`(from IMAGE)` in canonical form, as if printed starting at `column`."""
    return _flat(["from", image], column)
