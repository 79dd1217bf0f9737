"""A `pipeline run` killed in the middle of a build step, then started again on the same state
directory: the killed run's container (its runc state and its processes) is killed and deleted
at the restart, whether or not the restarted pipeline builds anything. Real processes, runc and
an rsync store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from obuilder_fixtures import HANG_GUARD

PIPELINE = """\
import pipeline as p
from pipeline.primitives.obuilder import build


def pipeline(args):
    images, token, mode = args
    if mode == "idle":
        # Nothing to build: only the start-up can clean what the killed run left.
        return p.const("idle")
    # Not the last command: the shell stays, with the token in its command line.
    spec = f'((from busybox) (run (shell "echo {token}; sleep 1000; echo done")))'
    return build(spec, image_dir=images)
"""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` for up to HANG_GUARD seconds (a guard against a hang, not a timing)."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def containers(state: Path) -> list[str]:
    """The ids of the containers of the store's runc sandbox (which must exist: an empty list
    must not come from a missing directory)."""
    root = state / "store" / "state" / "sandbox" / "runc"
    assert root.is_dir()
    out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return [entry["id"] for entry in json.loads(out or "null") or []]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, waiting for a parent to reap it, is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def step_pids(token: str) -> list[int]:
    """The live processes of the step (`pipeline run`'s own command line has the token too)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"echo {token}".encode() in cmdline.read_bytes() and alive(int(cmdline.parent.name)):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process has gone
    return pids


def steps_running(state: Path, token: str) -> int:
    """How many build logs show the step's output (its line is the token alone)."""
    return sum(f"{token}\n" in log.read_text()
               for log in (state / "job").glob("*/*-obuilder-build-*.log"))


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """The `pipeline run` processes a test starts: killed, and their containers deleted,
    at the end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()
    root = tmp_path / "var" / "store" / "state" / "sandbox" / "runc"
    for container in containers(tmp_path / "var") if root.is_dir() else []:
        subprocess.run(["runc", "--root", str(root), "delete", "--force", container],
                       capture_output=True)


@pytest.mark.parametrize("mode", ["build", "idle"])
def test_a_killed_runs_container_is_killed_at_the_restart(
        tmp_path: Path, busybox_images: Path, runs: list[subprocess.Popen[str]],
        mode: str) -> None:
    file = tmp_path / "orphan.py"
    file.write_text(textwrap.dedent(PIPELINE))
    state = tmp_path / "var"
    token = f"orphan-{uuid.uuid4().hex}"

    def run(mode: str) -> subprocess.Popen[str]:
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(file), "--no-web", "--state-dir",
             str(state), "--", str(busybox_images), token, mode],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        return runs[-1]

    killed = run("build")
    wait_until(lambda: steps_running(state, token) == 1, "the step running")
    [orphan] = containers(state)
    orphan_pids = step_pids(token)
    assert orphan_pids
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert containers(state) == [orphan] and all(alive(pid) for pid in orphan_pids), \
        "SIGKILL leaves the step running: nothing to test"

    restarted = run(mode)
    wait_until(lambda: orphan not in containers(state), "the orphan container deleted")
    wait_until(lambda: not any(alive(pid) for pid in orphan_pids), "the orphan's processes")
    if mode == "build":
        # The killed build runs again, in a container of its own.
        wait_until(lambda: steps_running(state, token) == 2, "the re-run's step")
        assert len(containers(state)) == 1 and len(step_pids(token)) >= 1
    assert restarted.poll() is None, restarted.stderr.read() if restarted.stderr else ""
    restarted.send_signal(signal.SIGINT)
    assert restarted.wait(timeout=HANG_GUARD) == 0
    assert os.listdir(state / "store" / "state" / "sandbox" / "runc") == []


def test_a_start_up_clean_up_that_fails_is_one_warning(
        tmp_path: Path, busybox_images: Path) -> None:
    file = tmp_path / "orphan.py"
    file.write_text(textwrap.dedent(PIPELINE))
    state = tmp_path / "var"
    store = tmp_path / "broken-store"
    # A store whose sandbox cannot be opened: its runc state directory is a file.
    (store / "state" / "sandbox").mkdir(parents=True)
    (store / "state" / "sandbox" / "runc").write_text("not a directory")
    state.mkdir()
    (state / "obuilder-stores.json").write_text(json.dumps([str(store)]))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(file), "--once", "--state-dir",
         str(state), "--", str(busybox_images), "unused", "idle"],
        cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.splitlines()
    assert warning.startswith("start-up clean-up clean_stores failed: "), warning
    assert str(store / "state" / "sandbox" / "runc") in warning
