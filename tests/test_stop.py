"""Ctrl-C and SIGTERM stop `pipeline run` whatever the pipeline file's code is doing.

Every test runs a real `pipeline` process whose user code never returns (a `pipeline()` or a
`map` that spins or sleeps forever, a job that spins, code that swallows the interrupt), sends a
real signal once that code is known to run, and checks the exit status (128 + the signal), the
one line on stderr naming what was running, and that no traceback is printed. The issue asks for
an exit within 2 s; the tests only guard against a hang (`HANG_GUARD`), as timing on a shared
machine is not a measurement (`stopping_times` prints the figures for the record).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_cli import wait_until

HANG_GUARD = 10.0
"""Seconds a stopped process may take to exit before the test calls it a hang (the issue's
bound is 2 s; this is generous so that a loaded machine does not fail the test)."""

SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def stop(tmp_path: Path, source: str, *args: str, sig: int = signal.SIGINT,
         signals: int = 1) -> tuple[int, str, str]:
    """Run `pipeline ARGS` on the pipeline file `source` until it writes the file `marker` (its
    code is then running), send `sig` (`signals` times, 0.5 s apart); the status, stdout and
    stderr."""
    (tmp_path / "marker").unlink(missing_ok=True)
    file = tmp_path / "never_returns.py"
    file.write_text(textwrap.dedent(source).replace("MARKER", repr(str(tmp_path / "marker"))))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *[a.replace("FILE", str(file)) for a in args]],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until((tmp_path / "marker").exists, "the user code never started")
        for i in range(signals):
            if i:
                time.sleep(0.5)
            os.kill(process.pid, sig)
        try:
            out, err = process.communicate(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {HANG_GUARD} s after the signal") from None
        return process.returncode, out, err
    finally:
        process.kill()
        process.wait()


SPINNING_PIPELINE = """
    from pathlib import Path

    def pipeline(args):
        Path(MARKER).write_text("running")
        while True:
            pass
"""

SPINNING_MAP = """
    from pathlib import Path
    import pipeline as p

    def spin(x):
        Path(MARKER).write_text("running")
        while True:
            pass

    def pipeline(args):
        return p.const(1).map(spin, label="spin forever").map(str, label="after")
"""

SLEEPING_MAP = """
    import time
    from pathlib import Path
    import pipeline as p

    def sleep(x):
        Path(MARKER).write_text("running")
        time.sleep(1e9)

    def pipeline(args):
        return p.const(1).map(sleep, label="sleep forever")
"""

CASES = {
    "pipeline": (SPINNING_PIPELINE, "pipeline() in {file}"),
    "spinning map": (SPINNING_MAP, 'map "spin forever"'),
    "sleeping map": (SLEEPING_MAP, 'map "sleep forever"'),
}


@pytest.mark.parametrize(("sig", "status"), SIGNALS, ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_stops_user_code_that_never_returns(
        tmp_path: Path, case: str, sig: int, status: int) -> None:
    source, what = CASES[case]
    code, out, err = stop(tmp_path, source, "run", "FILE", "--no-web", sig=sig)
    what = what.format(file=tmp_path / "never_returns.py")
    assert code == status, err
    assert err.splitlines() == [f"pipeline: stopped while {what} was running (it did not return)"]
    if case != "pipeline":
        # Stopped the usual way: jobs cancelled and state saved.
        assert "Stopping: cancelling running jobs" in out
        assert (tmp_path / "var" / "db.sqlite").exists()


def test_once_and_diagram_are_stopped_too(tmp_path: Path) -> None:
    code, out, err = stop(tmp_path, SPINNING_MAP, "run", "FILE", "--once", sig=signal.SIGTERM)
    assert code == 143, err
    assert err.splitlines() == [
        'pipeline: stopped while map "spin forever" was running (it did not return)']
    assert "spin forever" in out, "--once prints the states when stopped"
    code, _, err = stop(tmp_path, SPINNING_PIPELINE, "diagram", "FILE")
    assert code == 130, err
    assert err.splitlines() == [f"pipeline: stopped while pipeline() in "
                                f"{tmp_path / 'never_returns.py'} was running (it did not return)"]


def test_stopped_while_serving_the_web_ui(tmp_path: Path) -> None:
    """With the web UI on, the process stops the same way, the server shut down with it (the UI
    does not answer while the map runs: user code runs on the event loop's thread)."""
    code, out, err = stop(tmp_path, SPINNING_MAP, "run", "FILE", "--port", "0")
    assert code == 130, err
    assert "Web UI: http://127.0.0.1:" in out
    assert err.splitlines() == [
        'pipeline: stopped while map "spin forever" was running (it did not return)']


SWALLOWING_MAP = """
    import subprocess
    from pathlib import Path
    import pipeline as p

    @p.builder("child")
    async def child(job, key):
        # A process the job leaves running: the forced exit must not orphan it.
        return subprocess.Popen(["sleep", "1000"]).pid

    def stubborn(pid):
        Path(MARKER + ".pid").write_text(str(pid))
        Path(MARKER).write_text("running")
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass

    def pipeline(args):
        return child("x").map(stubborn, label="stubborn")
"""


def test_user_code_that_swallows_the_interrupt_is_stopped_anyway(tmp_path: Path) -> None:
    code, _, err = stop(tmp_path, SWALLOWING_MAP, "run", "FILE", "--no-web")
    assert code == 130, err
    assert err.splitlines() == [
        'pipeline: stopped while map "stubborn" was running (it did not return)']
    pid = int((tmp_path / "marker.pid").read_text())
    try:
        wait_until(lambda: not _alive(pid), "the job's child process outlived the forced exit")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


SPINNING_JOB = """
    from pathlib import Path
    import pipeline as p

    @p.builder("spinner")
    async def spinner(job, key):
        Path(MARKER).write_text("running")
        while True:
            pass

    def pipeline(args):
        return spinner("x")
"""


def test_a_job_that_blocks_the_event_loop_is_named(tmp_path: Path) -> None:
    code, _, err = stop(tmp_path, SPINNING_JOB, "run", "FILE", "--no-web", sig=signal.SIGTERM)
    assert code == 143, err
    assert re.fullmatch(r"pipeline: stopped while job \d{4}-\d\d-\d\d/\d{6}-spinner-\w+ was "
                        r"running \(it did not return\)\n", err), err


CANCEL_SWALLOWING_JOB = """
    import asyncio
    from pathlib import Path
    import pipeline as p

    @p.builder("deaf")
    async def deaf(job, key):
        Path(MARKER).write_text("running")
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    def pipeline(args):
        return deaf("x")
"""


def test_a_second_signal_ends_a_stop_that_hangs(tmp_path: Path) -> None:
    code, out, err = stop(tmp_path, CANCEL_SWALLOWING_JOB, "run", "FILE", "--no-web",
                             signals=2)
    assert code == 130, err
    assert "Stopping: cancelling running jobs" in out
    assert err.splitlines() == [
        "pipeline: stopped by a second signal before running jobs were cancelled"]
