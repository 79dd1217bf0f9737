"""One `pipeline run` per state directory: a second one says which process holds it, exits 2.

Real processes: a first run holds a job running; a second run on the same state directory must
not start it again. The lock goes with its holder, whether it stops normally or is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from test_cli import pipeline_cmd, wait_until, write

from pipeline import cli

HOLDING = """
    import asyncio
    from pathlib import Path
    import pipeline as p

    @p.builder("hold")
    async def hold(job, key):
        if Path({release!r}).exists():
            return key
        Path({marker!r}).write_text("running")
        await asyncio.sleep(600)
        return key

    def pipeline(args):
        return hold("x")
"""


def in_use(pid: int) -> str:
    return (f"pipeline: state directory var is in use by process {pid} (another pipeline run); "
            "use another --state-dir or stop it\n")


def test_one_run_per_state_directory(tmp_path: Path) -> None:
    marker, release = tmp_path / "running", tmp_path / "release"
    file = write(tmp_path / "hold.py", HOLDING.format(marker=str(marker), release=str(release)))

    def holder() -> subprocess.Popen[str]:
        """A run whose job is running (so it has taken the lock)."""
        marker.unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(file),
                                    "--no-web"], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_until(marker.exists, "the first run's job never started")
        return process

    first = holder()
    try:
        second = pipeline_cmd("run", file, "--once", cwd=tmp_path, timeout=30)
        assert (second.returncode, second.stdout, second.stderr) == (2, "", in_use(first.pid))
        logs = list((tmp_path / "var" / "job").glob("*/*.log"))
        assert len(logs) == 1, "the second run started the job again"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 0
    finally:
        first.kill()
        first.communicate()

    # The lock went with the first run: a new run takes it, and holds it in turn.
    third = holder()
    try:
        fourth = pipeline_cmd("run", file, "--once", cwd=tmp_path, timeout=30)
        assert (fourth.returncode, fourth.stderr) == (2, in_use(third.pid))
    finally:
        os.kill(third.pid, signal.SIGKILL)
        third.communicate()

    # A SIGKILLed holder leaves no lock behind.
    release.touch()
    fifth = pipeline_cmd("run", file, "--once", cwd=tmp_path, timeout=30)
    assert fifth.returncode == 0, fifth.stderr


def test_a_process_may_run_twice_on_its_own_state_directory(tmp_path: Path) -> None:
    """`main` called twice in one process (as tests do) keeps the lock it has."""
    file = write(tmp_path / "const.py", """
        import pipeline as p

        def pipeline(args):
            return p.const(1)
    """)
    state = str(tmp_path / "state")
    for _ in range(2):
        assert cli.main(["run", str(file), "--once", "--no-web", "--state-dir", state]) == 0
