"""Fuzzing the spec reader: whatever the text, `parse` returns a Spec or raises `SpecError`.

A Spec it returns must print, read back equal, print the same again and convert to a Dockerfile
(or raise `BuildError`). The inputs come from a seeded generator (the `random` module, so every
run sees the same cases): valid specs written from the grammar in `pipeline.obuilder.spec`'s
docstring with random layout, comments, quoting and escapes; mutations of them (deletions,
insertions, swaps, truncation, deep nesting, lone surrogates, control characters, huge numbers,
odd escapes); and token soup. To hunt for more crashes, run other seeds and more cases:

    SPEC_FUZZ_SEED=7 SPEC_FUZZ_CASES=200000 .venv/bin/pytest -q tests/test_spec_fuzz.py
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import string
from collections import Counter
from collections.abc import Callable

import pytest

from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.spec import (
    MAX_BUILD_DEPTH,
    MAX_NESTING,
    SpecError,
    parse,
    to_dockerfile,
    to_sexp,
)

SEED = int(os.environ.get("SPEC_FUZZ_SEED", "20261128"))
CASES = int(os.environ.get("SPEC_FUZZ_CASES", "10000"))

# Characters that are hard to read or print: blanks and line ends of every kind, the reader's
# special characters, controls, invisible and non-BMP characters.
AWKWARD = [
    " ", "\n", "\t", "\r", "\r\n", "\x0b", "\x0c", '"', "\\", "(", ")", ";", "'", "`", "#|", "|#",
    "#;", "[", "]", "é", "e\u0301", "日本", "🙂", "\x00", "\x1b[31m", "\x7f", "\x85", "\u00a0",
    "\u2028", "\u200b", "\ufeff", "\ufffe", "\U0010ffff",
]
# Not Unicode text, though a str may hold them: kept rare, as the reader refuses them at once.
SURROGATES = ["\ud800", "\udfff", "\ud83d\ude00"]
# Escapes that are valid on their own and together with any other (all bytes spell UTF-8).
VALID_ESCAPES = [
    "\\n", "\\t", "\\r", "\\b", "\\\\", '\\"', "\\'", "\\ ", "\\065", "\\x41", "\\o101",
    "\\195\\169", "\\xe2\\x82\\xac", "\\\n   ", "\\\r\n\t", "\\q", "\\d", "\\12x", "\\x4",
]
# Escapes that are illegal, unknown (kept as written) or spell bytes that are not UTF-8.
ODD_ESCAPES = [
    "\\256", "\\999", "\\xff", "\\xZZ", "\\o777", "\\o400", "\\u{D800}", "\\ud800", "\\",
    "\\237\\160\\128", "\\xed\\xb0\\x80", "\\195", "\\xc3", "\\x80", "\\000",
]
HEADS = [
    "build", "from", "comment", "workdir", "shell", "env", "user", "uid", "gid", "name", "run",
    "cache", "target", "network", "secrets", "copy", "src", "dst", "exclude", "context",
]
BARE_CHARS = string.ascii_letters + string.digits + "_-./:@+=%~^*!?&<>{}[]$'`\\#|,éß日🙂"


def bare_atom(rng: random.Random) -> str:
    """An atom without quotes: any characters but blanks, `(`, `)`, `"` and `;`."""
    if rng.random() < 0.3:
        return rng.choice([*HEADS, "img", "busybox", "debian:12", "/src", "nil", "t", "42"])
    return "".join(rng.choices(BARE_CHARS, k=rng.randint(1, 10)))


def quoted_atom(rng: random.Random) -> str:
    """A quoted string of text, valid escapes, raw newlines and awkward valid characters."""
    pieces = []
    for _ in range(rng.randint(0, 6)):
        match rng.randrange(4):
            case 0:
                pieces.append(rng.choice(VALID_ESCAPES))
            case 1:
                pieces.append(rng.choice([a for a in AWKWARD if a not in ('"', "\\")]))
            case _:
                pieces.append("".join(rng.choices(string.printable.replace('"', ""), k=4))
                              .replace("\\", "/"))
    return '"' + "".join(pieces) + '"'



def atom(rng: random.Random) -> str:
    """Any valid atom."""
    return quoted_atom(rng) if rng.random() < 0.4 else bare_atom(rng)


def env_name(rng: random.Random) -> str:
    """A valid variable name: not empty, no `=`."""
    while True:
        name = bare_atom(rng)
        if "=" not in name:
            return name


def blank(rng: random.Random) -> str:
    """What may separate two items: blanks, line ends and `;` comments."""
    match rng.randrange(10):
        case 0:
            return "\n" + " " * rng.randint(0, 6)
        case 1:
            return " ; a comment (with \" and \\)\n  "
        case 2:
            return rng.choice(["\t", "\r\n", "\x0c", "  "])
        case _:
            return " "


def form(rng: random.Random, *items: str) -> str:
    """The list of `items`, laid out at random."""
    inner = "".join(f"{blank(rng) if i else ''}{item}" for i, item in enumerate(items))
    return "(" + (blank(rng) if rng.random() < 0.1 else "") + inner + ")"


def user(rng: random.Random) -> str:
    """`(user (uid N) (gid N))`, fields in either order, or `(user (name NAME))`."""
    if rng.random() < 0.3:
        return form(rng, "user", form(rng, "name", atom(rng)))
    fields = [
        form(rng, kind, str(rng.choice([0, 1, 1000, 2**32 - 1, rng.randrange(2**32)])))
        for kind in ("uid", "gid")
    ]
    rng.shuffle(fields)
    return form(rng, "user", *fields)


def mounts(rng: random.Random, kind: str) -> str:
    """A `cache` or `secrets` field: `(KIND (ID (target PATH))...)`."""
    ids = (form(rng, atom(rng), form(rng, "target", atom(rng))) for _ in range(rng.randint(0, 2)))
    return form(rng, kind, *ids)


def run(rng: random.Random) -> str:
    """A `run` op: its shell and, in any order, some of its optional fields."""
    fields = [form(rng, "shell", atom(rng))]
    if rng.random() < 0.3:
        fields.append(mounts(rng, "cache"))
    if rng.random() < 0.3:
        fields.append(mounts(rng, "secrets"))
    if rng.random() < 0.3:
        fields.append(form(rng, "network", *(atom(rng) for _ in range(rng.randint(0, 2)))))
    rng.shuffle(fields)
    return form(rng, "run", *fields)


def copy(rng: random.Random, scope: list[str]) -> str:
    """A `copy` op, fields in any order; it copies from a stage only from `scope`."""
    fields = [
        form(rng, "src", *(atom(rng) for _ in range(rng.randint(1, 3)))),
        form(rng, "dst", atom(rng)),
    ]
    if scope and rng.random() < 0.5:
        fields.append(form(rng, "from", form(rng, "build", rng.choice(scope))))
    elif rng.random() < 0.2:
        fields.append(form(rng, "from", "context"))
    if rng.random() < 0.3:
        fields.append(form(rng, "exclude", *(atom(rng) for _ in range(rng.randint(0, 2)))))
    rng.shuffle(fields)
    return form(rng, "copy", *fields)


def op(rng: random.Random, scope: list[str]) -> str:
    """One op of the grammar; a copy names a stage only from `scope`."""
    makers: list[Callable[[], str]] = [
        lambda: form(rng, "comment", atom(rng)),
        lambda: form(rng, "workdir", atom(rng)),
        lambda: form(rng, "shell", *(atom(rng) for _ in range(rng.randint(1, 3)))),
        lambda: form(rng, "env", env_name(rng), atom(rng)),
        lambda: user(rng),
        lambda: run(rng),
        lambda: copy(rng, scope),
    ]
    return rng.choice(makers)()


def valid_spec(rng: random.Random, scope: list[str], depth: int = 0) -> str:
    """A spec of the grammar: up to two child stages a level, three levels, six ops a stage."""
    builds: list[str] = []
    names: list[str] = []
    for _ in range(rng.randint(0, 2) if depth < 2 else 0):
        name = atom(rng)
        # Two spellings of one name ("a" and a bare a) would be a duplicate build.
        if name.strip('"') not in (n.strip('"') for n in names) and "\\" not in name:
            builds.append(form(rng, "build", name, valid_spec(rng, scope + names, depth + 1)))
            names.append(name)
    ops = [op(rng, scope + names) for _ in range(rng.randint(0, 6))]
    return form(rng, *builds, form(rng, "from", atom(rng)), *ops)


def nested_stages(rng: random.Random, depth: int) -> str:
    """A spec whose stages nest `depth` deep, each copying from its child."""
    text = valid_spec(rng, [], depth=2)
    for level in range(depth):
        copy = form(rng, "copy", form(rng, "from", form(rng, "build", f"s{level}")),
                    form(rng, "src", "a"), form(rng, "dst", "b"))
        text = form(rng, form(rng, "build", f"s{level}", text), form(rng, "from", "img"), copy)
    return text


def mutate(rng: random.Random, text: str) -> str:
    """`text` changed in one to four places."""
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        match rng.randrange(9):
            case 0:
                text = text[:at] + text[at + rng.randint(1, 3):]
            case 1:
                piece = rng.choice(AWKWARD + ODD_ESCAPES + VALID_ESCAPES + HEADS)
                text = text[:at] + piece + text[at:]
            case 2 if len(text) > at + 1:
                text = text[:at] + text[at + 1] + text[at] + text[at + 2:]
            case 3:
                text = text[:at]
            case 4:
                end = rng.randint(at, len(text))
                text = text[:end] + text[at:end] + text[end:]
            case 5:
                levels = rng.choice([MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1,
                                     rng.randint(1, 50), rng.randint(1, 3000)])
                end = rng.randint(at, len(text))
                text = text[:at] + "(" * levels + text[at:end] + ")" * levels + text[end:]
            case 6:
                huge = rng.choice(["4294967296", "99999999999999999999999999", "-1", "1e9",
                                   "0x10", "٣", "1" * 5000, "00000000000000000001"])
                text = re.sub(r"\d+", huge, text, count=1)
            case 7:
                if rng.random() < 0.1:
                    char = rng.choice(SURROGATES)
                else:
                    char = chr(rng.choice([rng.randrange(0x20), rng.randrange(0x110000)]))
                text = text[:at] + char + text[at:]
            case _:
                text = text[:at] + "\\" + rng.choice("0123456789xXoOuU\n\r \"\\") + text[at:]
    return text


def token_soup(rng: random.Random) -> str:
    """Tokens of the language in random order."""
    tokens = ["(", ")", "((", "))", "context", '"', '""', ";", "\n"]
    tokens += [f"({head}" for head in HEADS] + AWKWARD + ODD_ESCAPES
    if rng.random() < 0.05:
        tokens += SURROGATES
    pieces = (rng.choice(tokens) if rng.random() < 0.7 else atom(rng)
              for _ in range(rng.randint(0, 40)))
    return " ".join(pieces) if rng.random() < 0.7 else "".join(pieces)


def generate(rng: random.Random) -> tuple[str, str]:
    """A kind of input and its text: "valid" and "stages" (nested up to the limit) must be
    accepted, "deep stages" refused; "mutated" and "soup" may be either."""
    roll = rng.random()
    if roll < 0.25:
        return "valid", rng.choice(["", "; header\n", "\n  "]) + valid_spec(rng, []) + blank(rng)
    if roll < 0.27:
        depth = rng.randint(MAX_BUILD_DEPTH - 2, MAX_BUILD_DEPTH + 2)
        return "stages" if depth <= MAX_BUILD_DEPTH else "deep stages", nested_stages(rng, depth)
    if roll < 0.85:
        return "mutated", mutate(rng, valid_spec(rng, []))
    return "soup", token_soup(rng)


def check(text: str) -> str:
    """"ok" if `text` is a spec that round-trips, or the message of its `SpecError`; raises
    anything else."""
    try:
        spec = parse(text)
    except SpecError as err:
        assert err.line is not None and err.column is not None, "a parse error has a position"
        assert 1 <= err.line <= text.count("\n") + 1 and err.column >= 1, (err.line, err.column)
        # One line that cannot drive the terminal showing it, however long the names in it.
        assert str(err).isprintable() and len(str(err)) < 1000, str(err)
        return err.message
    printed = to_sexp(spec)
    again = parse(printed)
    assert again == spec, printed
    assert hash(again) == hash(spec)
    assert to_sexp(again) == printed, printed
    for buildkit in (False, True):
        for target in ("unix", "windows"):
            # BuildKit mounts need a numeric user: that is the one error a conversion may raise.
            with contextlib.suppress(BuildError):
                to_dockerfile(spec, buildkit=buildkit, os=target).encode()  # type: ignore[arg-type]
    return "ok"


# Errors the generator must provoke, or it no longer reaches the reader's hard cases.
REQUIRED_ERRORS = [
    "nesting deeper than", "builds nested deeper than", "lone surrogate", "illegal escape",
    "do not form valid UTF-8", "unterminated string", "is never closed", "unexpected `)`",
    "expected a number from 0", "unknown op", "unknown build", "duplicate",
]


def test_parse_returns_a_spec_that_round_trips_or_raises_spec_error() -> None:
    rng = random.Random(SEED)
    outcomes: Counter[tuple[str, bool]] = Counter()
    messages: set[str] = set()
    for case in range(CASES):
        kind, text = generate(rng)
        try:
            outcome = check(text)
            if kind in ("valid", "stages"):
                assert outcome == "ok", "a spec of the grammar is refused: " + outcome
            if kind == "deep stages":
                assert outcome.startswith("builds nested deeper than"), outcome
        except Exception as exc:
            input_shown = repr(text)
            if len(input_shown) > 800:
                input_shown = input_shown[:800] + f"... ({len(text)} characters)"
            pytest.fail(f"case {case} (seed {SEED}, {kind}): {type(exc).__name__}: "
                        f"{str(exc)[:500]}\ninput: {input_shown}")
        outcomes[kind, outcome == "ok"] += 1
        messages.add(outcome)
    # Mutations must leave some specs valid and break others, or they test little.
    assert outcomes["mutated", True] > CASES // 20 and outcomes["mutated", False] > CASES // 4
    assert outcomes["soup", False] > CASES // 20
    assert outcomes["stages", True] and outcomes["deep stages", False]
    missing = [m for m in REQUIRED_ERRORS if not any(m in message for message in messages)]
    assert not missing, f"no input provoked {missing}"
