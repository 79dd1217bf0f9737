"""The spec language: reading, errors with positions, the canonical printer and Dockerfiles.

The Dockerfiles are golden files, `tests/expected/dockerfile/*.Dockerfile`; after a deliberate
change of the converter,

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_spec.py

rewrites them instead of comparing; read the diff of `tests/expected/dockerfile/` before accepting.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from golden import assert_golden

from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.spec import (
    MAX_BUILD_DEPTH,
    MAX_NESTING,
    ROOT,
    Build,
    CacheMount,
    Comment,
    Context,
    Copy,
    Env,
    Op,
    Run,
    SecretMount,
    Shell,
    Spec,
    SpecError,
    UserIds,
    UserName,
    Workdir,
    contexts,
    decode,
    parse,
    to_dockerfile,
    to_sexp,
)

GOLDEN_DIR = Path(__file__).parent / "expected" / "dockerfile"

# Every op, nested stages (a grandchild copied from by its parent), caches, secrets, network,
# exclude, both kinds of user, a multi-line run and values the Dockerfile must escape.
GOLDEN_SPEC = r"""
; A build in three stages.
((build tools
  ((build fetch
    ((from alpine:3.19)
     (run (network host)
          (shell "wget -O /src.tar.gz https://example.org/src.tar.gz"))))
   (from debian:12)
   (copy (from (build fetch)) (src /src.tar.gz) (dst /tmp/))
   (run (shell "tar -C /opt -xf /tmp/src.tar.gz"))))
 (from debian:12)
 (comment "Build as an unprivileged user")
 (shell /bin/bash -c)
 (user (uid 1000) (gid 1000))
 (workdir /home/user)
 (env GREETING "say \"hi\" \\ `now`")
 (run (cache (apt (target /var/cache/apt)) (pip (target /home/user/.cache/pip)))
      (network host)
      (secrets (token (target /run/secrets/token)))
      (shell "apt-get update &&\n\
              apt-get install -y make &&\n\
              \  pip install -r requirements.txt"))
 (copy (src Makefile src) (dst ./) (exclude .git _build))
 (copy (from (build tools)) (src /opt/tool) (dst /usr/local/bin/tool))
 (user (name builder))
 (copy (src README.md) (dst /home/builder/))
 (run (shell make)))
