"""Several processes on one store, as real `pipeline obuilder` processes on each real store:
concurrent builds sharing steps, start-up cleaning that spares live processes' work and removes
what killed ones left (containers, bundles, mounts), and nothing left mounted at a normal exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from obuilder_fixtures import STORE_FILESYSTEMS, new_store_root

from pipeline.obuilder.stores.overlayfs import OverlayfsStore

ROOT = Path(__file__).resolve().parent.parent
KINDS = sorted(STORE_FILESYSTEMS)
PROCESSES = 20
OUTCOME = re.compile(r'^---> (saved as|using) "([0-9a-f]{64})"', re.MULTILINE)
# Only a guard against a hung test, never a measurement.
HANG_GUARD = 300
STARTED = "42-started"
"""What a step prints once running (its header, which shows the command, does not say it)."""


def obuilder_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "obuilder", *map(str, args)]


def build_argv(spec: Path, store: str, images: Path, context: Path) -> list[str]:
    return obuilder_argv("build", "-f", spec, context, "--store", store, "--image-dir", images)


def mounts_under(root: Path) -> list[str]:
    """Mount points strictly below `root` (the store's own filesystem is not one)."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [point for point in points if point.startswith(prefix)]


def containers(root: Path) -> list[str]:
    listing = subprocess.run(["runc", "--root", str(root / "state" / "sandbox" / "runc"),
                              "list", "-q"], check=True, capture_output=True, text=True)
    return listing.stdout.split()


def leftovers(root: Path) -> dict[str, list[str]]:
    """What a build in progress (or a crashed one) has under `root`, by place."""
    places = {"result-tmp": root / "result-tmp", "cache-tmp": root / "cache-tmp",
              "layer-tmp": root / "layer-tmp", "sandbox": root / "state" / "sandbox"}
    found = {name: sorted(p.name for p in path.iterdir()) if path.exists() else []
             for name, path in places.items()}
    found["sandbox"] = [name for name in found["sandbox"] if name.startswith("bundle-")]
    found["containers"] = containers(root)
    found["mounts"] = mounts_under(root)
    return {name: entries for name, entries in found.items() if entries}


def wait_for_line(process: subprocess.Popen[str], text: str) -> list[str]:
    """Read `process`'s output until a line containing `text`; the lines read."""
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never printed {text!r}: {''.join(lines)}")


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "context"
    directory.mkdir()
    (directory / "data.txt").write_text("data\n")
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_twenty_processes_build_shared_steps_once(
        kind: str, busybox_images: Path, context: Path, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    root = new_store_root(kind, request, tmp_path)
    store = f"{kind}:{root}"
    specs = []
    for n in range(PROCESSES):
        spec = tmp_path / f"build-{n}.spec"
        # Two shared steps (one with a shared cache) that take a while, then one of its own.
        spec.write_text(f"""((from busybox)
 (copy (src data.txt) (dst /data.txt))
 (run (cache (shared (target /cache)))
      (shell "echo shared-run; sleep 0.5; echo x >> /cache/log; cp /data.txt /one"))
 (run (shell "echo own {n}; cat /one > /own")))
""")
        specs.append(spec)
    processes = [subprocess.Popen(build_argv(spec, store, busybox_images, context),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT) for spec in specs]
    outputs = [process.communicate(timeout=HANG_GUARD) for process in processes]
    failures = [(process.returncode, err) for process, (_, err) in zip(processes, outputs,
                                                                       strict=True)
                if process.returncode != 0]
    assert failures == []
    saved: Counter[str] = Counter()
    seen_by: Counter[str] = Counter()
    for out, _ in outputs:
        outcomes = OUTCOME.findall(out)
        assert len(outcomes) == 4, out
        for outcome, id in outcomes:
            seen_by[id] += 1
            saved[id] += outcome == "saved as"
    shared = [id for id, count in seen_by.items() if count == PROCESSES]
    assert len(shared) == 3  # from, copy, the shared run
    assert len(seen_by) == 3 + PROCESSES
    assert all(saved[id] == 1 for id in seen_by), saved
    # The shared step ran once; every other process replayed its log.
    assert sum(out.count("shared-run\n") for out, _ in outputs) == PROCESSES
    assert leftovers(root) == {}, "every process exited normally: nothing is left behind"


@pytest.mark.parametrize("kind", KINDS)
def test_start_up_spares_a_live_build_and_cleans_a_killed_one(
        kind: str, busybox_images: Path, context: Path, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    root = new_store_root(kind, request, tmp_path)
    store = f"{kind}:{root}"
    other_root = new_store_root(kind, request, tmp_path)
    other = f"{kind}:{other_root}"
    slow = tmp_path / "slow.spec"
    slow.write_text('((from busybox) (run (cache (c (target /c))) '
                    '(shell "echo $((6*7))-started; sleep 3; echo finished")))')
    stuck = tmp_path / "stuck.spec"
    stuck.write_text('((from busybox) (run (cache (c (target /c))) '
                     '(shell "echo $((6*7))-started; exec sleep 1000")))')

    # A build killed mid-step in each store: its command keeps running in its container.
    killed = []
    for where in (store, other):
        process = subprocess.Popen(build_argv(stuck, where, busybox_images, context),
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT)
        wait_for_line(process, STARTED)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed.append(process)
    for where in (root, other_root):
        left = leftovers(where)
        assert len(left["containers"]) == 1 and left["sandbox"] and left["result-tmp"]
        assert left["cache-tmp"]
        if kind == "overlayfs":
            assert left["mounts"]

    # A live build, then a start-up (clean) while it runs: the live build is untouched.
    live = subprocess.Popen(build_argv(slow, store, busybox_images, context),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_line(live, STARTED)
    clean = subprocess.run(obuilder_argv("clean", "--store", store), capture_output=True,
                           text=True, timeout=HANG_GUARD, cwd=ROOT)
    assert clean.returncode == 0, clean.stderr
    out, err = live.communicate(timeout=HANG_GUARD)
    assert live.returncode == 0, err
    assert "finished" in out
    # The killed build's container, bundle, build and cache copy (and mounts) are gone ...
    assert leftovers(root) == {}
    # ... and the other store's are not: cleaning is for one store only.
    assert len(leftovers(other_root)["containers"]) == 1
    clean = subprocess.run(obuilder_argv("clean", "--store", other), capture_output=True,
                           text=True, timeout=HANG_GUARD, cwd=ROOT)
    assert clean.returncode == 0, clean.stderr
    assert leftovers(other_root) == {}
    # The step the killed build left can be built again.
    again = subprocess.run(build_argv(slow, store, busybox_images, context),
                           capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT)
    assert again.returncode == 0, again.stderr


async def test_the_last_overlayfs_store_to_close_unmounts_a_view(
        tmpfs_mount: Path) -> None:
    root = Path(tempfile.mkdtemp(dir=tmpfs_mount))
    first, second = OverlayfsStore(root), OverlayfsStore(root)

    async def made(tmp: Path) -> None:
        (tmp / "rootfs").mkdir()
        (tmp / "rootfs" / "f").write_text("f")

    async with first.lock("a"):
        await first.build(None, "a", made)
    for store in (first, second):
        view = await store.result("a")
        assert view is not None and (view / "rootfs" / "f").read_text() == "f"
    assert mounts_under(root) == [str(root.resolve() / "result" / "a" / "rootfs")]
    first.close()
    assert len(mounts_under(root)) == 1, "the second store still holds the view"
    assert (root / "result" / "a" / "rootfs" / "f").read_text() == "f"
    second.close()
    assert mounts_under(root) == []


def test_overlayfs_views_are_unmounted_when_the_process_exits(
        busybox_images: Path, context: Path, tmpfs_mount: Path, tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(dir=tmpfs_mount))
    spec = tmp_path / "build.spec"
    spec.write_text('((build stage ((from busybox) (run (shell "echo made > /made"))))'
                    ' (from busybox) (copy (from (build stage)) (src /made) (dst /made)))')
    for _ in range(2):  # built, then all from cache
        done = subprocess.run(build_argv(spec, f"overlayfs:{root}", busybox_images, context),
                              capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert mounts_under(root) == []
    # A pipeline process too: the engine's builder is never closed by hand.
    pipeline_file = tmp_path / "one_build.py"
    pipeline_file.write_text(f"""
from pipeline.primitives.obuilder import build

def pipeline(args):
    return build({spec.read_text()!r}, store="overlayfs:{root}", image_dir="{busybox_images}")
""")
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", pipeline_file, "--once",
                          "--state-dir", tmp_path / "var"], capture_output=True, text=True,
                         timeout=HANG_GUARD, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert mounts_under(root) == []
    assert os.listdir(root / "result")
