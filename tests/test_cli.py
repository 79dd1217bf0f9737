"""The `pipeline` command, run as a real process: exit codes, messages, Ctrl-C, the example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello.py"


def pipeline_cmd(
    *args: str | Path, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` for up to 30 s (a guard against a hang, not a measurement)."""
    for _ in range(600):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def run_then_interrupt(*args: str | Path, cwd: Path, meanwhile: Callable[[], None]
                       ) -> tuple[int, str, str]:
    """Run `pipeline ARGS`, do `meanwhile`, then press Ctrl-C; its status, stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        meanwhile()
        os.kill(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, out, err


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_hello_once_then_cached(tmp_path: Path) -> None:
    watched = tmp_path / "in.txt"
    watched.write_text("hello world\n")
    first = pipeline_cmd("run", HELLO, "--once", "--", watched, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = tmp_path / "in.txt.summary"
    assert summary.read_text() == "1 lines, 2 words\nHELLO WORLD\n"
    assert "write-summary" in first.stdout and "(cached)" not in first.stdout
    second = pipeline_cmd("run", HELLO, "--once", "--", watched, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    line = next(ln for ln in second.stdout.splitlines() if "write-summary" in ln)
    assert line.startswith("ok") and line.endswith("(cached)")
    assert (tmp_path / "var" / "db.sqlite").exists()


def test_state_dir_option(tmp_path: Path) -> None:
    watched = write(tmp_path / "in.txt", "x")
    result = pipeline_cmd("run", HELLO, "--state-dir", tmp_path / "state", "--once", "--",
                          watched, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "state" / "job").glob("*/*-write-summary-*.log"))
    assert not (tmp_path / "var").exists()


def test_failed_pipeline_exits_1(tmp_path: Path) -> None:
    file = write(tmp_path / "broken.py", """
        import pipeline as p

        def pipeline(args):
            return p.const(1).map(lambda x: x / 0, label="divide")
    """)
    result = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].split() == [
        "failed", "divide", "ZeroDivisionError:", "division", "by", "zero"]


def test_once_prints_the_error_of_each_failed_node(tmp_path: Path) -> None:
    file = write(tmp_path / "errors.py", """
        import pipeline as p

        class BadRead(p.Monitor):
            label = "bad-read"

            async def read(self):
                raise OSError("sensor unplugged")

        class BadWatch(p.Monitor):
            label = "bad-watch"

            async def watch(self, refresh):
                raise PermissionError("no watch for you")

            async def read(self):
                return "read without a watch"

        def explode(value):
            raise ValueError("bind exploded")

        def pipeline(args):
            return p.all(BadRead().term,
                         p.const(1).bind(explode, label="raising-bind"),
                         p.const(1).bind(lambda value: 42, label="int-bind"),
                         BadWatch().term,
                         label="everything")
    """)
    result = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = {" ".join(line.split()[:2]): " ".join(line.split()[2:])
             for line in result.stdout.splitlines()}
    assert lines["failed bad-read"] == "sensor unplugged"
    assert lines["failed raising-bind"] == "ValueError: bind exploded"
    assert lines["failed int-bind"] == "int-bind: function returned int, not a Term"
    assert lines["failed bad-watch"] == "cannot watch: no watch for you"
    # Blocked by its inputs: their errors are on their own lines.
    assert lines["blocked everything"] == ""


def test_pipeline_file_that_raises(tmp_path: Path) -> None:
    file = write(tmp_path / "raises.py", """
        import pipeline as p

        def pipeline(args):
            return p.const(1).nope
    """)
    result = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{file}:5: AttributeError" in result.stderr


def test_pipeline_file_returning_a_non_term(tmp_path: Path) -> None:
    file = write(tmp_path / "value.py", """
        def pipeline(args):
            return 42
    """)
    result = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{file}:2: pipeline() returned int, expected a Term" in result.stderr


def test_pipeline_file_with_a_syntax_error(tmp_path: Path) -> None:
    file = write(tmp_path / "syntax.py", "def pipeline(args):\n    return (\n")
    result = pipeline_cmd("diagram", file, cwd=tmp_path)
    assert result.returncode == 2 and "SyntaxError" in result.stderr and str(file) in result.stderr


def test_pipeline_file_without_pipeline_function(tmp_path: Path) -> None:
    file = write(tmp_path / "empty.py", "x = 1\n")
    result = pipeline_cmd("run", file, cwd=tmp_path)
    assert result.returncode == 2 and "defines no function pipeline(args)" in result.stderr


def test_missing_pipeline_file(tmp_path: Path) -> None:
    result = pipeline_cmd("run", tmp_path / "nope.py", cwd=tmp_path)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_cycle_is_reported_with_file_and_line(tmp_path: Path) -> None:
    file = write(tmp_path / "cycle.py", """
        import pipeline as p

        def pipeline(args):
            terms = {}
            loop = p.bind(lambda _: terms["after"], p.const(1), label="loop")
            terms["after"] = loop.map(str, label="after")
            return terms["after"]
    """)
    result = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{file}:6: cycle: 'loop' depends on 'after'" in result.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["run"], ["frobnicate"], []])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    assert pipeline_cmd(*args, cwd=tmp_path).returncode == 2


def test_help_describes_every_option(tmp_path: Path) -> None:
    top = pipeline_cmd("--help", cwd=tmp_path)
    assert top.returncode == 0 and "run" in top.stdout and "diagram" in top.stdout
    run = pipeline_cmd("run", "--help", cwd=tmp_path).stdout
    for option in ("--state-dir", "--confirm", "--once", "FILE", "mostly-harmless"):
        assert option in run
    diagram = pipeline_cmd("diagram", "--help", cwd=tmp_path).stdout
    for option in ("--output", "--expand", "FILE"):
        assert option in diagram


def test_diagram_writes_svg_without_running_anything(tmp_path: Path) -> None:
    watched = write(tmp_path / "in.txt", "x")
    result = pipeline_cmd("diagram", HELLO, "-o", tmp_path / "x.svg", "--", watched, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    svg = ElementTree.parse(tmp_path / "x.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert "write-summary" in "".join(svg.itertext())
    assert not (tmp_path / "var").exists(), "no state written"
    assert not (tmp_path / "in.txt.summary").exists(), "no job ran"


def test_diagram_dot_and_bad_suffix(tmp_path: Path) -> None:
    watched = write(tmp_path / "in.txt", "x")
    dot = pipeline_cmd("diagram", HELLO, "--", watched, cwd=tmp_path)
    assert dot.returncode == 0 and dot.stdout.startswith("digraph pipeline {")
    assert "rankdir=LR" in dot.stdout
    bad = pipeline_cmd("diagram", HELLO, "-o", tmp_path / "x.png", "--", watched, cwd=tmp_path)
    assert bad.returncode == 2 and ".svg or .dot" in bad.stderr


def test_confirm_level_holds_jobs(tmp_path: Path) -> None:
    file = write(tmp_path / "risky.py", """
        import pipeline as p

        @p.builder("deploy", level=p.Level.DANGEROUS)
        async def deploy(job, key):
            return key

        def pipeline(args):
            return deploy("prod")
    """)
    held = pipeline_cmd("run", file, "--confirm", "above-average", "--once", cwd=tmp_path)
    assert held.returncode == 1
    assert held.stdout.split()[-3:-1] == ["waiting-for-confirmation", "deploy"]
    ran = pipeline_cmd("run", file, "--once", cwd=tmp_path)
    assert ran.returncode == 0 and ran.stdout.split()[-3:-1] == ["ok", "deploy"]


def test_ctrl_c_cancels_running_jobs_and_saves_state(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    file = write(tmp_path / "slow.py", f"""
        import asyncio
        from pathlib import Path
        import pipeline as p

        @p.builder("quick")
        async def quick(job, key):
            return key

        @p.builder("slow")
        async def slow(job, key):
            Path({str(marker)!r}).write_text("yes")
            await asyncio.sleep(600)
            return key

        def pipeline(args):
            return p.pair(quick("a"), slow("b"))
    """)
    status, out, err = run_then_interrupt(
        "run", file, "--no-web", cwd=tmp_path,
        meanwhile=lambda: wait_until(marker.exists, "the slow job never started"))
    assert status == 0, err
    assert "Stopping" in out
    logs = {log.name.split("-")[1]: log.read_text()
            for log in (tmp_path / "var/job").glob("*/*.log")}
    assert "Cancelled: pipeline stopped" in logs["slow"]
    marker.unlink()
    # The quick job's outcome was saved; the cancelled one is run again.
    status, out, _ = run_then_interrupt(
        "run", file, "--once", cwd=tmp_path,
        meanwhile=lambda: wait_until(
            marker.exists, "the cancelled job was not run again after the restart"))
    assert status == 130
    quick_line = next(ln for ln in out.splitlines() if " quick " in f" {ln} ")
    assert quick_line.endswith("(cached)")


def test_hello_reruns_only_the_primitive_when_the_file_changes(tmp_path: Path) -> None:
    watched = write(tmp_path / "in.txt", "one\n")
    summary = tmp_path / "out.summary"
    def summary_ends(text: str) -> None:
        wait_until(lambda: summary.exists() and summary.read_text().endswith(text),
                   f"summary never became {text!r}")

    def edit() -> None:
        summary_ends("ONE\n")
        watched.write_text("two\n")
        summary_ends("TWO\n")

    status, out, err = run_then_interrupt(
        "run", HELLO, "--no-web", "--", watched, "--out", summary, cwd=tmp_path, meanwhile=edit)
    assert status == 0, err
    logs = list((tmp_path / "var" / "job").glob("*/*.log"))
    assert len(logs) == 2, "one job per content of the file"
    assert all("write-summary" in log.name for log in logs)
    assert [ln.split()[0] for ln in out.splitlines() if "write-summary" in ln] == [
        "running", "ok", "running", "ok"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def test_an_idle_watched_pipeline_uses_no_cpu(tmp_path: Path) -> None:
    watched = write(tmp_path / "in.txt", "one\n")
    summary = tmp_path / "in.txt.summary"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", HELLO, "--no-web", "--", watched],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(summary.exists, "the pipeline never wrote the summary")
        before = cpu_seconds(process.pid)
        time.sleep(2)
        used = cpu_seconds(process.pid) - before
    finally:
        process.kill()
        process.wait()
    # Idle means ~0 s (0.00 s here; 1.9 s when the monitor woke itself with its own reads); the
    # bound, 10 % of the 2 s, leaves room for a loaded machine's stray tick or two.
    assert used < 0.2, f"{used:.2f} s of CPU in 2 s of idleness"