"""


def test_reads_every_op() -> None:
    spec = parse(GOLDEN_SPEC)
    fetch = Spec(
        from_="alpine:3.19",
        ops=(Run("wget -O /src.tar.gz https://example.org/src.tar.gz", network=("host",)),),
    )
    tools = Spec(
        child_builds=(("fetch", fetch),),
        from_="debian:12",
        ops=(
            Copy(from_=Build("fetch"), src=("/src.tar.gz",), dst="/tmp/"),
            Run("tar -C /opt -xf /tmp/src.tar.gz"),
        ),
    )
    assert spec == Spec(
        child_builds=(("tools", tools),),
        from_="debian:12",
        ops=(
            Comment("Build as an unprivileged user"),
            Shell(("/bin/bash", "-c")),
            UserIds(1000, 1000),
            Workdir("/home/user"),
            Env("GREETING", 'say "hi" \\ `now`'),
            Run(
                "apt-get update &&\napt-get install -y make &&\n  pip install -r requirements.txt",
                cache=(
                    CacheMount("apt", "/var/cache/apt"),
                    CacheMount("pip", "/home/user/.cache/pip"),
                ),
                network=("host",),
                secrets=(SecretMount("token", "/run/secrets/token"),),
            ),
            Copy(src=("Makefile", "src"), dst="./", exclude=(".git", "_build")),
            Copy(from_=Build("tools"), src=("/opt/tool",), dst="/usr/local/bin/tool"),
            UserName("builder"),
            Copy(src=("README.md",), dst="/home/builder/"),
            Run("make"),
        ),
    )


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r'"a\nb\tc\rd\be"', "a\nb\tc\rd\be"),
        (r'"\\ \" \' \ "', "\\ \" '  "),
        (r'"\065\066\067"', "ABC"),
        (r'"\x41\x7a"', "Az"),
        (r'"\o101\o172"', "Az"),
        # Escapes denote bytes, which together spell UTF-8.
        (r'"caf\195\169 \xe2\x82\xac"', "café €"),
        ('"one\\\n     two"', "onetwo"),
        ('"one \\\r\n\t two"', "one two"),
        ('"raw\nnewline"', "raw\nnewline"),
        # Unknown escapes stay as written, as sexplib reads them.
        (r'"grep \d \. \q"', r"grep \d \. \q"),
        (r'"\12x \x4"', r"\12x \x4"),
        ("naïve", "naïve"),
        ("it's[1]\\x", "it's[1]\\x"),
        ("42", "42"),
        ("nil", "nil"),
    ],
)
def test_string_escapes(literal: str, value: str) -> None:
    assert parse(f"((from img) (comment {literal}))").ops == (Comment(value),)


def test_comments_and_layout_are_insignificant() -> None:
    messy = """;; header
    (   (from   "img") ; the base
      (workdir ; a comment inside a list
          src)   )
    ; trailer"""
    assert parse(messy) == Spec(from_="img", ops=(Workdir("src"),))


def test_copy_may_name_earlier_siblings_and_enclosing_stages() -> None:
    spec = parse(
        """((build a ((from img)))
            (build b ((build c ((from img) (copy (from (build a)) (src x) (dst y))))
                      (from img)
                      (copy (from (build c)) (src x) (dst y))
                      (copy (from (build a)) (src x) (dst y))))
            (from img)
            (copy (from (build b)) (src x) (dst y)))"""
    )
    assert [name for name, _ in spec.child_builds] == ["a", "b"]


# --- Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "((from img)\n (wrkdir /src))",
            "2:3: unknown op `wrkdir`; expected one of"
            " comment, copy, env, run, shell, user, workdir",
        ),
        (
            "((from img)\n (run (netwrk host) (shell ls)))",
            "2:8: unknown field `netwrk` in run; expected one of cache, network, secrets, shell",
        ),
        ("((run (shell ls)))", "1:2: expected (from IMAGE) before the first op"),
        ("((build a ((from img))))", "1:24: expected (from IMAGE)"),
        ("((form img))", "1:2: expected (build NAME SPEC) or (from IMAGE)"),
        (
            '((from img)\n (comment "never\n closed))\n',
            '2:11: unterminated string; expected a closing `"`',
        ),
        ("((from img)\n (run (shell ls)\n", "2:2: `(` is never closed; expected `)`"),
        ("((from img)))", "1:13: unexpected `)`"),
        (
            "((from img))\n(from other)",
            "2:1: unexpected text after the spec; expected the end of the input",
        ),
        ("", "1:1: expected a spec ((from IMAGE) OP...); got nothing"),
        (
            "((from img) (user (uid 1) (gid x)))",
            "1:32: gid: expected a number from 0 to 4294967295, got `x`",
        ),
        (
            "((from img) (user (uid 1)))",
            "1:13: expected (user (uid N) (gid N)) or (user (name NAME))",
        ),
        (
            "((from img) (user (uid 1) (gid 1) (name n)))",
            "1:13: expected (user (uid N) (gid N)) or (user (name NAME))",
        ),
        (
            "((from img) (user (id 1)))",
            "1:20: unknown field `id` in user; expected one of gid, name, uid",
        ),
        ("((from img)\n (copy (src a)))", "2:2: copy: (dst PATH) missing"),
        ("((from img) (copy (dst b)))", "1:13: copy: (src PATH...) missing"),
        ("((from img) (copy (src) (dst b)))", "1:19: expected (src PATH...); got 0 arguments"),
        ("((from img) (copy (src a) (dst b c)))", "1:27: expected (dst PATH); got 2 arguments"),
        (
            "((from img) (copy (from ctx) (src a) (dst b)))",
            "1:25: expected (from context) or (from (build NAME))",
        ),
        (
            "((build builder ((from img)))\n (from img)\n"
            " (copy (from (build buidler)) (src a) (dst b)))",
            "3:21: unknown build `buidler`; did you mean `builder`?",
        ),
        (
            "((from img) (copy (from (build zzz)) (src a) (dst b)))",
            "1:32: unknown build `zzz`; no build is in scope here",
        ),
        (
            # A stage cannot copy from a later sibling.
            "((build a ((from img) (copy (from (build b)) (src x) (dst y))))\n"
            " (build b ((from img)))\n (from img))",
            "1:42: unknown build `b`; no build is in scope here",
        ),
        (
            "((build a ((from img))) (build b ((from img)))\n (from img)\n"
            " (copy (from (build qqq)) (src x) (dst y)))",
            "3:21: unknown build `qqq`; builds in scope: a, b",
        ),
        ("((build a ((from img))) (build a ((from img))) (from img))", "1:32: duplicate build `a`"),
        ("((from img) (run (shell a) (shell b)))", "1:29: duplicate field `shell` in run"),
        ("((from img) (run (network host)))", "1:13: run: (shell CMD) missing"),
        (
            "((from img) (run (cache (apt /var/cache)) (shell a)))",
            "1:25: cache: expected (ID (target PATH))",
        ),
        ("((from img) (env A))", "1:13: expected (env NAME VALUE); got 1 argument"),
        (
            "((from img) (env A=B c))",
            "1:18: env: invalid variable name `A=B`; it must be non-empty, without `=`",
        ),
        ("((from img) (workdir a b))", "1:13: expected (workdir DIR); got 2 arguments"),
        ("((from img) (comment (a)))", "1:22: expected (comment TEXT); got a list here"),
        ("((from img) (shell))", "1:13: expected (shell ARG...); got 0 arguments"),
        (
            "((from img) workdir)",
            "1:13: expected an op (NAME ...); NAME is one of"
            " comment, copy, env, run, shell, user, workdir",
        ),
        ("((from a b))", "1:2: expected (from IMAGE); got 2 arguments"),
        ('((from img) (comment "\\300"))', "1:23: illegal escape `\\300`; expected \\000 to \\255"),
        ('((from img) (comment "\\xff"))', "1:22: the string's escapes do not form valid UTF-8"),
        ("img", "1:1: expected a spec ((build NAME SPEC)... (from IMAGE) OP...)"),
        # A str can hold lone surrogates, which are not Unicode text and cannot be printed.
        (
            '((from img)\n (comment "a\ud800"))',
            "2:13: invalid character U+D800 (a lone surrogate); a spec must be Unicode text",
        ),
        (
            "((from \udcff))",
            "1:8: invalid character U+DCFF (a lone surrogate); a spec must be Unicode text",
        ),
        (
            "; \ud83d\ude00 as two surrogates\n((from img))",
            "1:3: invalid character U+D83D (a lone surrogate); a spec must be Unicode text",
        ),
        # Messages quote names from the spec with invisible characters escaped, cut short.
        (
            "((from img) (\x1b[2J\x00run))",
            "1:14: unknown op `\\x1b[2J\\x00run`; expected one of"
            " comment, copy, env, run, shell, user, workdir",
        ),
        (
            f"((build {'b' * 200} ((from img)))\n"
            " (from img) (copy (from (build x)) (src a) (dst b)))",
            f"2:32: unknown build `x`; builds in scope: {'b' * 60}…",
        ),
        (
            "\ufeff((from img))",
            "1:1: the text starts with a byte order mark (U+FEFF); save the spec without one",
        ),
        # UTF-8 for U+D800 spelt with escapes.
        ('((from "\\237\\160\\128"))', "1:8: the string's escapes do not form valid UTF-8"),
    ],
)
def test_errors_say_where_and_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(text)
    assert str(caught.value) == message
    line, column, _ = message.split(":", 2)
    assert (caught.value.line, caught.value.column) == (int(line), int(column))
    assert isinstance(caught.value, BuildError)


def test_nesting_is_limited_by_the_reader() -> None:
    allowed = "(" * MAX_NESTING + ")" * MAX_NESTING
    with pytest.raises(SpecError) as caught:
        parse(allowed)
    assert str(caught.value) == "1:2: expected (build NAME SPEC) or (from IMAGE)"
    too_deep = MAX_NESTING + 1
    for text, where in [
        ("(" * too_deep + ")" * too_deep, f"1:{too_deep}"),
        ("(" * 100_000, f"1:{too_deep}"),
        ("\n(" * 5000, f"{too_deep + 1}:1"),
    ]:
        with pytest.raises(SpecError) as caught:
            parse(text)
        assert str(caught.value) == (
            f"{where}: nesting deeper than {MAX_NESTING} levels; a spec needs far fewer"
        )


def nested_builds(depth: int) -> str:
    """A spec whose first stage has a child stage, which has one, ... `depth` levels deep."""
    text = "((from img) (run (shell x)))"
    for level in range(depth):
        copy = f"(copy (from (build s{level})) (src a) (dst b))"
        text = f"((build s{level} {text}) (from img) {copy})"
    return text


def test_nested_builds_are_limited_and_work_up_to_the_limit() -> None:
    deepest = parse(nested_builds(MAX_BUILD_DEPTH))
    # Comparing, hashing and printing recurse into child stages: all must cope with the limit.
    assert deepest == parse(nested_builds(MAX_BUILD_DEPTH))
    assert hash(deepest) == hash(parse(nested_builds(MAX_BUILD_DEPTH)))
    assert parse(to_sexp(deepest)) == deepest
    assert to_dockerfile(deepest, buildkit=True).count("FROM img") == MAX_BUILD_DEPTH + 1

    text = nested_builds(MAX_BUILD_DEPTH + 1)
    with pytest.raises(SpecError) as caught:
        parse(text)
    assert str(caught.value) == (
        f"1:{text.index('(build s0 ') + 1}: builds nested deeper than {MAX_BUILD_DEPTH} levels;"
        " use fewer levels of (build NAME SPEC)"
    )


def test_a_stage_may_have_thousands_of_children() -> None:
    # Each child's scope is shared, not copied: with a copy each, 20,000 children took 90 s.
    builds = "".join(f"(build b{i:04} ((from img)))" for i in range(5000))
    spec = parse(f"({builds} (from img) (copy (from (build b4999)) (src x) (dst y)))")
    assert len(spec.child_builds) == 5000
    assert spec.ops == (Copy(from_=Build("b4999"), src=("x",), dst="y"),)
    with pytest.raises(SpecError) as caught:
        parse(f"({builds} (from img) (copy (from (build zzz)) (src x) (dst y)))")
    assert caught.value.message == (
        "unknown build `zzz`; builds in scope: b0000, b0001, b0002, b0003, b0004, b0005, b0006,"
        " b0007, b0008, b0009 and 4990 more"
    )


def test_error_names_the_file() -> None:
    with pytest.raises(SpecError) as caught:
        parse("((from img)\n (wrkdir /))", filename="build.spec")
    assert str(caught.value).startswith("build.spec:2:3: unknown op `wrkdir`")
    assert caught.value.message.startswith("unknown op `wrkdir`")


def test_an_error_about_a_whole_file_has_no_position() -> None:
    err = SpecError("No such file or directory", filename="build.spec")
    assert str(err) == "build.spec: No such file or directory"
    assert (err.line, err.column) == (None, None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b'((from img)\n (comment "caf\xe9"))',
            "x.spec:2:15: invalid UTF-8 (byte 0xe9 at offset 26)",
        ),
        (b"\xff", "x.spec:1:1: invalid UTF-8 (byte 0xff at offset 0)"),
        # A UTF-8 surrogate: no valid UTF-8 encodes one.
        (b"((from \xed\xa0\x80))", "x.spec:1:8: invalid UTF-8 (byte 0xed at offset 7)"),
        (
            "((from é) ".encode() + b"\xe2\x82",
            "x.spec:1:11: invalid UTF-8 (byte 0xe2 at offset 11)",
        ),
    ],
)
def test_decode_locates_bytes_that_are_not_utf8(data: bytes, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        decode(data, filename="x.spec")
    assert str(caught.value) == message + "; save the spec as UTF-8"


def test_decode_reads_utf8() -> None:
    assert decode("((from café))".encode(), filename="x.spec") == "((from café))"


# --- The canonical printer ------------------------------------------------------------------------


def test_canonical_form() -> None:
    assert to_sexp(parse(GOLDEN_SPEC)) == r"""((build tools
  ((build fetch
    ((from alpine:3.19)
     (run (network host)
          (shell "wget -O /src.tar.gz https://example.org/src.tar.gz"))))
   (from debian:12)
   (copy (from (build fetch)) (src /src.tar.gz) (dst /tmp/))
   (run (shell "tar -C /opt -xf /tmp/src.tar.gz"))))
 (from debian:12)
 (comment "Build as an unprivileged user")
 (shell /bin/bash -c)
 (user (uid 1000) (gid 1000))
 (workdir /home/user)
 (env GREETING "say \"hi\" \\ `now`")
 (run (cache (apt (target /var/cache/apt)) (pip (target /home/user/.cache/pip)))
      (network host)
      (secrets (token (target /run/secrets/token)))
      (shell "apt-get update &&\n\
              apt-get install -y make &&\n\
              \  pip install -r requirements.txt"))
 (copy (src Makefile src) (dst ./) (exclude .git _build))
 (copy (from (build tools)) (src /opt/tool) (dst /usr/local/bin/tool))
 (user (name builder))
 (copy (src README.md) (dst /home/builder/))
 (run (shell make)))
