"""Engine-level behaviour: job actions, teardown of dynamic sub-graphs, counts for metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pipeline as p
from pipeline.output import Ok


class Gates:
    """Builders that wait for the test to let them finish."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []

    def for_key(self, key: str) -> tuple[asyncio.Event, asyncio.Event]:
        return (self.started.setdefault(key, asyncio.Event()),
                self.release.setdefault(key, asyncio.Event()))


def gated_builder(gates: Gates, **options: Any) -> p.BuilderOp[str, str]:
    @p.builder("gated", **options)
    async def gated(job: p.Job, key: str) -> str:
        started, release = gates.for_key(key)
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            gates.cancelled.append(key)
            raise
        return key.upper()

    return gated


async def test_job_actions_follow_the_job(tmp_path: Path) -> None:
    gates = Gates()
    root = gated_builder(gates)("a")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        started, release = gates.for_key("a")
        await started.wait()
        job_id = engine.node_for(root).job_id
        assert engine.job_actions(job_id) == {"cancel"}
        release.set()
        await engine.wait_idle()
        assert engine.job_actions(job_id) == {"rebuild"}
        assert engine.job_actions("2020-01-01/000000-nothing-000000") == set()
        assert engine.rebuild(job_id)
        assert engine.node_for(root).job_id != job_id
        await engine.wait_idle()
        assert engine.root_output() == Ok("A")


async def test_start_now_runs_a_job_waiting_for_confirmation(tmp_path: Path) -> None:
    gates = Gates()
    root = gated_builder(gates, level=p.Level.DANGEROUS)("x")
    gates.for_key("x")[1].set()
    async with p.Engine(root, state_dir=tmp_path, confirm=p.Level.AVERAGE) as engine:
        await engine.wait_idle()
        node = engine.node_for(root)
        assert node.state == "waiting-for-confirmation"
        assert engine.job_actions(node.job_id) == {"cancel", "start-now"}
        assert engine.state_counts()["waiting-for-confirmation"] == 1
        assert engine.start_now(node.job_id)
        await engine.wait_idle()
        assert engine.root_output() == Ok("X")
        assert not engine.start_now(node.job_id), "nothing waits any more"


async def test_cancel_action_is_a_sticky_failure(tmp_path: Path) -> None:
    gates = Gates()
    root = gated_builder(gates)("c")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await gates.for_key("c")[0].wait()
        job_id = engine.node_for(root).job_id
        assert engine.cancel(job_id)
        await engine.wait_idle()
        assert gates.cancelled == ["c"]
        assert engine.node_for(root).state == "failed"
        assert not engine.cancel(job_id), "not running any more"


async def test_bind_teardown_cancels_auto_cancel_jobs(tmp_path: Path) -> None:
    gates = Gates()
    build = gated_builder(gates, auto_cancel=True)
    branch = p.Variable("main", label="branch")
    root = p.bind(lambda name: build(name), branch, label="per-branch")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await gates.for_key("main")[0].wait()
        branch.set("dev")
        await gates.for_key("dev")[0].wait()
        assert gates.cancelled == ["main"], "the torn-down sub-graph's job was cancelled"
        gates.for_key("dev")[1].set()
        await engine.wait_idle()
        assert engine.root_output() == Ok("DEV")


async def test_bind_teardown_without_auto_cancel_lets_the_job_finish(tmp_path: Path) -> None:
    gates = Gates()
    build = gated_builder(gates)
    branch = p.Variable("main", label="branch")
    root = p.bind(lambda name: build(name), branch, label="per-branch")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await gates.for_key("main")[0].wait()
        branch.set("dev")
        await gates.for_key("dev")[0].wait()
        gates.for_key("main")[1].set()
        gates.for_key("dev")[1].set()
        await engine.wait_idle()
        assert gates.cancelled == []
        assert engine.root_output() == Ok("DEV")
        stored = engine.cache.db.latest("gated", p.digest("main"))
        assert stored is not None and stored.ok, "its outcome was stored"


async def test_counts_and_pool_stats(tmp_path: Path) -> None:
    gates = Gates()
    pool = p.Pool("builders", 1)
    build = gated_builder(gates, pool=pool)
    root = p.all(build("a"), build("b"), p.fail("broken").map(str, label="after"))
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await gates.for_key("a")[0].wait()
        await asyncio.sleep(0)
        counts = engine.state_counts()
        assert counts["running"] == 1 and counts["ready"] == 1
        assert counts["failed"] == 1 and counts["blocked"] == 2
        assert engine.pool_stats() == [
            {"name": "builders", "capacity": 1, "in_use": 1, "queue_length": 1}]
        gates.for_key("a")[1].set()
        gates.for_key("b")[1].set()
        await engine.wait_idle()
        assert engine.state_counts()["ok"] == 4, "two keys and two builds"
        assert engine.pool_stats()[0]["in_use"] == 0


async def test_on_change_is_called_after_evaluation(tmp_path: Path) -> None:
    var = p.Variable(1, label="v")
    seen: list[Any] = []
    async with p.Engine(var.map(lambda x: x * 2), state_dir=tmp_path) as engine:
        engine.on_change(lambda: seen.append(engine.root_output()))
        await engine.wait_idle()
        var.set(4)
        await engine.wait_idle()
    assert seen[-1] == Ok(8)
