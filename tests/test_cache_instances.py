"""The live cache (`pipeline.cache.instances.Cache`) without an engine: a small fake of what it
needs from one (`Host`), real jobs and real records in a temporary state directory."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pipeline as p
from pipeline.cache.instances import Cache, Instance
from pipeline.cache.storage import INTERRUPTED, Database
from pipeline.clock import FakeClock
from pipeline.jobs import Confirmation, Job, JobRegistry, JobState
from pipeline.output import Ok
from pipeline.pool import Pool

START = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


class FakeHost:
    """What an engine gives the cache (`pipeline.cache.instances.Host`), recording what the
    cache asks of it."""

    def __init__(self, state_dir: Path, db: Database) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = FakeClock(START)
        self.jobs = JobRegistry(state_dir / "job", Confirmation(), clock=self.clock.now,
                                records=db)
        self.scheduled: list[Any] = []
        self.idle_checks = 0

    def schedule(self, node: Any) -> None:
        self.scheduled.append(node)

    def check_idle(self) -> None:
        self.idle_checks += 1


def open_cache(state_dir: Path) -> tuple[Cache, FakeHost]:
    db = Database(state_dir / "db.sqlite")
    host = FakeHost(state_dir, db)
    cache = Cache(host, db)
    cache.open()
    return cache, host


HANG_GUARD = 10.0
"""Seconds before a wait that should end is reported as a hang."""


async def run_for(instance: Instance, user: Any) -> Job:
    """Give `instance` a user, and wait for the job that starts to be finished and recorded."""
    instance.add_user(user)
    instance.update()
    job = instance.job
    assert job is not None, "a job started"
    # The cache records the outcome in the step that finishes the job.
    await asyncio.wait_for(job.wait_done(), HANG_GUARD)
    assert instance.job is None
    return job


async def test_a_key_runs_once_and_its_outcome_outlives_the_cache(tmp_path: Path) -> None:
    calls: list[str] = []

    @p.builder("shout")
    async def shout(job: Job, key: str) -> str:
        calls.append(key)
        return key.upper()

    cache, host = open_cache(tmp_path)
    instance = cache.instance(shout, "a")
    assert cache.instance(shout, "a") is instance, "one instance per (operation, key)"
    user = object()
    job = await run_for(instance, user)
    assert calls == ["a"]
    assert job.state is JobState.OK
    assert instance.output_for(user) == Ok("A")  # type: ignore[arg-type]
    assert user in host.scheduled, "the user was told"
    stored = cache.db.latest("shout", p.digest("a"))
    assert stored is not None and stored.job_id == job.id and stored.value == '"A"'
    cache.close()

    cache, host = open_cache(tmp_path)
    instance = cache.instance(shout, "a")
    instance.add_user(user)
    instance.update()
    assert instance.job is None, "the stored outcome is used"
    assert instance.output_for(user) == Ok("A")  # type: ignore[arg-type]
    assert calls == ["a"]
    # Asked to rebuild while nobody uses it, the key runs again at its next use.
    instance.remove_user(user)
    assert cache.rebuild(job.id)
    again = await run_for(cache.instance(shout, "a"), user)
    assert again.id != job.id
    assert calls == ["a", "a"]
    cache.close()


async def test_a_run_in_a_pool_of_its_choosing_keeps_the_cache_busy(tmp_path: Path) -> None:
    release = asyncio.Event()
    pool = Pool("chosen", 1)

    @p.builder("wait", config=Pool, starts_job=True)
    async def wait(job: Job, key: str, chosen: Pool) -> str:
        await job.start(pool=chosen)
        await release.wait()
        return key

    cache, host = open_cache(tmp_path)
    assert cache.pools() == []
    instance = cache.instance(wait, "a", pool)
    instance.add_user(object())
    instance.update()
    job = instance.job
    assert job is not None
    running = asyncio.Event()
    job.on_state_change(lambda changed: running.set() if changed.state is JobState.RUNNING
                        else None)
    await asyncio.wait_for(running.wait(), HANG_GUARD)
    assert cache.busy()
    assert cache.pools() == [pool]
    assert pool.in_use == 1
    checks = host.idle_checks
    release.set()
    await asyncio.wait_for(job.wait_done(), HANG_GUARD)
    assert instance.job is None
    assert not cache.busy()
    assert host.idle_checks > checks, "the host was asked to look at idleness again"
    assert pool.in_use == 0
    cache.close()


async def test_a_job_left_unfinished_is_recorded_interrupted_in_its_log_too(
        tmp_path: Path) -> None:
    cache, host = open_cache(tmp_path)
    job = host.jobs.create("shout")
    job.log("half a line")
    cache.db.note_unfinished(job.id, "shout", p.digest("a"), "'a'", None)
    cache.close()  # the process dies: the job is never finished

    cache, host = open_cache(tmp_path)
    stored = cache.db.entry(job.id)
    assert stored is not None
    assert (stored.ok, stored.error, stored.sticky) == (False, INTERRUPTED, False)
    assert job.log_path.read_text().endswith(f"Job failed: {INTERRUPTED}\n")
    cache.close()
    job.finish(INTERRUPTED)  # closes its log, which a dead process would have done
