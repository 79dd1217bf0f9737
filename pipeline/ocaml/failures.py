"""Why a build or lint step failed, in one line: the step's command and the first compiler or
test error line of its output, e.g.
`dune build @install @check @runtest: Error: Library "core_unix.command_unix" not found.`

A build's log (its form is `pipeline.obuilder.log_format`'s) is for each step a header
(`WORKDIR: OP`), the step's output, then its outcome, the builder's own lines being marked. A
failed step has no outcome, so what follows the last outcome is the failing step: its header tells
which of the spec's `run` steps it is, and its output holds the error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import step_header
from pipeline.obuilder.log_format import MARK, parse_outcome

LINE_LIMIT = 300
"""The longest error line quoted (a reason is one line on a page and in a GitHub status)."""

# Lines that say what went wrong, whichever comes first in the step's output.
_ERROR_LINE = re.compile(
    r"Error(?: \(warning [^)]*\))?: .*"  # the compiler's and dune's errors
    r"|Fatal error: .*"  # an uncaught exception, e.g. in a test runner
    r"|\[FAIL\] .*"  # alcotest: a failed test
    r"|(?:Failure|FAIL): .*"  # OUnit: a failed test
    r"|error \d+: .*"  # opam lint
    r"|E: .*")  # apt
# Failing that, where dune points (e.g. a file `dune build @fmt` would reformat).
_LOCATION = re.compile(r'File "[^"]*", line \d+.*')
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# alcotest draws a box around the failures it repeats at the end.
_BOX = "│┌┐└┘─ \t"
# A line the builder wrote itself (a header's or an outcome), with its mark.
_MARKED = re.compile(rb"^([^\n]*)" + re.escape(MARK) + rb"\n", re.MULTILINE)


class Reason(Exception):
    """A job's failure whose message is the whole one-line reason: pages show it without the
    exception's type (see `shown`)."""


class StepFailed(Reason):
    """A build or lint step failed; the message is its one-line reason (see `step_reason`)."""


def first_error(output: str) -> str | None:
    """The first line of `output` that says what failed (an `Error:` of the compiler or dune,
    also as opam quotes it when a package fails to build,
    an alcotest `[FAIL]`, an OUnit failure, `Fatal error: exception ...`, an opam lint or apt
    error), else the first location dune gave (`File "x.ml", line 3, ...`), else None."""
    # opam quotes the output of a package's failed command with "# " before each line.
    lines = [" ".join(_ANSI.sub("", line).removeprefix("# ").strip(_BOX).split())
             for line in output.splitlines()]
    # alcotest marks the failure it reports first with "> ": that one is the first, wherever
    # its line is.
    pointed = [line.removeprefix("> ") for line in lines if line.startswith("> ")]
    for pattern in (_ERROR_LINE, _LOCATION):
        found = next((line for line in [*pointed, *lines] if pattern.fullmatch(line)), None)
        if found is not None:
            return found if len(found) <= LINE_LIMIT else found[:LINE_LIMIT - 1] + "…"
    return None


def _run_steps(spec: S.Spec) -> Iterator[tuple[str, str]]:
    """(header, command) of every `run` step of `spec`, child stages first, as built."""
    for _name, child in spec.child_builds:
        yield from _run_steps(child)
    for op, context in S.contexts(spec.ops):
        if isinstance(op, S.Run):
            yield step_header(context, op), op.shell


def step_reason(spec: str, step_log: str) -> str | None:
    """`COMMAND: ERROR LINE` for a build of `spec` (its text) whose failing step wrote
    `step_log` (its marked header lines, then its output, as `StepLog` keeps them); None unless
    the step is one of the spec's `run` steps and its output has an error line."""
    lines = step_log.split("\n")
    mark = MARK.decode()
    header_length = next((n for n, line in enumerate(lines) if not line.endswith(mark)),
                         len(lines))
    header = "\n".join(line.removesuffix(mark) for line in lines[:header_length])
    command = dict(_run_steps(S.parse(spec))).get(header)
    line = first_error("\n".join(lines[header_length:])) if command is not None else None
    return None if line is None else f"{' '.join(command.split())}: {line}"


class StepLog:
    """The log of a build's current step, kept while the whole log goes on to `forward`."""

    def __init__(self, forward: Callable[[bytes], None]) -> None:
        """Pass every write on to `forward` (say, the job's log)."""
        self._forward = forward
        self._current = bytearray()

    def write(self, data: bytes) -> None:
        """Take the next part of the build's log."""
        self._forward(data)
        # An outcome line may have begun in the previous part: look a little before the new one.
        start = max(0, len(self._current) - 200)
        self._current += data
        ends = [found.end() for found in _MARKED.finditer(self._current, start)
                if parse_outcome(found[1].decode(errors="replace")) is not None]
        if ends:
            del self._current[:ends[-1]]

    @property
    def text(self) -> str:
        """The current step's (marked) header and output so far."""
        return self._current.decode(errors="replace")


def _reasons(kind: type[Reason]) -> Iterator[type[Reason]]:
    yield kind
    for subclass in kind.__subclasses__():
        yield from _reasons(subclass)


def shown(message: str) -> str:
    """A job's error as a page shows it: a `Reason`'s message (a failed step's, say) without
    the exception's type, which the engine puts before every job's error."""
    kind, separator, rest = message.partition(": ")
    if separator and any(reason.__name__ == kind for reason in _reasons(Reason)):
        return rest
    return message
