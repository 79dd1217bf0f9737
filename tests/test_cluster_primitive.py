"""The cluster's build primitive in an engine, against the cluster's real processes (a
`pipeline cluster scheduler` and `worker`s building busybox specs with runc on their own
stores; see cluster_fixtures.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cluster_fixtures import Cluster, cluster, sleeping  # noqa: F401 (a fixture)
from test_build_primitive import until

import pipeline as p
from pipeline.jobs import JobState
from pipeline.output import Failed, Ok
from pipeline.primitives.cluster import OP_ID, build, close_clients

POOL = "linux-x86_64"


@pytest.fixture(autouse=True)
async def closing_clients() -> AsyncIterator[None]:
    """The test's clients are closed at its end."""
    yield
    await close_clients()


def shell(command: str) -> str:
    """A busybox spec running the shell `command`."""
    return f'((from busybox) (run (shell "{command}")))'


@asynccontextmanager
async def sleeping_build(cluster: Cluster, worker: str, state: Path  # noqa: F811
                         ) -> AsyncIterator[tuple[p.Engine, int]]:
    """An engine (its state in `state`) building on the new worker `worker` a spec whose step
    sleeps, once the step runs; the pid of its sandboxed `sleep` (found by a duration of its
    own)."""
    await cluster.start_worker(worker, POOL)
    seconds = 100000 + uuid.uuid4().int % 100000
    term = build(shell(f"exec sleep {seconds}"), pool=POOL, cluster=cluster.address)
    async with p.Engine(term, state_dir=state) as engine:
        await until(lambda: bool(sleeping(seconds)), "the build's sandboxed process")
        [pid] = sleeping(seconds)
        yield engine, pid


def job_of(engine: p.Engine) -> p.Job | None:
    return next((job for job in engine.jobs.active() if OP_ID in job.id), None)


def log_of(state: Path) -> str:
    """The build job's log so far ("" before its first line)."""
    logs = list((state / "job").glob(f"*/*-{OP_ID}-*.log"))
    assert len(logs) <= 1
    return logs[0].read_text() if logs else ""


async def test_the_job_waits_queued_then_runs_on_a_worker_and_logs_every_line_in_order(
        tmp_path: Path, cluster: Cluster) -> None:  # noqa: F811
    state = tmp_path / "var"
    term = build(shell("seq 1 20000"), pool=POOL, cluster=cluster.address, cache_hint="hint")
    async with p.Engine(term, state_dir=state) as engine:
        await until(lambda: job_of(engine) is not None, "the job")
        job = job_of(engine)
        assert job is not None
        await until(lambda: "Waiting for a worker of pool linux-x86_64" in log_of(state),
                    "the waiting line")
        assert job.state is JobState.CREATED and job.started is None
        await cluster.start_worker("w1", POOL)
        await engine.wait_idle()
        output = engine.root_output()
    assert isinstance(output, Ok), output
    assert job.started is not None and job.finished is not None
    assert job.created < job.started <= job.finished
    log = log_of(state)
    assert f'---> saved as "{output.value}"' in log
    assert log.index("Waiting for a worker") < log.index("Job started") \
        < log.index("Running on worker w1") < log.index("\n1\n")
    numbers = [line for line in log.splitlines() if line.isdigit()]
    assert numbers == [str(n) for n in range(1, 20001)]


async def test_cancelling_the_job_kills_the_build_on_its_worker(
        tmp_path: Path, cluster: Cluster) -> None:  # noqa: F811
    async with sleeping_build(cluster, "w1", tmp_path / "var") as (engine, pid):
        job = job_of(engine)
        assert job is not None and job.state is JobState.RUNNING
        assert engine.cancel(job.id)
        await until(lambda: not Path(f"/proc/{pid}").exists(), "the process to be killed")
        await engine.wait_idle()
        output = engine.root_output()
    assert isinstance(output, Failed) and output.message == "Cancelled"


async def test_a_worker_killed_mid_build_fails_the_job_and_the_engine_goes_on(
        tmp_path: Path, cluster: Cluster) -> None:  # noqa: F811
    state = tmp_path / "var"
    async with sleeping_build(cluster, "doomed", state) as (engine, _):
        cluster.workers["doomed"].kill()
        await engine.wait_idle()
        output = engine.root_output()
    assert isinstance(output, Failed)
    assert output.message == "WorkerLost: worker doomed was lost during the build"
    assert "Running on worker doomed" in log_of(state)
