"""User code runs on the event loop's thread, with a way out on Ctrl-C and SIGTERM.

The engine calls the functions a pipeline file gives it (maps, binds, the per-item functions of a
`list_map`, cutoff equalities) synchronously, on the event loop's thread: a thread hop per map
would cost more than most maps. So a function that never returns blocks the loop, and with it the
web UI and asyncio's own signal handling. `call` records which function runs; `StopSignals`, the
`pipeline` command's handler of SIGINT and SIGTERM, is a plain Python signal handler, which runs
in the main thread between two bytecodes even while the loop is blocked, and which interrupts
blocking calls such as `time.sleep`. If user code is running, it raises `Interrupted` there: the
code unwinds, the engine evaluates nothing more, and the process stops the usual way (running
jobs cancelled, state saved), then exits 128 + the signal's number with one line naming what was
running. Otherwise it asks the event loop to stop.

A watchdog thread covers what cannot be unwound (code that catches the interrupt and goes on, a
job's coroutine spinning on the loop, a second signal while stopping hangs): if the loop does not
answer within `GRACE` seconds, it prints the line, stops the process's children (a job's
commands must not outlive it) and ends the process at once. Code stuck in C without releasing the
GIL (a huge `sum(range(...))`) cannot be stopped by any Python code; only SIGKILL ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from pipeline.term import Term

R = TypeVar("R")

GRACE = 1.0
"""Seconds the event loop has to answer after a stop signal before the process is ended at once
(the issue's bound for stopping is 2 s)."""

running: Any = None
"""The user code running now on the main thread (its term, or a description), or None."""


def call(what: Any, f: Callable[..., R], *args: Any) -> R:
    """`f(*args)`, recorded as the user code running: `what` is the term whose function `f` is,
    or a description such as "pipeline() in FILE"."""
    global running
    outer, running = running, what
    try:
        return f(*args)
    finally:
        running = outer


def describe(what: Any) -> str:
    """`map "label"` for a term, the description itself otherwise."""
    if isinstance(what, Term):
        kind = re.sub(r"(?<!^)(?=[A-Z])", "_", type(what).__name__).lower()
        return f'{kind} "{what.label}"'
    return str(what)


class Interrupted(KeyboardInterrupt):
    """Raised by a stop signal inside user code that is running, so that it unwinds.

    A KeyboardInterrupt, so that `except Exception` (in user code, in the engine) lets it pass
    and asyncio lets it out of the event loop. `what` describes the code; `status` is the exit
    status it calls for.
    """

    def __init__(self, signum: int, what: str | None) -> None:
        super().__init__(signum, what)
        self.signum = signum
        self.what = what

    @property
    def status(self) -> int:
        """128 + the signal's number, as a shell reports a process killed by it."""
        return 128 + self.signum

    def __str__(self) -> str:
        if self.what is None:
            return "stopped"
        return f"stopped while {self.what} was running (it did not return)"


class StopSignals:
    """SIGINT and SIGTERM for the `pipeline` command, from `with StopSignals():` to its end.

    Before `attach` (the pipeline file is loading, no event loop runs), a signal raises
    `Interrupted` wherever the main thread is. While attached to an event loop, it raises
    `Interrupted` inside user code that is running (`interrupted` keeps it, to be raised again
    once the process has stopped) and asks the loop to stop. After `detach`, the process is
    finishing and signals are only counted. A second signal, or a loop that does not answer
    within `grace` seconds, ends the process at once (see the module's docstring).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.interrupted: Interrupted | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: Callable[[], None] | None = None
        self._detached = False
        self._signalled = threading.Event()
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Started now, not by the handler: starting a thread takes locks the interrupted code
        # may hold.
        threading.Thread(target=self._watch, name="stop watchdog", daemon=True).start()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        self._signalled.set()
        # Put back what was there: `pipeline.cli.main` may run inside another program (tests).
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def status(self) -> int:
        """The exit status for the signal received: 128 + its number."""
        assert self.signum is not None
        return 128 + self.signum

    def attach(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        """From now on a signal calls `stop` on `loop` (the running loop)."""
        self._loop, self._stop = loop, stop

    def detach(self) -> None:
        """The loop has stopped: signals no longer interrupt anything."""
        self._loop, self._detached = None, True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._exit(self._blocker(frame),
                       "stopped by a second signal before running jobs were cancelled")
        self.signum = signum
        self._signalled.set()
        loop, what = self._loop, running
        if loop is not None and self._stop is not None:
            # As asyncio.run does for Ctrl-C: this also wakes the loop from its wait.
            loop.call_soon_threadsafe(self._stop)
        if what is not None or (loop is None and not self._detached):
            exc = Interrupted(signum, None if what is None else describe(what))
            if loop is not None:
                self.interrupted = exc
            raise exc

    def _watch(self) -> None:
        """After a signal, end the process if the loop does not answer within the grace period
        (or, before the loop, if user code still runs); check again every period until the
        process ends, as user code may block the loop while it stops."""
        self._signalled.wait()
        while not self._done.is_set():
            loop, answered = self._loop, threading.Event()
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(answered.set)
                except RuntimeError:  # closed meanwhile: the process is finishing
                    answered.set()
            if self._done.wait(self.grace):
                return
            if (not answered.is_set()) if loop is not None else running is not None:
                self._exit(self._blocker(None),
                           "stopped while the event loop was blocked (it did not answer)")

    def _blocker(self, frame: FrameType | None) -> str | None:
        """What keeps the main thread: the user code running, else the job or monitor the loop
        is running (its task's name), else the main thread's innermost frame unless the loop is
        merely waiting."""
        if running is not None:
            return describe(running)
        if self._loop is not None:
            task = asyncio.current_task(self._loop)
            if task is not None and task.get_name().startswith(("job ", "monitor ")):
                return task.get_name()
        if frame is None:
            frame = sys._current_frames().get(threading.main_thread().ident or 0)
        if frame is None or Path(frame.f_code.co_filename).name == "selectors.py":
            return None
        return f"the code at {frame.f_code.co_filename}:{frame.f_lineno}"

    def _exit(self, what: str | None, otherwise: str) -> None:
        """Print one line (about `what`, or `otherwise`), stop this process's children, end the
        process now."""
        signum = self.signum or signal.SIGTERM
        line = str(Interrupted(signum, what)) if what is not None else otherwise
        # Straight to the file descriptor: the main thread may hold sys.stderr's lock.
        os.write(2, f"pipeline: {line}\n".encode())
        _stop_children()
        os._exit(128 + signum)


def _stop_children() -> None:
    """SIGTERM to this process's children (the commands of running jobs), so that none is left
    running unattended when the process ends without cancelling its jobs."""
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGTERM)
