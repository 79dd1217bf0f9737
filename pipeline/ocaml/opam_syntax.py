"""The opam file format: a lexer and parser of opam-file-format's grammar, giving value trees.

An opam file is a list of items: fields `name: value` and sections `name ["label"] { items }`.
Values are strings (with escapes, over several lines, and `\"\"\"triple-quoted\"\"\"`), idents
(variables, possibly qualified by packages: `ocaml:version`), integers, booleans, lists
`[ ... ]`, groups `( ... )`, options `value { ... }`, the logical operators `&` and `|`, the
prefix operators `!` and `?`, and relational and environment-update operators. Comments are
`# ...` to the end of the line and `(* ... *)` (nested).

`parse(text, path=...)` gives a `Document`; any syntax error raises `OpamSyntaxError`
"PATH:LINE: expected ...". Every node remembers its line, but equality ignores lines (and so
the formatting and comments that moved them): two documents, fields or values are equal when
they say the same thing, which is what telling a reformatting from a real change needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field


class OpamSyntaxError(ValueError):
    """The text is not an opam file; the message is "PATH:LINE: expected ...; got ..."."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class Value:
    """A value tree. `kind` is "string", "ident", "int" or "bool" for an atom (`text` holds
    it); "list" or "group" (`args` hold the items); "option" (`args`: the value, then the
    option's items); "logop", "relop" or "prefix" (`text` holds the operator, `args` the
    operands; a relop written as a prefix, `>= "1.0"` in an option, has one).

    `line` is where the value starts; it takes no part in equality."""

    kind: str
    line: int = field(compare=False)
    text: str = ""
    args: tuple[Value, ...] = ()

    def as_list(self) -> tuple[Value, ...]:
        """The items of a list, or this value alone: opam reads a one-element list written
        without brackets (`depends: "fmt"`) as that list."""
        return self.args if self.kind == "list" else (self,)

    def strings(self) -> tuple[str, ...]:
        """The strings among `as_list()`'s items (`maintainer: ["a" "b"]` -> ("a", "b"))."""
        return tuple(item.text for item in self.as_list() if item.kind == "string")


@dataclass(frozen=True)
class Field:
    """A field `name: value`; `line` (where its name is) takes no part in equality."""

    name: str
    value: Value
    line: int = field(compare=False)


@dataclass(frozen=True)
class Section:
    """A section `kind ["label"] { items }`, such as `url { ... }` or
    `extra-source "patch.diff" { ... }`; `line` takes no part in equality."""

    kind: str
    label: str | None
    items: tuple[Field | Section, ...]
    line: int = field(compare=False)

    @property
    def fields(self) -> dict[str, Field]:
        """The section's fields by name (the first of a repeated name)."""
        return _fields(self.items)


@dataclass(frozen=True)
class Document:
    """A parsed opam file: its items in the order written. `path` (for messages) takes no
    part in equality."""

    path: str = field(compare=False)
    items: tuple[Field | Section, ...] = ()

    @property
    def fields(self) -> dict[str, Field]:
        """The top-level fields by name (the first of a repeated name)."""
        return _fields(self.items)

    @property
    def sections(self) -> tuple[Section, ...]:
        """The top-level sections, in order."""
        return tuple(item for item in self.items if isinstance(item, Section))

    def value(self, name: str) -> Value | None:
        """The value of the top-level field `name`, None when there is no such field."""
        found = self.fields.get(name)
        return None if found is None else found.value


def _fields(items: tuple[Field | Section, ...]) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for item in items:
        if isinstance(item, Field):
            fields.setdefault(item.name, item)
    return fields


def parse(text: str, *, path: str) -> Document:
    """Parse the opam file `text`; `path` names it in error messages. Raises `OpamSyntaxError`
    "PATH:LINE: expected ..." for anything outside the grammar."""
    lexer = _Lexer(text, path)
    parser = _Parser(lexer.tokens(), lexer)
    return Document(path, parser.items("eof"))


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
_PLAIN = re.compile(r'[^"\\]+')


