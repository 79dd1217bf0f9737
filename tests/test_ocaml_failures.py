"""The one-line reason of a failed build or lint step: its command and the first error line of
its output, from outputs as OCaml's tools print them."""

from __future__ import annotations

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import step_header
from pipeline.obuilder.log_format import MARK, outcome
from pipeline.ocaml.failures import (
    LINE_LIMIT,
    Reason,
    StepFailed,
    StepLog,
    first_error,
    shown,
    step_reason,
)

DUNE_LIBRARY = """\
File "bin/dune", line 4, characters 12-34:
4 |  (libraries core_unix.command_unix))
                ^^^^^^^^^^^^^^^^^^^^^^
Error: Library "core_unix.command_unix" not found.
-> required by _build/default/bin/main.exe
-> required by @@default
"""

COMPILER = """\
File "src/hello.ml", line 3, characters 20-24:
3 | let greet name = "Hello, " ^ nme ^ "!"
                                 ^^^
Error: Unbound value nme
Hint: Did you mean name?
File "src/other.ml", line 1, characters 0-1:
Error: Syntax error
"""

WARNING_AS_ERROR = """\
File "src/hello.ml", line 1, characters 4-9:
1 | let debug = true
        ^^^^^
Error (warning 32 [unused-value-declaration]): unused value debug.
"""

ALCOTEST = """\
File "test/dune", line 2, characters 7-17:
2 |  (name test_hello)
           ^^^^^^^^^^
Testing `hello'.
This run has ID `Q8ZC1H3N'.

  [OK]          greet          1   greets the empty name.
  [FAIL]        greet          0   greets by name.

\u250c\u2500\u2500\u2500\u2500\u2510
\u2502 [FAIL]        greet          0   greets by name.      \u2502
\u2514\u2500\u2500\u2500\u2500\u2518
ASSERT greeting
FAIL greeting

   Expected: `"Hello, world!"'
   Received: `"Goodbye, world!"'

Raised at Alcotest_engine__Test.check in file "src/alcotest-engine/test.ml", line 200
Full test results in `~/src/_build/default/test/_build/_tests/hello'.
1 failure! in 0.001s. 2 tests run.
"""

OUNIT = """\
.F
==============================================================================
Failure: hello:0:greets by name

expected: Hello, world! but got: Goodbye, world!
------------------------------------------------------------------------------
Ran: 2 tests in: 0.10 seconds.
FAILED: Cases: 2 Tried: 2 Errors: 0 Failures: 1 Skip:  0 Todo: 0 Timeouts: 0.
"""

EXCEPTION = """\
(cd _build/default/test && ./test_hex.exe)
Fatal error: exception Invalid_argument("index out of bounds")
"""

FMT = """\
File "src/hello.ml", line 1, characters 0-0:
diff --git a/_build/default/src/hello.ml b/_build/default/src/.formatted/hello.ml
-let greet name = "Hello, "^name
+let greet name = "Hello, " ^ name
"""


def test_dune_and_compiler_errors() -> None:
    assert first_error(DUNE_LIBRARY) == 'Error: Library "core_unix.command_unix" not found.'
    # The first of several.
    assert first_error(COMPILER) == "Error: Unbound value nme"
    assert first_error(WARNING_AS_ERROR) == \
        "Error (warning 32 [unused-value-declaration]): unused value debug."


OPAM_BUILD = """\
[ERROR] The compilation of wordcount.1.1 failed at "dune build -p wordcount -j 1".

#=== ERROR while compiling wordcount.1.1 ======================================#
# command              /usr/bin/dune build -p wordcount -j 1
# exit-code            1
### output ###
#       ocamlc bin/.wordcount.eobjs/byte/dune__exe__Wordcount.{cmi,cmo,cmt} (exit 2)
# File "bin/wordcount.ml", line 1, characters 22-57:
# 1 | let () = print_string (List.length (Strutil.words "a b"))
#                           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
# Error: This expression has type int but an expression was expected of type
#          string
"""


def test_the_compilers_error_as_opam_quotes_it() -> None:
    assert first_error(OPAM_BUILD) == \
        "Error: This expression has type int but an expression was expected of type"


