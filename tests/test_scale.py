"""The engine at scale: what it holds does not grow with the number of jobs (open files), a
failure while evaluating one node fails that node, never the engine, and the cache's batched
writes still note every job on disk before it runs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pipeline as p
from pipeline.cache.instances import PrimitiveNode
from pipeline.clock import FakeClock
from pipeline.engine import Engine
from pipeline.jobs import Job, JobRegistry
from pipeline.level import Level
from pipeline.output import Failed, Ok
from pipeline.pool import Pool

# Only guards against a hang turning into a stuck test run; no test relies on them for timing.
HANG_GUARD = 10.0
SUBPROCESS_GUARD = 600.0

# Runs an engine on 20,000 jobs whose builds write to their logs in two steps, so that every
# job's log is open at once unless the engine bounds them; prints what it saw as JSON.
_MANY_JOBS = textwrap.dedent("""
    import asyncio, json, os, resource, sys
    from collections import Counter
    import pipeline as p

    @p.builder("step")
    async def step(job, key):
        job.log(f"first half of {key}")
        await asyncio.sleep(0)
        job.log(f"second half of {key}")
        return key.upper()

    async def main(state_dir, count):
        items = p.const([f"item{i}" for i in range(count)])
        root = p.list_map(lambda item: step(item), items, key=lambda item: item)
        most_fds = 0

        def sample():
            nonlocal most_fds
            most_fds = max(most_fds, len(os.listdir("/proc/self/fd")))

        async with p.Engine(root, state_dir=state_dir) as engine:
            engine.on_change(sample)
            engine.jobs.on_change(lambda _job: sample())
            await engine.wait_idle()
            output = engine.root_output()
            states = Counter(str(node.state) for node in engine.nodes())
        print(json.dumps({
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "most_fds": most_fds,
            "root_ok": isinstance(output, p.Ok) and output.value[-1] == f"ITEM{count - 1}",
            "states": states,
        }))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def test_20000_jobs_complete_under_a_limit_of_512_open_files(tmp_path: Path) -> None:
    count = 20_000
    done = subprocess.run(
        ["bash", "-c", 'ulimit -n 512 && exec "$@"', "bash", sys.executable, "-c", _MANY_JOBS,
         str(tmp_path / "state"), str(count)],
        capture_output=True, text=True, timeout=SUBPROCESS_GUARD, check=False)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)
    assert seen["fd_limit"] == 512
    assert seen["root_ok"]
    assert set(seen["states"]) == {"ok"}, seen["states"]
    assert seen["states"]["ok"] > 2 * count, "every item's key and build node are ok"
    assert seen["most_fds"] <= 256
    logs = list((tmp_path / "state" / "job").glob("*/*-step-*.log"))
    assert len(logs) == count
    text = logs[count // 2].read_text()
    assert "first half of item" in text and text.endswith(": Job succeeded\n")


class RegistryOutOfFiles(JobRegistry):
    """The engine's registry, except that a job labelled `broken` cannot be made: as if the
    process had no file descriptor left for it."""

    def create(self, label: str, *, level: Level = Level.AVERAGE, pool: Pool | None = None,
               high_priority: bool = False) -> Job:
        if label == "broken":
            raise OSError(errno.EMFILE, "Too many open files")
        return super().create(label, level=level, pool=pool, high_priority=high_priority)


@p.builder("works")
async def works(job: Job, key: str) -> str:
    job.log(f"building {key}")
    return key.upper()


@p.builder("broken")
async def broken(job: Job, key: str) -> str:
    return key


def builds(engine: Engine) -> list[PrimitiveNode]:
    """The live nodes of the `works` builder, in the order of their keys."""
    nodes = [node for node in engine.nodes()
             if isinstance(node, PrimitiveNode) and node.term.op is works]
    return sorted(nodes, key=lambda node: str(node.key))


async def test_a_job_that_cannot_be_created_fails_its_node_and_the_engine_goes_on(
        tmp_path: Path) -> None:
    names = p.Variable(["a", "b"], label="names")
    built = p.list_map(lambda name: works(name), names)
    cannot = broken("x")
    engine = Engine(p.pair(built, cannot), state_dir=tmp_path)
    engine.jobs = RegistryOutOfFiles(tmp_path / "job", engine.confirmation,
                                     records=engine.cache.db)
    async with engine:
        await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)
        failed = engine.node_for(cannot)
        assert failed is not None
        assert failed.output == Failed("OSError: [Errno 24] Too many open files", failed.uid)
        assert engine.node_for(built).output == Ok(["A", "B"])  # type: ignore[union-attr]
        assert not engine.cache.busy()
        # The engine still evaluates what changes afterwards.
        names.set(["a", "b", "c"])
        await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)
        assert engine.node_for(built).output == Ok(["A", "B", "C"])  # type: ignore[union-attr]


async def test_logs_that_cannot_be_written_fail_their_jobs_and_the_engine_goes_on(
        tmp_path: Path) -> None:
    clock = FakeClock()
    # The day's directory of logs is a file: no log of the day can be created.
    day = tmp_path / "job" / f"{clock.now():%Y-%m-%d}"
    day.parent.mkdir(parents=True)
    day.write_text("not a directory")
    names = p.Variable(["a", "b"], label="names")
    built = p.list_map(lambda name: works(name), names)
    count = names.map(len, label="count")
    async with Engine(p.pair(built, count), state_dir=tmp_path, clock=clock) as engine:
        await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)
        failures = [node.output for node in builds(engine)]
        assert len(failures) == 2
        for output in failures:
            assert isinstance(output, Failed)
            assert output.message.startswith("NotADirectoryError: [Errno 20] Not a directory")
        assert engine.node_for(count).output == Ok(2)  # type: ignore[union-attr]
        assert not engine.cache.busy()
        day.unlink()
        names.set(["a", "b", "c"])
        await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)
        assert builds(engine)[-1].output == Ok("C")
        assert engine.node_for(count).output == Ok(3)  # type: ignore[union-attr]


async def test_every_job_is_noted_unfinished_on_disk_before_its_build_runs(
        tmp_path: Path) -> None:
    seen: dict[str, bool] = {}

    @p.builder("noted")
    async def noted(job: Job, key: str) -> str:
        # Another connection sees only what was committed: what a restart after a kill sees.
        with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as other:
            seen[key] = other.execute("SELECT count(*) FROM unfinished WHERE job_id = ?",
                                      (job.id,)).fetchone() == (1,)
        return key

    names = [f"n{i}" for i in range(50)]
    root = p.list_map(lambda name: noted(name), p.const(names))
    async with Engine(root, state_dir=tmp_path) as engine:
        await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)
        assert engine.root_output() == Ok(names)
    assert seen == dict.fromkeys(names, True)
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM unfinished").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM jobs WHERE op = 'noted'").fetchone() == (50,)
