"""The `pipeline` command, run as a real process: exit codes, messages, Ctrl-C, the example."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
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
    assert not (tmp_path / "var").exists(), "a mistyped file name leaves no state directory"


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


def one_line_usage_error(result: subprocess.CompletedProcess[str], says: str) -> None:
    """The command failed with exit status 2 and exactly one line on stderr saying `says`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


MARKER_PIPELINE = """
    from pathlib import Path
    import pipeline as p

    @p.builder("mark")
    async def mark(job, key):
        Path("ran").write_text("a job ran")
        return key

    def pipeline(args):
        return mark("x")
"""


@pytest.mark.parametrize(("args", "says"), [
    (["--port", "99999"], "'99999' is not a port number (0 to 65535)"),
    (["--port", "-1"], "'-1' is not a port number (0 to 65535)"),
    (["--port", "eighty"], "'eighty' is not a port number (0 to 65535)"),
    (["--state-dir", "a-file"], "--state-dir a-file: not a directory"),
    (["--state-dir", "a-file/state"], "--state-dir a-file/state: cannot write there: Not a dir"),
])
def test_bad_run_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                  says: str) -> None:
    file = write(tmp_path / "mark.py", MARKER_PIPELINE)
    (tmp_path / "a-file").write_text("not a directory")
    one_line_usage_error(pipeline_cmd("run", file, "--once", *args, cwd=tmp_path), says)
    assert not (tmp_path / "ran").exists()


def test_unwritable_state_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # We run as root, whom permission bits do not stop: a read-only file system does.
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", read_only], check=True)
    try:
        file = write(tmp_path / "mark.py", MARKER_PIPELINE)
        for state in (read_only, read_only / "state"):
            result = pipeline_cmd("run", file, "--once", "--state-dir", state, cwd=tmp_path)
            one_line_usage_error(result, f"--state-dir {state}: cannot write there: Read-only")
    finally:
        subprocess.run(["umount", read_only], check=True)
    assert not (tmp_path / "ran").exists()


def make_foreign_db(path: Path, create: str) -> None:
    db = sqlite3.connect(path)
    db.execute(create)
    db.commit()
    db.close()


@pytest.mark.parametrize(("make", "says"), [
    pytest.param(lambda path: path.write_bytes(b"my notes, not a database\n" * 100),
                 "db.sqlite: not a pipeline state database (file is not a database)",
                 id="not-a-database"),
    pytest.param(lambda path: make_foreign_db(path, "CREATE TABLE songs (title TEXT)"),
                 "db.sqlite: not a pipeline state database (it has tables songs and no table "
                 "jobs)", id="no-jobs-table"),
    pytest.param(lambda path: make_foreign_db(path, "CREATE TABLE jobs (id INTEGER, title TEXT)"),
                 "db.sqlite: not a pipeline state database (its table jobs lacks the columns "
                 "finished, job_id, key, key_pp, ok, op, outcome, rebuild, started, sticky, "
                 "value_digest)", id="other-jobs-table"),
])
def test_a_foreign_db_sqlite_is_named_and_left_alone(tmp_path: Path, make: Callable[[Path], None],
                                                    says: str) -> None:
    file = write(tmp_path / "mark.py", MARKER_PIPELINE)
    db = tmp_path / "var" / "db.sqlite"
    db.parent.mkdir()
    make(db)
    before = db.read_bytes()
    one_line_usage_error(pipeline_cmd("run", file, "--once", cwd=tmp_path), says)
    assert db.read_bytes() == before, "the file must be left as it was"
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(("source", "args", "says"), [
    pytest.param("import sys\nsys.exit(3)\n", ["--once"],
                 "exits.py:2: called sys.exit(3) while loading", id="sys-exit-at-import"),
    pytest.param("import sys\ndef pipeline(args):\n    sys.exit('bye')\n", ["--once"],
                 "exits.py:3: called sys.exit('bye') while loading", id="sys-exit-in-pipeline"),
    pytest.param("import pipeline as p\nweb_links = 5\ndef pipeline(args):\n"
                 "    return p.const(1)\n", ["--once", "--port", "0"],
                 "exits.py: web_links must be a list of (URL, label) pairs, not 5",
                 id="web-links-5"),
    pytest.param("import pipeline as p\nweb_links = [('/a', 'A', 'extra')]\n"
                 "def pipeline(args):\n    return p.const(1)\n", ["--port", "0"],
                 "web_links must be a list of (URL, label) pairs", id="web-links-triple"),
])
def test_bad_pipeline_files_are_one_line_and_exit_2(tmp_path: Path, source: str, args: list[str],
                                                     says: str) -> None:
    file = tmp_path / "exits.py"
    file.write_text(source)
    one_line_usage_error(pipeline_cmd("run", file, *args, cwd=tmp_path), says)


@pytest.mark.parametrize(("args", "says"), [
    (["-o", "nodir/x.svg"], "nodir/x.svg: cannot write: No such file or directory"),
    (["-o", "nodir/x.dot"], "nodir/x.dot: cannot write: No such file or directory"),
    (["--expand", "garbage"], "--expand garbage: no such group (groups: none)"),
])
def test_bad_diagram_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                      says: str) -> None:
    watched = write(tmp_path / "in.txt", "x")
    result = pipeline_cmd("diagram", HELLO, *args, "--", watched, cwd=tmp_path)
    one_line_usage_error(result, says)