"""


def test_printing_is_idempotent_on_hand_written_text() -> None:
    messy = '((from "img")   (env X "a\\\n   b") (run (shell "x")) ; done\n)'
    once = to_sexp(parse(messy))
    assert once == '((from img)\n (env X ab)\n (run (shell x)))\n'
    assert to_sexp(parse(once)) == once


HAND_WRITTEN = [
    Spec(from_="img"),
    Spec(from_="a b", ops=(Comment(""), Shell(("",)), Env("_", ""))),
    Spec(
        child_builds=(
            ("x", Spec(child_builds=(("y", Spec(from_="z")),), from_="w")),
            ("stage two", Spec(from_="v", ops=(Copy(from_=Build("x"), src=("a",), dst="b"),))),
        ),
        from_="img",
        ops=(
            Copy(from_=Build("stage two"), src=("a", "b c"), dst="d/", exclude=("e", "(f)")),
            Run("\n  leading\n\n\ttab\ntrailing\n", cache=(CacheMount("c", "/c"),)),
            Run("x", secrets=(SecretMount("s s", "/run/s"),), network=("host", "other")),
            UserName("ContainerAdministrator"),
            UserIds(4294967295, 0),
        ),
    ),
]


@pytest.mark.parametrize("spec", HAND_WRITTEN)
def test_hand_written_round_trips(spec: Spec) -> None:
    assert parse(to_sexp(spec)) == spec


AWKWARD_TEXTS = [
    "", " ", "a b", '"', "\\", "\\n", "line1\nline2", "  indented\n  twice\n", "\r\n", "\n\n",
    "tab\there", "é", "日本語", "🙂", "e\u0301", "\u2028", "\x00", "\x7f", "\x1b[0m", "(", ")",
    ";", "; not a comment", "#|", "|#", "#;", "'", "`", "nil", "t", "42", "-1", "1.5", "context",
    "build", "\\\n  x", "a\\\nb", "\\x41", "\\101", "\\o101", "$HOME", "a=b", "[x]", "\\ ",
]


def random_text(rng: random.Random) -> str:
    """A string that is hard to print: one or more awkward pieces, or plain letters."""
    if rng.random() < 0.2:
        return "".join(rng.choices("abcXYZ019_-./:", k=rng.randint(1, 8)))
    return "".join(rng.choice(AWKWARD_TEXTS) for _ in range(rng.randint(1, 3)))


def random_texts(rng: random.Random, at_least: int = 0) -> tuple[str, ...]:
    return tuple(random_text(rng) for _ in range(rng.randint(at_least, 3)))


def random_op(rng: random.Random, scope: list[str]) -> Op:
    """One op of a random kind; a copy names a build only from `scope`."""
    def mounts(kind: type[CacheMount] | type[SecretMount]) -> tuple:
        return tuple(kind(random_text(rng), random_text(rng)) for _ in range(rng.randint(0, 2)))

    match rng.randrange(8):
        case 0:
            return Comment(random_text(rng))
        case 1:
            return Workdir(random_text(rng))
        case 2:
            return Shell(random_texts(rng, at_least=1))
        case 3:
            return Env(random_text(rng).replace("=", "") or "N", random_text(rng))
        case 4:
            return UserIds(rng.randrange(2**32), rng.randrange(70000))
        case 5:
            return UserName(random_text(rng))
        case 6:
            return Run(
                random_text(rng),
                cache=mounts(CacheMount),
                network=random_texts(rng),
                secrets=mounts(SecretMount),
            )
        case _:
            from_ = Build(rng.choice(scope)) if scope and rng.random() < 0.6 else "context"
            return Copy(
                from_=from_,
                src=random_texts(rng, at_least=1),
                dst=random_text(rng),
                exclude=random_texts(rng),
            )


def random_spec(rng: random.Random, scope: list[str], depth: int = 0) -> Spec:
    """A valid spec: up to two child stages per level, three levels deep."""
    children: list[tuple[str, Spec]] = []
    for _ in range(rng.randint(0, 2) if depth < 2 else 0):
        name = random_text(rng)
        if name not in (child for child, _ in children):
            children.append((name, random_spec(rng, scope + [c for c, _ in children], depth + 1)))
    visible = scope + [child for child, _ in children]
    ops = tuple(random_op(rng, visible) for _ in range(rng.randint(0, 8)))
    return Spec(child_builds=tuple(children), from_=random_text(rng), ops=ops)


def all_ops(spec: Spec) -> list[Op]:
    return [*spec.ops, *(op for _, child in spec.child_builds for op in all_ops(child))]


def test_generated_specs_round_trip() -> None:
    rng = random.Random(20240601)
    specs = [random_spec(rng, []) for _ in range(300)]
    # The generator must reach every op and builds copied from, or the test proves little.
    ops = [op for spec in specs for op in all_ops(spec)]
    kinds = {type(op) for op in ops}
    assert kinds == {Comment, Workdir, Shell, Env, UserIds, UserName, Run, Copy}
    assert any(isinstance(op, Copy) and isinstance(op.from_, Build) for op in ops)
    assert any(spec.child_builds and spec.child_builds[0][1].child_builds for spec in specs)
    for spec in specs:
        text = to_sexp(spec)
        assert parse(text) == spec, text
        # Control and invisible characters are escaped, so the text is safe to show.
        assert all(ch.isprintable() or ch == "\n" for ch in text), text
        assert to_sexp(parse(text)) == text


def test_specs_compare_by_content() -> None:
    assert parse(GOLDEN_SPEC) == parse(to_sexp(parse(GOLDEN_SPEC)))
    assert hash(parse(GOLDEN_SPEC)) == hash(parse(GOLDEN_SPEC))
    assert parse("((from a))") != parse("((from b))")


# --- Contexts -------------------------------------------------------------------------------------


def test_contexts_follow_the_ops() -> None:
    ops = parse(
        """((from img)
            (run (shell a))
            (workdir /src) (workdir sub) (env A 1) (env B 2) (env A 3)
            (user (uid 5) (gid 6)) (shell /bin/bash -ec)
            (run (shell b))
            (workdir /abs) (user (name bob))
            (copy (src x) (dst y)))"""
    ).ops
    seen = list(contexts(ops))
    assert [op for op, _ in seen] == list(ops)
    assert seen[0][1] == Context(workdir="/", user=ROOT, env=(), shell=("/bin/sh", "-c"))
    assert seen[8][1] == Context(
        workdir="/src/sub",
        user=UserIds(5, 6),
        env=(("A", "3"), ("B", "2")),
        shell=("/bin/bash", "-ec"),
    )
    assert seen[11][1].workdir == "/abs"
    assert seen[11][1].user == UserName("bob")


def test_contexts_start_from_a_given_context() -> None:
    start = Context(env=(("PATH", "/bin"),))
    [(_, context)] = contexts([Run("x")], start)
    assert context is start
    assert start.after(Env("PATH", "/usr/bin")).env == (("PATH", "/usr/bin"),)


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "buildkit", "target_os"),
    [("plain", False, "unix"), ("buildkit", True, "unix"), ("windows", False, "windows")],
)
def test_dockerfile_golden(name: str, buildkit: bool, target_os: str) -> None:
    spec = parse(GOLDEN_SPEC)
    actual = to_dockerfile(spec, buildkit=buildkit, os=target_os)  # type: ignore[arg-type]
    assert_golden(GOLDEN_DIR / f"{name}.Dockerfile", actual)


def test_buildkit_mounts_need_a_numeric_user() -> None:
    spec = parse("((from img) (user (name bob)) (run (cache (c (target /c))) (shell x)))")
    assert to_dockerfile(spec, buildkit=False) == "FROM img\nUSER bob\nRUN x\n"
    with pytest.raises(BuildError, match="numeric user"):
        to_dockerfile(spec, buildkit=True)


def test_dockerfile_mount_uid_follows_the_user() -> None:
    spec = parse(
        """((from img)
            (run (secrets (s (target /s))) (shell a))
            (user (uid 7) (gid 8))
            (run (cache (c (target /c))) (shell b)))"""
    )
    assert to_dockerfile(spec, buildkit=True) == (
        "FROM img\n"
        "RUN --mount=type=secret,id=s,target=/s,uid=0 a\n"
        "USER 7:8\n"
        "RUN --mount=type=cache,id=c,target=/c,uid=7 b\n"
    )
