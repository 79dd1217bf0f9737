"""The cache state machine of builders and publishers, with the real engine and state directory.

Builds are held by `asyncio.Event`s so that a test decides when a job finishes; nothing here
depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Hashable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import pipeline as p
from pipeline.cache.declarations import digest
from pipeline.cache.instances import PrimitiveNode
from pipeline.jobs import Job, JobState
from pipeline.level import Level
from pipeline.output import Active, Failed, Ok
from pipeline.pool import Pool

# Only a guard against a hang turning into a stuck test run; no test relies on it for timing.
HANG_GUARD = 10.0


async def settle(engine: p.Engine) -> None:
    """Wait until the engine is idle (failing, rather than hanging, if it never gets there)."""
    await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)


async def until(condition: Callable[[], bool], what: str, *, steps: int = 10_000) -> None:
    """Let the event loop run, a bounded number of steps, until `condition()` holds."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def wait_event(event: asyncio.Event) -> None:
    """Wait for `event` (failing, rather than hanging, if it is never set)."""
    await asyncio.wait_for(event.wait(), HANG_GUARD)


def node_of(engine: p.Engine, term: p.Term[Any]) -> PrimitiveNode:
    """The live primitive node of `term`."""
    node = engine.node_for(term)
    assert isinstance(node, PrimitiveNode), node
    return node


def job_of(engine: p.Engine, term: p.Term[Any]) -> Job:
    """The job (of this engine's process) behind `term`'s node."""
    job_id = node_of(engine, term).job_id
    assert job_id is not None
    job = engine.jobs.get(job_id)
    assert job is not None, job_id
    return job


class Script:
    """What builders and publishers do, controlled by the test.

    A run of key `k` records the call, logs a line, sets `started[k]`, and (if `k` is held) waits
    for `release(k)`; a cancelled run is recorded in `cancelled`. `fail` holds the keys whose
    next run raises.
    """

    def __init__(self, *, hold: bool = False) -> None:
        self.hold_all = hold
        self.held: set[Hashable] = set()
        self.calls: list[Any] = []
        self.cancelled: list[Any] = []
        self.fail: set[Hashable] = set()
        self.running = 0
        self.max_running = 0
        self._started: dict[Hashable, asyncio.Event] = {}
        self._gates: dict[Hashable, asyncio.Event] = {}

    def started(self, key: Hashable) -> asyncio.Event:
        return self._started.setdefault(key, asyncio.Event())

    def gate(self, key: Hashable) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    def release(self, key: Hashable) -> None:
        self.gate(key).set()

    def rearm(self, key: Hashable) -> None:
        """Make the next run of `key` signal and wait afresh."""
        self._started[key] = asyncio.Event()
        self._gates[key] = asyncio.Event()

    async def run(self, job: Job, key: Hashable, label: Any) -> None:
        self.calls.append(label)
        job.log(f"script running {label!r}")
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            self.started(label).set()
            if self.hold_all or label in self.held:
                try:
                    await self.gate(label).wait()
                except asyncio.CancelledError:
                    self.cancelled.append(label)
                    raise
        finally:
            self.running -= 1
        if label in self.fail:
            raise RuntimeError(f"boom {label}")

    def builder(self, id: str = "build", **options: Any) -> p.BuilderOp[Any, Any]:
        @p.builder(id, **options)
        async def build(job: Job, key: Any) -> Any:
            await self.run(job, key, key)
            return f"{key}!"

        return build

    def publisher(self, id: str = "publish", **options: Any) -> p.PublisherOp[Any]:
        @p.publisher(id, **options)
        async def publish(job: Job, key: Any, value: Any) -> None:
            await self.run(job, key, (key, value))

        return publish


# First run and restart


async def test_first_run_runs_the_job_once_and_logs_it(tmp_path: Path) -> None:
    script = Script()
    term = script.builder()("a")
    root = term.map(lambda v: f"<{v}>")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("<a!>")
        node = node_of(engine, term)
        assert node.state == "ok"
        assert not node.cached
        job = job_of(engine, term)
        assert job.state is JobState.OK
        assert job.log_path == tmp_path / "job" / f"{job.id}.log"
        log = job.log_path.read_text()
        assert "build: 'a'" in log
        assert "script running 'a'" in log
        assert "Job succeeded" in log
        # Evaluating again uses the outcome held in memory.
        engine.schedule(node)
        await settle(engine)
    assert script.calls == ["a"]