def test_test_failures() -> None:
    assert first_error(ALCOTEST) == "[FAIL] greet 0 greets by name."
    # alcotest points at the failure it reports first with ">".
    pointed = "> [FAIL]        greet          0   world.\n" \
        "  [FAIL]        greet          1   empty.\n"
    assert first_error(pointed) == "[FAIL] greet 0 world."
    assert first_error(OUNIT) == "Failure: hello:0:greets by name"
    assert first_error(EXCEPTION) == \
        'Fatal error: exception Invalid_argument("index out of bounds")'


def test_without_an_error_line_dunes_location_then_nothing() -> None:
    assert first_error(FMT) == 'File "src/hello.ml", line 1, characters 0-0:'
    assert first_error("make: *** [all] Killed\n") is None
    assert first_error("") is None


def test_colours_are_removed_and_long_lines_cut() -> None:
    assert first_error("\x1b[1;31mError\x1b[0m: Unbound module Foo\n") == \
        "Error: Unbound module Foo"
    line = first_error("Error: " + "x" * 1000)
    assert line is not None and len(line) == LINE_LIMIT and line.endswith("…")


SPEC = """\
((from debian:12)
 (workdir /src)
 (run (network host) (shell "apt-get install -y ocaml-dune"))
 (copy (src .) (dst /src/))
 (run (shell "dune build @install @check @runtest")))
"""


def headers() -> list[str]:
    """The headers of SPEC's steps, each line marked as the builder marks its own lines."""
    return [marked(step_header(context, op)) for op, context in S.contexts(S.parse(SPEC).ops)]


def marked(text: str) -> str:
    return "".join(f"{line}{MARK.decode()}\n" for line in text.split("\n"))


def test_the_failing_run_step_is_named_by_its_command() -> None:
    build = headers()[-1]
    assert step_reason(SPEC, build + DUNE_LIBRARY) == \
        'dune build @install @check @runtest: Error: Library "core_unix.command_unix" not found.'
    # A step with a multi-line header (a run with network) is found too.
    install = headers()[1]
    assert install.count("\n") > 1
    assert step_reason(SPEC, f"{install}E: Unable to locate package ocaml-dune\n") == \
        "apt-get install -y ocaml-dune: E: Unable to locate package ocaml-dune"


def test_no_reason_without_an_error_line_or_a_known_step() -> None:
    assert step_reason(SPEC, f"{headers()[-1]}Killed\n") is None
    assert step_reason(SPEC, marked('/src: (run (shell "other"))') + DUNE_LIBRARY) is None
    # A command cannot pass its output off as a header: only the builder's lines are marked.
    assert step_reason(SPEC, headers()[-1].replace(MARK.decode(), "") + DUNE_LIBRARY) is None


def test_the_step_log_keeps_the_current_step_only() -> None:
    written: list[bytes] = []
    log = StepLog(written.append)
    first, build = headers()[1], headers()[-1]
    saved = marked(outcome("a" * 64, cached=False))
    chunks = [f"{first}Reading package lists...\n".encode(), saved[:20].encode(),
              saved[20:].encode(), f"{build}File ".encode(), DUNE_LIBRARY[5:].encode()]
    for chunk in chunks:
        log.write(chunk)
    # Everything went on; the outcome line split over two writes was still seen.
    assert written == chunks
    assert log.text == build + DUNE_LIBRARY
    # A step with no output: its outcome follows its header at once.
    log.write((first + marked(outcome("b" * 64, cached=True))).encode())
    assert log.text == ""
    # Output that looks like an outcome is not one.
    log.write(f'{build}{outcome("c" * 64, cached=False)}\n'.encode())
    assert log.text.startswith(build)


def test_a_failed_steps_reason_is_shown_without_its_type() -> None:
    message = f"{StepFailed.__name__}: dune build: Error: Unbound value nme"
    assert shown(message) == "dune build: Error: Unbound value nme"
    assert shown("BuildError: step failed") == "BuildError: step failed"


def test_any_reasons_message_is_shown_without_its_type() -> None:
    class MergeRefused(Reason):
        pass

    assert shown(f"{MergeRefused.__name__}: Cannot merge") == "Cannot merge"
    assert shown("ValueError: Cannot merge") == "ValueError: Cannot merge"