class _Lexer:
    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.i = 0
        self.line = 1

    def error(self, line: int, message: str) -> OpamSyntaxError:
        return OpamSyntaxError(self.path, line, message)

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
            elif c == '"':  # a quote inside a triple-quoted string
                out.append(c)
                self.i += 1
            else:
                # Up to the next quote or escape at once: strings make most of an opam file.
                plain = _PLAIN.match(text, self.i)
                assert plain is not None  # c itself is plain
                out.append(plain.group())
                self.line += plain.group().count("\n")
                self.i = plain.end()

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


# --- The grammar --------------------------------------------------------------------------------


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

    def unexpected(self, expected: str) -> OpamSyntaxError:
        token = self.peek
        if token.kind == "eof":
            got = "the end of the file"
        elif token.kind == "string":
            got = f"the string {json.dumps(token.text)}"
        else:
            got = f"`{token.text}`"
        return self.lexer.error(token.line, f"expected {expected}; got {got}")

    def items(self, closing: str) -> tuple[Field | Section, ...]:
        """Fields and sections up to `closing` ("eof" or "}")."""
        items: list[Field | Section] = []
        while self.peek.kind != closing:
            name = self.peek
            if name.kind != "ident":
                raise self.unexpected("a field name or a section")
            self.take()
            if self.peek.kind == ":":
                self.take()
                items.append(Field(name.text, self.value(), name.line))
                continue
            label = None
            if self.peek.kind == "string" and self.tokens[self.pos + 1].kind == "{":
                label = self.take().text  # as in `extra-source "file" { ... }`
            if self.peek.kind != "{":
                raise self.unexpected(f"`:` after the field name `{name.text}`")
            opening = self.take()
            section_items = self.items("}")
            self.close("}", opening)
            items.append(Section(name.text, label, section_items, name.line))
        return tuple(items)

    def close(self, closing: str, opening: _Token) -> None:
        if self.peek.kind != closing:
            raise self.unexpected(
                f"`{closing}` to close the `{opening.text}` of line {opening.line}"
            )
        self.take()

    def values(self, closing: str, opening: _Token) -> tuple[Value, ...]:
        values = []
        while self.peek.kind not in (closing, "eof", "}", "]", ")"):
            values.append(self.value())
        self.close(closing, opening)
        return tuple(values)

    def value(self) -> Value:
        # Precedence as in opam-file-format: `|` < `&` < prefix and relational operators <
        # options `{...}`.
        return self.logop("|", self.conjunction)

    def conjunction(self) -> Value:
        return self.logop("&", self.unary)

    def logop(self, op: str, operand: Callable[[], Value]) -> Value:
        """Operands joined by the left-associative operator `op`."""
        left = operand()
        while self.peek.kind == "op" and self.peek.text == op:
            token = self.take()
            left = Value("logop", token.line, op, (left, operand()))
        return left

    def unary(self) -> Value:
        token = self.peek
        if token.kind == "op" and token.text in ("!", "?"):
            self.take()
            return Value("prefix", token.line, token.text, (self.unary(),))
        if token.kind == "op" and token.text in _RELOPS:
            # A constraint such as `>= "3.0"` in an option.
            self.take()
            return Value("relop", token.line, token.text, (self.postfix(),))
        left = self.postfix()
        if self.peek.kind == "op" and self.peek.text in _RELOPS:
            op = self.take()
            return Value("relop", op.line, op.text, (left, self.postfix()))
        return left

    def postfix(self) -> Value:
        value = self.atom()
        while self.peek.kind == "{":
            opening = self.take()
            value = Value("option", value.line, "", (value, *self.values("}", opening)))
        return value

    def atom(self) -> Value:
        token = self.peek
        if token.kind in ("string", "ident", "int", "bool"):
            self.take()
            return Value(token.kind, token.line, token.text)
        if token.kind in ("[", "("):
            self.take()
            closing = "]" if token.kind == "[" else ")"
            kind = "list" if token.kind == "[" else "group"
            return Value(kind, token.line, "", self.values(closing, token))
        raise self.unexpected("a value")