async def test_a_job_that_skips_is_logged_and_recorded_as_skipped_with_its_reason(
        tmp_path: Path) -> None:
    @p.builder("lint")
    async def lint(job: Job, key: str) -> str:
        job.skip(f"no linter for {key}")
        return "nothing"

    term = lint("fmt")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("nothing")
        job = job_of(engine, term)
        assert job.skipped == "no linter for fmt"
        log = job.log_path.read_text()
        assert "Skipped: no linter for fmt" in log
        assert "Job skipped: no linter for fmt" in log
        assert "Job succeeded" not in log
        entry = engine.cache.db.entry(job.id)
        assert entry is not None
        assert (entry.ok, entry.skipped) == (True, "no linter for fmt")
        assert entry.queued == job.created


async def test_restart_restores_the_value_without_running(tmp_path: Path) -> None:
    script = Script()
    first = script.builder()("a")
    async with p.Engine(first, state_dir=tmp_path) as engine:
        await settle(engine)
        job_id = node_of(engine, first).job_id

    # A new process: a new term, a new operation object with the same id.
    script2 = Script()
    second = script2.builder()("a")
    async with p.Engine(second, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
        node = node_of(engine, second)
        assert node.state == "ok"
        assert node.cached
        assert node.job_id == job_id
        assert engine.jobs.get(job_id) is None  # not a job of this process
    assert script2.calls == []
    assert script.calls == ["a"]


async def test_restart_with_a_different_key_runs_it(tmp_path: Path) -> None:
    script = Script()
    async with p.Engine(script.builder()("a"), state_dir=tmp_path) as engine:
        await settle(engine)
    term = script.builder()("b")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("b!")
        assert not node_of(engine, term).cached
    assert script.calls == ["a", "b"]


async def test_custom_encoding_restores_the_value_after_a_restart(tmp_path: Path) -> None:
    calls: list[str] = []

    def declare() -> p.BuilderOp[str, bytes]:
        @p.builder("blob", encode=bytes.hex, decode=bytes.fromhex, pp=lambda k: f"key={k}")
        async def blob(job: Job, key: str) -> bytes:
            calls.append(key)
            return key.encode() + b"\x00\xff"

        return blob

    term = declare()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok(b"a\x00\xff")
        assert "blob: key=a" in job_of(engine, term).log_path.read_text()
    async with p.Engine(declare()("a"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok(b"a\x00\xff")
    assert calls == ["a"]


async def test_a_value_that_cannot_be_stored_fails_the_job(tmp_path: Path) -> None:
    @p.builder("opaque")
    async def opaque(job: Job, key: str) -> object:
        return object()

    term = opaque("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        assert isinstance(node.output, Failed)
        assert node.output.message.startswith("TypeError:")
        assert node.state == "failed"
        assert job_of(engine, term).state is JobState.FAILED


# Sticky errors and rebuild


async def test_errors_are_sticky_until_rebuild(tmp_path: Path) -> None:
    script = Script()
    script.fail.add("a")
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("RuntimeError: boom a", node.uid)
        assert node.state == "failed"
        failed_job = job_of(engine, term)
        assert failed_job.error == "RuntimeError: boom a"
        assert "Job failed: RuntimeError: boom a" in failed_job.log_path.read_text()
        engine.schedule(node)
        await settle(engine)
        assert script.calls == ["a"]
        assert isinstance(node.output, Failed)

        script.fail.clear()
        assert engine.cache.rebuild(failed_job.id)
        await settle(engine)
        assert script.calls == ["a", "a"]
        assert engine.root_output() == Ok("a!")
        assert node.job_id != failed_job.id


async def test_errors_stay_sticky_across_a_key_change_and_back(tmp_path: Path) -> None:
    script = Script()
    script.fail.add("a")
    key = p.Variable("a")
    term = script.builder()(key)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert isinstance(engine.root_output(), Failed)
        # A changed key runs anew...
        key.set("b")
        await settle(engine)
        assert engine.root_output() == Ok("b!")
        # ...but the failed key is not retried when wanted again.
        key.set("a")
        await settle(engine)
        assert engine.root_output() == Failed("RuntimeError: boom a", node_of(engine, term).uid)
    assert script.calls == ["a", "b"]


async def test_errors_are_sticky_across_a_restart_until_rebuild(tmp_path: Path) -> None:
    script = Script()
    script.fail.add("a")
    async with p.Engine(script.builder()("a"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert isinstance(engine.root_output(), Failed)

    script.fail.clear()
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("RuntimeError: boom a", node.uid)
        assert node.cached
        assert script.calls == ["a"]
        assert node.job_id is not None
        assert engine.cache.rebuild(node.job_id)
        await settle(engine)
        assert script.calls == ["a", "a"]
        assert engine.root_output() == Ok("a!")
        assert not node.cached


async def test_rebuild_of_a_key_not_in_use_runs_when_next_wanted(tmp_path: Path) -> None:
    script = Script()
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        job_id = node_of(engine, term).job_id
    assert job_id is not None

    # An engine whose pipeline does not use the key: the request is stored.
    async with p.Engine(p.const(1), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.cache.rebuild(job_id)
        assert not engine.cache.rebuild("2020-01-01/000000-build-000000")
    assert script.calls == ["a"]

    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
        assert node_of(engine, term).job_id != job_id
    assert script.calls == ["a", "a"]

    # The rebuild was done: the next start uses the new outcome.
    async with p.Engine(script.builder()("a"), state_dir=tmp_path) as engine:
        await settle(engine)
    assert script.calls == ["a", "a"]


async def test_rebuild_of_an_earlier_job_of_a_key_not_in_use(tmp_path: Path) -> None:
    script = Script()
    key = p.Variable("a")
    term = script.builder()(key)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        first_job = node_of(engine, term).job_id
        assert first_job is not None
        assert engine.cache.rebuild(first_job)
        await settle(engine)
        assert script.calls == ["a", "a"]

        # Nobody wants "a" now; rebuilding its first (not its latest) job still counts.
        key.set("b")
        await settle(engine)
        assert engine.cache.rebuild(first_job)
        await settle(engine)
        assert script.calls == ["a", "a", "b"]
        key.set("a")
        await settle(engine)
        assert script.calls == ["a", "a", "b", "a"]
        assert engine.root_output() == Ok("a!")


async def test_rebuild_of_an_earlier_job_after_a_restart(tmp_path: Path) -> None:
    script = Script()
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        first_job = node_of(engine, term).job_id
        assert first_job is not None
        engine.cache.rebuild(first_job)
        await settle(engine)

    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert script.calls == ["a", "a"]
        assert engine.cache.rebuild(first_job)
        await settle(engine)
        assert script.calls == ["a", "a", "a"]


# Expiry


async def test_valid_for_expiry_reruns_only_once_expired(tmp_path: Path) -> None:
    clock = p.FakeClock()
    script = Script()
    term = script.builder(valid_for=timedelta(hours=1))("a")
    async with p.Engine(term, state_dir=tmp_path, clock=clock) as engine:
        await settle(engine)
        assert script.calls == ["a"]
        first_job = node_of(engine, term).job_id

        clock.advance(timedelta(minutes=59))
        await settle(engine)
        assert script.calls == ["a"]
        assert node_of(engine, term).job_id == first_job

        clock.advance(timedelta(minutes=1))
        await settle(engine)
        assert script.calls == ["a", "a"]
        assert engine.root_output() == Ok("a!")
        second_job = node_of(engine, term).job_id
        assert second_job != first_job

        # The new outcome is valid for an hour from when it was made.
        clock.advance(timedelta(minutes=30))
        await settle(engine)
        assert script.calls == ["a", "a"]
        clock.advance(timedelta(minutes=30))
        await settle(engine)
        assert script.calls == ["a", "a", "a"]


async def test_valid_for_expiry_is_checked_at_restart(tmp_path: Path) -> None:
    clock = p.FakeClock()
    script = Script()
    async with p.Engine(script.builder(valid_for=timedelta(hours=1))("a"),
                        state_dir=tmp_path, clock=clock) as engine:
        await settle(engine)

    clock.advance(timedelta(minutes=30))
    async with p.Engine(script.builder(valid_for=timedelta(hours=1))("a"),
                        state_dir=tmp_path, clock=clock) as engine:
        await settle(engine)
    assert script.calls == ["a"]

    clock.advance(timedelta(minutes=30))
    term = script.builder(valid_for=timedelta(hours=1))("a")
    async with p.Engine(term, state_dir=tmp_path, clock=clock) as engine:
        await settle(engine)
        assert not node_of(engine, term).cached
    assert script.calls == ["a", "a"]


async def test_an_expired_failure_is_retried(tmp_path: Path) -> None:
    clock = p.FakeClock()
    script = Script()
    script.fail.add("a")
    term = script.builder(valid_for=timedelta(hours=1))("a")
    async with p.Engine(term, state_dir=tmp_path, clock=clock) as engine:
        await settle(engine)
        assert isinstance(engine.root_output(), Failed)
        script.fail.clear()
        clock.advance(timedelta(minutes=59))
        await settle(engine)
        assert isinstance(engine.root_output(), Failed)
        clock.advance(timedelta(minutes=1))
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a", "a"]


# Latched


async def test_latched_node_keeps_its_old_value_while_refreshing(tmp_path: Path) -> None:
    script = Script()
    version = {"a": 1}

    @p.builder("versioned", latched=True)
    async def versioned(job: Job, key: str) -> str:
        await script.run(job, key, key)
        return f"{key}{version[key]}"

    term = versioned("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a1")
        node = node_of(engine, term)
        assert node.refreshing is None

        script.held.add("a")
        script.rearm("a")
        version["a"] = 2
        old_job = node.job_id
        assert old_job is not None
        assert engine.cache.rebuild(old_job)
        await wait_event(script.started("a"))
        await until(lambda: node.refreshing == "running", "refreshing is running")
        assert node.output == Ok("a1")
        assert node.state == "ok"
        assert engine.root_output() == Ok("a1")
        assert node.job_id != old_job
        assert job_of(engine, term).state is JobState.RUNNING

        script.release("a")
        await settle(engine)
        assert engine.root_output() == Ok("a2")
        assert node.refreshing is None


async def test_unlatched_node_shows_the_rebuild_running(tmp_path: Path) -> None:
    script = Script()
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        script.held.add("a")
        script.rearm("a")
        assert node.job_id is not None
        engine.cache.rebuild(node.job_id)
        await wait_event(script.started("a"))
        await until(lambda: node.state == "running", "node shows running")
        assert isinstance(node.output, Active)
        assert node.refreshing is None
        script.release("a")
        await settle(engine)
        assert node.output == Ok("a!")


# Auto-cancel


async def test_auto_cancel_cancels_the_job_whose_key_is_no_longer_wanted(tmp_path: Path) -> None:
    script = Script(hold=True)
    key = p.Variable("a")
    term = script.builder(auto_cancel=True)(key)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        job_a = job_of(engine, term)

        key.set("b")
        await wait_event(script.started("b"))
        await until(lambda: job_a.state is JobState.FAILED, "job a finished")
        assert script.cancelled == ["a"]
        assert job_a.error is not None
        assert "Auto-cancelling" in job_a.error
        assert "Auto-cancelling" in job_a.log_path.read_text()

        script.release("b")
        await settle(engine)
        assert engine.root_output() == Ok("b!")

        # An auto-cancelled job is not sticky: wanting its key again runs it again.
        script.rearm("a")
        script.release("a")
        key.set("a")
        await settle(engine)
        assert engine.root_output() == Ok("a!")
        assert script.calls == ["a", "b", "a"]
        assert node_of(engine, term).job_id != job_a.id


async def test_auto_cancel_spares_a_job_another_node_still_wants(tmp_path: Path) -> None:
    script = Script(hold=True)
    op = script.builder(auto_cancel=True)
    one, two = p.Variable("a"), p.Variable("a")
    left, right = op(one), op(two)
    async with p.Engine(p.pair(left, right), state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        job_a = job_of(engine, left)
        one.set("b")
        await wait_event(script.started("b"))
        assert job_a.state is JobState.RUNNING
        assert node_of(engine, right).job_id == job_a.id
        script.release("a")
        script.release("b")
        await settle(engine)
        assert engine.root_output() == Ok(("b!", "a!"))
        assert job_a.state is JobState.OK
    assert script.cancelled == []


async def test_auto_cancelled_job_is_rerun_after_a_restart(tmp_path: Path) -> None:
    script = Script(hold=True)
    key = p.Variable("a")
    async with p.Engine(script.builder(auto_cancel=True)(key), state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        key.set("b")
        script.release("b")
        await settle(engine)
    assert script.cancelled == ["a"]

    script.release("a")
    async with p.Engine(script.builder(auto_cancel=True)("a"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a", "b", "a"]


async def test_without_auto_cancel_the_old_job_runs_to_completion(tmp_path: Path) -> None:
    script = Script(hold=True)
    key = p.Variable("a")
    term = script.builder()(key)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        job_a = job_of(engine, term)

        key.set("b")
        await wait_event(script.started("b"))
        script.release("b")
        await until(lambda: engine.root_output() == Ok("b!"), "b built")
        assert job_a.state is JobState.RUNNING

        # The job nobody wants any more still counts: the engine is idle only once it is done.
        idle = asyncio.create_task(settle(engine))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not idle.done()
        script.release("a")
        await idle
        assert job_a.state is JobState.OK
        assert script.cancelled == []

        # Its outcome was stored, so wanting "a" again runs nothing.
        key.set("a")
        await settle(engine)
        assert engine.root_output() == Ok("a!")
        assert node_of(engine, term).job_id == job_a.id
    assert script.calls == ["a", "b"]


# User cancel


async def test_user_cancel_is_a_sticky_failure_until_rebuild(tmp_path: Path) -> None:
    script = Script(hold=True)
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        job = job_of(engine, term)
        assert engine.cache.cancel(job.id)
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("Cancelled", node.uid)
        assert node.state == "failed"
        assert job.state is JobState.FAILED
        assert job.error == "Cancelled"
        assert script.cancelled == ["a"]
        # Nothing left to cancel.
        assert not engine.cache.cancel(job.id)
        assert not engine.cache.cancel("2020-01-01/000000-build-000000")

        engine.schedule(node)
        await settle(engine)
        assert script.calls == ["a"]
        assert node.output == Failed("Cancelled", node.uid)

    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("Cancelled", node.uid)
        assert script.calls == ["a"]

        script.rearm("a")
        script.release("a")
        assert node.job_id == job.id
        assert engine.cache.rebuild(job.id)
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a", "a"]


async def test_user_cancel_wins_over_a_build_that_swallows_the_cancellation(
    tmp_path: Path,
) -> None:
    started, never = asyncio.Event(), asyncio.Event()

    @p.builder("stubborn")
    async def stubborn(job: Job, key: str) -> str:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            return "partial"
        return "full"

    term = stubborn("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(started)
        assert engine.cache.cancel(job_of(engine, term).id)
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("Cancelled", node.uid)


async def test_user_cancel_of_a_job_waiting_for_confirmation(tmp_path: Path) -> None:
    script = Script()
    term = script.builder(level=Level.DANGEROUS)("a")
    async with p.Engine(term, state_dir=tmp_path, confirm=Level.AVERAGE) as engine:
        await settle(engine)
        job = job_of(engine, term)
        assert job.state is JobState.WAITING_FOR_CONFIRMATION
        assert engine.cache.cancel(job.id)
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("Cancelled", node.uid)
    assert script.calls == []


# Sharing


async def test_two_nodes_with_the_same_op_and_key_share_one_job(tmp_path: Path) -> None:
    script = Script(hold=True)
    op = script.builder()
    left, right = op("a", label="left"), op("a", label="right")
    other = op("b")
    async with p.Engine(p.all(left, right, other), state_dir=tmp_path) as engine:
        await wait_event(script.started("a"))
        await wait_event(script.started("b"))
        assert node_of(engine, left) is not node_of(engine, right)
        assert node_of(engine, left).job_id == node_of(engine, right).job_id
        assert node_of(engine, left).job_id != node_of(engine, other).job_id
        script.release("a")
        script.release("b")
        await settle(engine)
        assert engine.root_output() == Ok(["a!", "a!", "b!"])
    assert sorted(script.calls) == ["a", "b"]


async def test_different_operations_do_not_share_a_key(tmp_path: Path) -> None:
    script = Script()
    one, two = script.builder("one")("a"), script.builder("two")("a")
    async with p.Engine(p.pair(one, two), state_dir=tmp_path) as engine:
        await settle(engine)
        assert node_of(engine, one).job_id != node_of(engine, two).job_id
    assert script.calls == ["a", "a"]


# Publishers


async def test_publisher_publishes_once_per_value(tmp_path: Path) -> None:
    script = Script()
    value = p.Variable("pending")
    term = script.publisher("status")("commit1", value)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok(None)
        assert script.calls == [("commit1", "pending")]
        first_job = node_of(engine, term).job_id

        # The same value again publishes nothing.
        engine.schedule(node_of(engine, term))
        await settle(engine)
        assert script.calls == [("commit1", "pending")]

        value.set("success")
        await settle(engine)
        assert engine.root_output() == Ok(None)
        assert script.calls == [("commit1", "pending"), ("commit1", "success")]
        second_job = node_of(engine, term).job_id
        assert second_job != first_job

        # The value is not part of the key: both runs are stored under the key's digest.
        history = engine.cache.db.history("status", digest("commit1"))
        assert [entry.job_id for entry in history] == [second_job, first_job]

        # Going back to an earlier value publishes it again: it is not what is published now.
        value.set("pending")
        await settle(engine)
        assert script.calls[-1] == ("commit1", "pending")
        assert len(script.calls) == 3

    # After a restart, the value last published is not published again...
    term = script.publisher("status")("commit1", "pending")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok(None)
        assert node_of(engine, term).cached
    assert len(script.calls) == 3

    # ...but a different one is.
    async with p.Engine(script.publisher("status")("commit1", "failure"),
                        state_dir=tmp_path) as engine:
        await settle(engine)
    assert script.calls[-1] == ("commit1", "failure")
    assert len(script.calls) == 4


async def test_publisher_waits_for_its_value(tmp_path: Path) -> None:
    script = Script()
    value = p.Variable(unset=True)
    term = script.publisher()("k", value)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert isinstance(engine.root_output(), Failed)
        assert script.calls == []
        value.set(1)
        await settle(engine)
        assert engine.root_output() == Ok(None)
    assert script.calls == [("k", 1)]


async def test_publisher_failure_is_sticky_for_that_value(tmp_path: Path) -> None:
    script = Script()
    script.fail.add(("k", 1))
    value = p.Variable(1)
    term = script.publisher()("k", value)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        node = node_of(engine, term)
        assert node.output == Failed("RuntimeError: boom ('k', 1)", node.uid)
        engine.schedule(node)
        await settle(engine)
        assert script.calls == [("k", 1)]
        value.set(2)
        await settle(engine)
        assert engine.root_output() == Ok(None)
    assert script.calls == [("k", 1), ("k", 2)]


async def test_publisher_auto_cancel_cancels_a_publish_of_an_old_value(tmp_path: Path) -> None:
    script = Script(hold=True)
    value = p.Variable(1)
    term = script.publisher(auto_cancel=True)("k", value)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(script.started(("k", 1)))
        job_1 = job_of(engine, term)
        value.set(2)
        await wait_event(script.started(("k", 2)))
        assert script.cancelled == [("k", 1)]
        assert job_1.state is JobState.FAILED
        assert job_1.error is not None
        assert "Auto-cancelling" in job_1.error
        script.release(("k", 2))
        await settle(engine)
        assert engine.root_output() == Ok(None)
    assert script.calls == [("k", 1), ("k", 2)]


async def test_publisher_without_auto_cancel_finishes_then_publishes_the_new_value(
    tmp_path: Path,
) -> None:
    script = Script(hold=True)
    value = p.Variable(1)
    term = script.publisher()("k", value)
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await wait_event(script.started(("k", 1)))
        job_1 = job_of(engine, term)
        value.set(2)
        for _ in range(20):
            await asyncio.sleep(0)
        assert script.calls == [("k", 1)]  # one publish at a time per key
        script.release(("k", 1))
        await wait_event(script.started(("k", 2)))
        assert job_1.state is JobState.OK
        script.release(("k", 2))
        await settle(engine)
        assert engine.root_output() == Ok(None)
    assert script.cancelled == []
    assert script.calls == [("k", 1), ("k", 2)]


# Pools


async def test_pool_runs_jobs_one_at_a_time(tmp_path: Path) -> None:
    script = Script(hold=True)
    pool = Pool("one", 1)
    op = script.builder(pool=pool)
    terms = {k: op(k) for k in "abc"}
    async with p.Engine(p.all(*terms.values()), state_dir=tmp_path) as engine:
        done: list[str] = []
        for _ in terms:
            await until(lambda: script.running == 1, "a job running")
            running = [k for k in terms if k not in done and script.started(k).is_set()]
            assert len(running) == 1
            waiting = [k for k in terms if k not in done and k not in running]
            for k in waiting:
                assert node_of(engine, terms[k]).state == "ready"
                assert job_of(engine, terms[k]).state is JobState.READY
            assert pool.in_use == 1
            assert pool.queue_length == len(waiting)
            await until(lambda r=running[0]: node_of(engine, terms[r]).state == "running",
                        "the node shows its job running")
            script.release(running[0])
            done.append(running[0])
            await until(lambda d=running[0]: node_of(engine, terms[d]).state == "ok",
                        "the released job finished")
        await settle(engine)
        assert engine.root_output() == Ok(["a!", "b!", "c!"])
    assert script.max_running == 1
    assert pool.in_use == 0


async def test_pool_serves_new_keys_before_rebuilds(tmp_path: Path) -> None:
    script = Script()
    pool = Pool("one", 1)
    op = script.builder(pool=pool)
    slot_a, slot_b = p.Variable("b"), p.Variable("b")
    b_term = op("b")
    async with p.Engine(p.all(b_term, op(slot_a), op(slot_b)), state_dir=tmp_path) as engine:
        await settle(engine)
        assert script.calls == ["b"]
        b_job = node_of(engine, b_term).job_id
        assert b_job is not None

        # "a" (new) takes the only slot and holds it.
        script.held.update({"a", "b", "c"})
        slot_a.set("a")
        await wait_event(script.started("a"))

        # A rebuild of "b" (which has an outcome) queues first...
        script.rearm("b")
        assert engine.cache.rebuild(b_job)
        await until(lambda: pool.queue_length == 1, "rebuild of b queued")
        # ...then "c", which has none, queues behind it but is served first.
        slot_b.set("c")
        await until(lambda: pool.queue_length == 2, "c queued")

        script.release("a")
        await wait_event(script.started("c"))
        assert not script.started("b").is_set()
        assert job_of(engine, b_term).state is JobState.READY
        script.release("c")
        await wait_event(script.started("b"))
        script.release("b")
        await settle(engine)
        assert engine.root_output() == Ok(["b!", "a!", "c!"])
    assert script.calls == ["b", "a", "c", "b"]
    assert script.max_running == 1


async def test_job_cancelled_while_queued_frees_nothing(tmp_path: Path) -> None:
    script = Script(hold=True)
    pool = Pool("one", 1)
    op = script.builder(pool=pool)
    third = p.Variable("a")
    a_term, b_term, c_term = op("a"), op("b"), op(third)
    async with p.Engine(p.all(a_term, b_term, c_term), state_dir=tmp_path) as engine:
        await until(lambda: script.running == 1 and pool.queue_length == 1, "a runs, b queued")
        running = "a" if script.started("a").is_set() else "b"
        queued = "b" if running == "a" else "a"
        queued_term = b_term if queued == "b" else a_term
        queued_job = job_of(engine, queued_term)
        assert queued_job.state is JobState.READY

        assert engine.cache.cancel(queued_job.id)
        await until(lambda: queued_job.state is JobState.FAILED, "queued job cancelled")
        node = node_of(engine, queued_term)
        await until(lambda: node.output == Failed("Cancelled", node.uid), "node shows Cancelled")
        assert pool.in_use == 1
        assert pool.queue_length == 0

        # The running job still holds the only slot: a new job waits for it.
        third.set("c")
        await until(lambda: pool.queue_length == 1, "c queued")
        assert not script.started("c").is_set()
        script.release(running)
        await wait_event(script.started("c"))
        script.release("c")
        await settle(engine)
        assert node.output == Failed("Cancelled", node.uid)
        assert node_of(engine, c_term).output == Ok("c!")
    assert queued not in script.calls
    assert script.max_running == 1
    assert pool.in_use == 0


@dataclasses.dataclass(frozen=True)
class RunIn:
    """A config choosing the pool and level of each run (not part of the key)."""

    pool: Pool | None
    level: Level = Level.AVERAGE


def run_in_builder(script: Script, id: str = "build-in") -> p.BuilderOp[Any, Any]:
    """A builder that starts its own job in its config's pool, at its config's level."""

    @p.builder(id, config=RunIn, starts_job=True)
    async def build(job: Job, key: Any, config: RunIn) -> Any:
        await job.start(pool=config.pool, level=config.level)
        await script.run(job, key, key)
        return f"{key}!"

    return build


async def test_one_operation_runs_its_jobs_in_the_pool_each_run_chooses(tmp_path: Path) -> None:
    script = Script(hold=True)
    left, right = Pool("left", 1), Pool("right", 1)
    op = run_in_builder(script)
    terms = {"a": op("a", config=RunIn(left)), "b": op("b", config=RunIn(left)),
             "c": op("c", config=RunIn(right))}
    async with p.Engine(p.all(*terms.values()), state_dir=tmp_path) as engine:
        # One slot each: "c" runs beside whichever of "a" and "b" got the left slot.
        await until(lambda: script.running == 2, "one job running in each pool")
        assert script.started("c").is_set()
        first = "a" if script.started("a").is_set() else "b"
        second = "b" if first == "a" else "a"
        assert job_of(engine, terms[first]).pool is left
        assert job_of(engine, terms["c"]).pool is right
        waiting = job_of(engine, terms[second])
        assert waiting.state is JobState.READY and waiting.pool is left
        assert node_of(engine, terms[second]).state == "ready"
        assert (left.in_use, left.queue_length, right.in_use, right.queue_length) == (1, 1, 1, 0)
        assert sorted(stats["name"] for stats in engine.pool_stats()) == ["left", "right"]
        for key in (first, "c", second):
            script.release(key)
        await settle(engine)
        assert engine.root_output() == Ok(["a!", "b!", "c!"])
    assert left.in_use == right.in_use == 0


async def test_a_run_that_starts_its_job_chooses_its_level(tmp_path: Path) -> None:
    script = Script()
    op = run_in_builder(script)
    deploy = op("prod", config=RunIn(None, Level.DANGEROUS))
    lint = op("src", config=RunIn(None, Level.HARMLESS))
    async with p.Engine(p.pair(deploy, lint), state_dir=tmp_path,
                        confirm=Level.AVERAGE) as engine:
        await settle(engine)
        assert node_of(engine, deploy).state == "waiting-for-confirmation"
        assert job_of(engine, deploy).level is Level.DANGEROUS
        assert script.calls == ["src"]
        job_of(engine, deploy).approve()
        await settle(engine)
        assert engine.root_output() == Ok(("prod!", "src!"))


async def test_a_config_reaches_the_run_but_is_not_part_of_the_key(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    @p.builder("greet", config=str)
    async def greet(job: Job, key: str, greeting: str) -> str:
        seen.append((key, greeting))
        return f"{greeting}, {key}"

    async with p.Engine(greet("world", config="hello"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("hello, world")
    assert seen == [("world", "hello")]
    # Another config for the same key finds the stored outcome: nothing runs again.
    async with p.Engine(greet("world", config="bonjour"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("hello, world")
    assert seen == [("world", "hello")]
    # An operation that reads its config into its digest makes it part of the key.

    @p.builder("greet-keyed", config=str, key_digest=lambda key, greeting: digest([greeting, key]))
    async def greet_keyed(job: Job, key: str, greeting: str) -> str:
        seen.append((key, greeting))
        return f"{greeting}, {key}"

    terms = p.pair(greet_keyed("world", config="hello"), greet_keyed("world", config="bonjour"))
    async with p.Engine(terms, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok(("hello, world", "bonjour, world"))
    assert sorted(seen[1:]) == [("world", "bonjour"), ("world", "hello")]


def test_a_config_is_checked_when_the_operation_is_applied() -> None:
    script = Script()
    with pytest.raises(TypeError, match="operation build-in needs a RunIn config, not NoneType"):
        run_in_builder(script)("a")
    with pytest.raises(TypeError, match="operation build takes no config"):
        script.builder()("a", config=RunIn(None))


# Confirmation


async def test_jobs_at_the_confirmation_level_wait_for_a_person(tmp_path: Path) -> None:
    script = Script()
    deploy = script.builder("deploy", level=Level.DANGEROUS)("prod")
    lint = script.builder("lint", level=Level.HARMLESS)("src")
    async with p.Engine(p.pair(deploy, lint), state_dir=tmp_path,
                        confirm=Level.AVERAGE) as engine:
        # Waiting jobs do not keep the engine busy.
        await settle(engine)
        node = node_of(engine, deploy)
        assert node.state == "waiting-for-confirmation"
        assert node_of(engine, lint).state == "ok"
        assert script.calls == ["src"]
        job = job_of(engine, deploy)
        assert job.state is JobState.WAITING_FOR_CONFIRMATION
        assert "start-now" in job.actions()

        job.approve()
        await settle(engine)
        assert node.state == "ok"
        assert engine.root_output() == Ok(("prod!", "src!"))
    assert script.calls == ["src", "prod"]


async def test_jobs_below_the_confirmation_level_do_not_wait(tmp_path: Path) -> None:
    script = Script()
    term = script.builder(level=Level.MOSTLY_HARMLESS)("a")
    async with p.Engine(term, state_dir=tmp_path, confirm=Level.AVERAGE) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a"]


# Stopping


async def test_engine_stop_cancels_running_jobs_without_a_sticky_failure(tmp_path: Path) -> None:
    script = Script(hold=True)
    term = script.builder()("a")
    engine = p.Engine(term, state_dir=tmp_path)
    await engine.start()
    await wait_event(script.started("a"))
    job = job_of(engine, term)
    await asyncio.wait_for(engine.stop(), HANG_GUARD)
    assert script.cancelled == ["a"]
    assert job.state is JobState.FAILED
    assert job.error == "Engine stopped"
    # Nothing was started again while stopping.
    assert engine.jobs.active() == []
    assert script.calls == ["a"]

    script.rearm("a")
    script.release("a")
    term = script.builder()("a")
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a", "a"]


@pytest.mark.parametrize("auto_cancel", [False, True])
async def test_engine_stop_with_a_job_waiting_for_confirmation(
    tmp_path: Path, auto_cancel: bool
) -> None:
    script = Script()
    term = script.builder(level=Level.DANGEROUS, auto_cancel=auto_cancel)("a")
    async with p.Engine(term, state_dir=tmp_path, confirm=Level.AVERAGE) as engine:
        await settle(engine)
        job = job_of(engine, term)
    assert job.state is JobState.FAILED
    assert engine.jobs.active() == []

    async with p.Engine(script.builder()("a"), state_dir=tmp_path) as engine:
        await settle(engine)
        assert engine.root_output() == Ok("a!")
    assert script.calls == ["a"]