def test_diagram_expand_names_the_groups(tmp_path: Path) -> None:
    file = write(tmp_path / "grouped.py", """
        import pipeline as p

        def pipeline(args):
            one = p.collapse("lib", "one", input=p.const(1),
                             output=p.const(1).map(str, label="inside"))
            return p.pair(one, p.const(2))
    """)
    bad = pipeline_cmd("diagram", file, "--expand", "lib=two", cwd=tmp_path)
    one_line_usage_error(bad, "--expand lib=two: no such group (groups: lib=one)")
    good = pipeline_cmd("diagram", file, "--expand", "lib=one", cwd=tmp_path)
    assert good.returncode == 0 and "inside" in good.stdout


def test_a_port_in_use_stops_the_run_before_any_job(tmp_path: Path) -> None:
    file = write(tmp_path / "mark.py", MARKER_PIPELINE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = pipeline_cmd("run", file, "--once", "--port", port, cwd=tmp_path)
    one_line_usage_error(result, f"cannot serve the web UI on 127.0.0.1:{port}")
    assert not (tmp_path / "ran").exists(), "a job ran before the port was found taken"


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


def checkout_pipeline(tmp_path: Path, name: str) -> Path:
    """A pipeline file whose one job checks out a commit of a real repository, writes the
    checkout's directory to NAME.dir and, while the file NAME.block exists, sleeps in it."""
    repo = tmp_path / "repo"
    if not repo.exists():
        repo.mkdir()
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
        (repo / "README").write_text("hello\n")
        for git_args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
            subprocess.run(["git", "-C", repo, *git_args], env=env, check=True)
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    return write(tmp_path / f"{name}.py", f"""
        import asyncio
        from pathlib import Path
        import pipeline as p
        from pipeline.primitives import git

        @p.builder("build")
        async def build(job, key):
            async with git.checkout(git.Commit({str(repo)!r}, {head!r}, "HEAD")) as src:
                Path({str(tmp_path / f"{name}.dir")!r}).write_text(str(src.parent))
                while Path({str(tmp_path / f"{name}.block")!r}).exists():
                    await asyncio.sleep(0.05)
            return key

        def pipeline(args):
            return build({name!r})
    """)


def start_blocked_in_checkout(tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    """`pipeline run` of `checkout_pipeline(NAME)` with state dir NAME-state, once its job is
    blocked in the checkout."""
    file = checkout_pipeline(tmp_path, name)
    (tmp_path / f"{name}.block").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", file, "--no-web", "--state-dir", f"{name}-state"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until((tmp_path / f"{name}.dir").exists, f"{name}: the build never checked out")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def test_restart_after_sigkill_removes_the_checkout_and_marks_the_job_interrupted(
        tmp_path: Path) -> None:
    process = start_blocked_in_checkout(tmp_path, "killed")
    process.kill()
    process.wait()
    checkout_dir = tmp_path / "killed.dir"
    leftover = Path(checkout_dir.read_text())
    assert leftover.is_dir(), "SIGKILL leaves the checkout behind"
    [log] = (tmp_path / "killed-state" / "job").glob("*/*-build-*.log")
    job_id = f"{log.parent.name}/{log.stem}"

    (tmp_path / "killed.block").unlink()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", tmp_path / "killed.py", "--port", "0",
         "--state-dir", "killed-state"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().removeprefix("Web UI: ").strip()
        assert url.startswith("http://"), url
        # The killed job's key is run again, and that run's checkout removes the leftover.
        wait_until(lambda: Path(checkout_dir.read_text()) != leftover, "no new checkout")
        assert not leftover.exists()
        with urllib.request.urlopen(f"{url}job/{job_id}") as response:
            page = response.read().decode()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert '<span id="job-state" class="state state-failed">failed</span>' in page
    assert '<div id="job-error-row"><dt>Error</dt><dd id="job-error">interrupted (the process' \
        ' stopped)</dd></div>' in page
    assert '<div id="job-skipped-row" hidden>' in page
    assert f"{job_id}</a> " in page and "(this job)" in page, "the history lists the job"
    assert log.read_text().endswith(": Job failed: interrupted (the process stopped)\n")


def test_a_checkout_removes_the_leftovers_of_dead_pipelines_only(tmp_path: Path) -> None:
    dead = start_blocked_in_checkout(tmp_path, "dead")
    dead.kill()
    dead.wait()
    process = start_blocked_in_checkout(tmp_path, "live")
    try:
        # Another pipeline, with its own state directory, checks out: the dead pipeline's
        # leftover goes, the live one's checkout stays.
        other = checkout_pipeline(tmp_path, "other")
        result = pipeline_cmd("run", other, "--once", "--state-dir", "other-state", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not Path((tmp_path / "dead.dir").read_text()).exists()
        assert Path((tmp_path / "live.dir").read_text()).is_dir()
        assert not Path((tmp_path / "other.dir").read_text()).exists()
    finally:
        (tmp_path / "live.block").unlink()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


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
