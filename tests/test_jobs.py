"""Jobs: ids and log files, log following, confirmation, pools, cancellation, finishing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.jobs import (
    Confirmation,
    Job,
    JobCancelled,
    JobRegistry,
    JobState,
    follow_log,
)
from pipeline.level import Level
from pipeline.pool import Pool

JOB_ID = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}/[0-9]{6}-[A-Za-z0-9_.-]{1,40}-[0-9a-f]{6}")
FIXED_TIME = datetime(2026, 11, 27, 17, 36, 1, tzinfo=UTC)


def fixed_clock() -> datetime:
    """A clock stopped at FIXED_TIME, so ids and log lines are predictable."""
    return FIXED_TIME


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    """The directory the registry keeps logs in, as `var/job` would be."""
    return tmp_path / "var" / "job"


@pytest.fixture
def registry(jobs_dir: Path) -> JobRegistry:
    """A registry with no confirmation threshold."""
    return JobRegistry(jobs_dir, Confirmation())


def state_reached(job: Job, state: JobState) -> asyncio.Event:
    """An event set as soon as `job` enters `state`."""
    reached = asyncio.Event()

    def check(changed: Job) -> None:
        if changed.state is state:
            reached.set()

    job.on_state_change(check)
    return reached


async def next_chunk_containing(follower: AsyncIterator[bytes], text: bytes) -> bytes:
    """Read from `follower` until `text` has been seen; return everything read."""
    seen = b""
    while text not in seen:
        seen += await anext(follower)
    return seen


# Levels


def test_levels_are_ordered() -> None:
    assert (
        Level.HARMLESS
        < Level.MOSTLY_HARMLESS
        < Level.AVERAGE
        < Level.ABOVE_AVERAGE
        < Level.DANGEROUS
    )


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("harmless", Level.HARMLESS),
        ("mostly-harmless", Level.MOSTLY_HARMLESS),
        ("MOSTLY_HARMLESS", Level.MOSTLY_HARMLESS),
        ("Above-Average", Level.ABOVE_AVERAGE),
        ("dangerous", Level.DANGEROUS),
    ],
)
def test_level_parse(text: str, level: Level) -> None:
    assert Level.parse(text) is level


def test_level_names_round_trip() -> None:
    assert str(Level.MOSTLY_HARMLESS) == "mostly-harmless"
    assert f"{Level.ABOVE_AVERAGE}" == "above-average"
    for level in Level:
        assert Level.parse(str(level)) is level


def test_level_parse_rejects_unknown_names_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="harmless, mostly-harmless, average") as info:
        Level.parse("risky")
    assert "'risky'" in str(info.value)


# Ids and logs


def test_job_id_format_and_log_path(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    job = registry.create("build")
    assert JOB_ID.fullmatch(job.id)
    assert re.fullmatch(r"2026-11-27/173601-build-[0-9a-f]{6}", job.id)
    assert job.log_path == jobs_dir / "2026-11-27" / f"{job.id.split('/')[1]}.log"
    assert not job.log_path.parent.exists(), "no log, nor its day's directory, before a write"
    job.log("hello")
    assert job.log_path.is_file()
    assert job.created == FIXED_TIME
    assert job.state is JobState.CREATED
    assert job.started is None
    assert job.finished is None
    assert job.error is None
    assert job.level is Level.AVERAGE
    assert registry.log_path(job.id) == job.log_path
    job.finish()


def test_default_clock_is_utc(registry: JobRegistry) -> None:
    job = registry.create("build")
    assert job.created.tzinfo is not None
    assert job.created.utcoffset() == timedelta(0)
    assert job.id.startswith(job.created.strftime("%Y-%m-%d/%H%M%S-build-"))
    job.finish()


def test_label_is_sanitised_and_truncated(registry: JobRegistry) -> None:
    job = registry.create("docker build ocaml/opam:é" + "x" * 50)
    label = job.id.split("/", 1)[1][len("173601-") : -len("-abcdef")]
    assert label == ("docker-build-ocaml-opam--" + "x" * 50)[:40]
    assert JOB_ID.fullmatch(job.id)
    assert job.label.startswith("docker build ocaml/opam:é")
    job.finish()


def test_empty_label_is_rejected(registry: JobRegistry) -> None:
    with pytest.raises(ValueError, match="label"):
        registry.create("")


def test_ids_of_jobs_created_in_the_same_second_differ(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    jobs = [registry.create("build") for _ in range(20)]
    assert len({job.id for job in jobs}) == 20
    for job in jobs:
        job.finish()


def test_ids_stay_apart_when_the_random_suffixes_clash(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    random.seed(13)
    first = registry.create("build")
    random.seed(13)
    second = registry.create("build")
    assert second.id != first.id, "an id of this registry is never given again, written or not"
    first.log("written")
    # Another process (the next start) in the same second draws the same suffix again.
    later = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    random.seed(13)
    third = later.create("build")
    assert third.id != first.id, "an id whose log is on disk is never given again"
    third.log("its own log")
    assert first.log_path.read_text().endswith(": written\n")
    for job in (first, second, third):
        job.finish()


def test_a_log_made_by_someone_else_under_the_same_id_is_never_shared(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    job = registry.create("build")
    job.log_path.parent.mkdir(parents=True)
    job.log_path.write_text("another process's job\n")
    with pytest.raises(FileExistsError):
        job.log("mine")
    job.finish("its log could not be written")
    assert job.state is JobState.FAILED
    assert job.log_path.read_text() == "another process's job\n"


def open_logs(jobs_dir: Path) -> int:
    """How many files under `jobs_dir` this process has open (counting only those, so that a
    file another test left to the garbage collector, closed meanwhile, does not count)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listing the directory, now closed
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{jobs_dir}/"):
                count += 1
    return count


async def test_the_open_logs_are_bounded_whatever_the_number_of_jobs(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation())
    jobs = [registry.create(f"job{i}") for i in range(600)]
    assert open_logs(jobs_dir) == 0, "creating a job opens nothing"
    most = 0
    # Every job writes, then every job writes again: each log is closed and opened again.
    for round_ in ("first", "second"):
        for job in jobs:
            job.log(f"{round_} line")
            most = max(most, open_logs(jobs_dir))
    assert 0 < most <= 128
    await asyncio.gather(*(job.start() for job in jobs))
    for job in jobs:
        job.finish()
    assert open_logs(jobs_dir) == 0, "a finished job's log is closed"
    for job in jobs:
        lines = [line.split(": ", 1)[1] for line in job.log_path.read_text().splitlines()]
        assert lines == ["first line", "second line", "Job started", "Job succeeded"]


async def test_following_a_log_not_written_yet_waits_for_it(registry: JobRegistry) -> None:
    job = registry.create("build")
    follower = job.follow()
    first = asyncio.ensure_future(anext(follower))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not first.done()
    assert not job.log_path.exists()
    job.log("first words")
    seen = await asyncio.wait_for(first, 10)
    assert seen.endswith(b": first words\n")
    job.finish()
    seen += b"".join([chunk async for chunk in follower])
    assert seen == job.log_path.read_bytes()


def test_log_lines_appear_in_the_file(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(), clock=fixed_clock)
    job = registry.create("build")
    job.log("hello")
    assert job.log_path.read_bytes() == b"2026-11-27 17:36.01: hello\n"
    job.write(b"raw \x1b[31mred\x1b[0m\n")
    job.write("text ✓\n")
    assert job.log_path.read_bytes().endswith(b"raw \x1b[31mred\x1b[0m\ntext \xe2\x9c\x93\n")
    job.finish("exit code 2")
    assert (
        job.log_path.read_text().splitlines()[-1] == "2026-11-27 17:36.01: Job failed: exit code 2"
    )
    with pytest.raises(RuntimeError, match="finished"):
        job.log("too late")


@pytest.mark.parametrize(
    "bad_id",
    [
        "../x",
        "2026-11-27/../../etc/passwd",
        "2026-11-27/173601-build-a1b2c3/../../x",
        "/2026-11-27/173601-build-a1b2c3",
        "2026-11-27/173601-build-a1b2c3\n",
        "2026-11-27/173601-build-A1B2C3",
        "2026-11-27/173601--a1b2c3",
        "2026-11-27/173601-bu/ld-a1b2c3",
        "2026-11-27/١٧٣٦٠١-build-a1b2c3",
        "",
    ],
)
def test_log_path_rejects_bad_ids(registry: JobRegistry, bad_id: str) -> None:
    with pytest.raises(ValueError, match="not a job id"):
        registry.log_path(bad_id)


def test_log_path_accepts_ids_of_earlier_processes(registry: JobRegistry, jobs_dir: Path) -> None:
    path = registry.log_path("2025-01-02/030405-opam-lint.v2-0f9e8d")
    assert path == jobs_dir / "2025-01-02" / "030405-opam-lint.v2-0f9e8d.log"
    assert registry.get("2025-01-02/030405-opam-lint.v2-0f9e8d") is None


def test_registry_get_and_active(registry: JobRegistry) -> None:
    first = registry.create("one")
    second = registry.create("two")
    assert registry.get(first.id) is first
    assert registry.active() == [first, second]
    first.finish()
    assert registry.active() == [second]
    assert registry.get(first.id) is first
    second.finish()
    assert registry.active() == []


# Following logs


async def test_follow_yields_lines_written_after_following_started(
    registry: JobRegistry,
) -> None:
    job = registry.create("build")
    job.log("before")
    follower = job.follow()
    seen = await next_chunk_containing(follower, b"before")
    job.log("after")
    seen += await next_chunk_containing(follower, b"after")
    job.finish()
    seen += b"".join([chunk async for chunk in follower])
    assert seen == job.log_path.read_bytes()
    assert seen.endswith(b": Job succeeded\n")


async def test_follow_from_an_offset(registry: JobRegistry) -> None:
    job = registry.create("build")
    job.write(b"0123456789")
    job.finish()
    content = job.log_path.read_bytes()
    assert b"".join([chunk async for chunk in job.follow(start=4)]) == content[4:]


async def test_follow_log_stops_only_after_done(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"")
    finished = False
    follower = follow_log(path, done=lambda: finished, poll_interval=0)
    reader = asyncio.create_task(anext(follower))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not reader.done()
    with path.open("ab") as out:
        out.write(b"tail")
    finished = True
    assert await reader == b"tail"
    with pytest.raises(StopAsyncIteration):
        await anext(follower)


async def test_follow_log_reads_what_was_written_just_before_done(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"start\n")

    def done() -> bool:
        # As Job.finish does: the last line is written, then the job counts as done.
        with path.open("ab") as out:
            out.write(b"last words\n")
        return True

    received = b"".join([chunk async for chunk in follow_log(path, done=done)])
    assert received == path.read_bytes()
    assert received.startswith(b"start\nlast words\n")


async def test_multi_megabyte_log_is_followed_completely(registry: JobRegistry) -> None:
    job = registry.create("big")
    chunk_size = 65536
    sizes: list[int] = []
    received = bytearray()

    async def follow() -> None:
        async for chunk in follow_log(
            job.log_path,
            done=lambda: job.finished is not None,
            poll_interval=0,
            chunk_size=chunk_size,
        ):
            sizes.append(len(chunk))
            received.extend(chunk)

    follower = asyncio.create_task(follow())
    for block in range(160):
        # Distinct content per block, so a dropped or repeated block changes the bytes.
        job.write(f"{block:08d}".encode() * 8192)
        await asyncio.sleep(0)
    job.finish()
    await follower
    content = job.log_path.read_bytes()
    assert len(content) > 10_000_000
    assert bytes(received) == content
    assert max(sizes) <= chunk_size


async def test_follow_log_of_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await anext(follow_log(tmp_path / "missing.log", done=lambda: True))


# Starting, confirmation and pools


def record_states(job: Job) -> list[JobState]:
    """Collect every state `job` enters from now on."""
    states: list[JobState] = []
    job.on_state_change(lambda changed: states.append(changed.state))
    return states


async def test_job_lifecycle_and_state_callbacks(registry: JobRegistry) -> None:
    changed: list[tuple[str, JobState]] = []
    registry.on_change(lambda job: changed.append((job.id, job.state)))
    job = registry.create("build", level=Level.HARMLESS)
    states = record_states(job)
    assert job.actions() == {"cancel"}
    await job.start()
    assert job.state is JobState.RUNNING
    assert job.started is not None
    assert job.actions() == {"cancel"}
    job.finish()
    assert job.state is JobState.OK
    assert job.finished is not None
    assert job.error is None
    assert job.actions() == set()
    await job.wait_done()
    assert states == [JobState.RUNNING, JobState.OK]
    assert changed == [(job.id, JobState.RUNNING), (job.id, JobState.OK)]
    lines = job.log_path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["Job started", "Job succeeded"]


async def test_failed_job_records_error(registry: JobRegistry) -> None:
    job = registry.create("build")
    await job.start()
    job.finish("exit code 1")
    assert job.state is JobState.FAILED
    assert job.error == "exit code 1"


async def test_wait_done_waits_for_finish(registry: JobRegistry) -> None:
    job = registry.create("build")
    waiter = asyncio.create_task(job.wait_done())
    await asyncio.sleep(0)
    assert not waiter.done()
    job.finish()
    await waiter


async def test_start_twice_raises(registry: JobRegistry) -> None:
    job = registry.create("build")
    await job.start()
    with pytest.raises(RuntimeError, match="already been started"):
        await job.start()
    job.finish()


async def test_finish_twice_raises(registry: JobRegistry) -> None:
    job = registry.create("build")
    job.finish()
    with pytest.raises(RuntimeError, match="already finished"):
        job.finish("again")
    assert job.state is JobState.OK
    assert job.error is None


async def test_dangerous_job_waits_for_approval(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(Level.AVERAGE))
    job = registry.create("deploy", level=Level.DANGEROUS)
    waiting = state_reached(job, JobState.WAITING_FOR_CONFIRMATION)
    starting = asyncio.create_task(job.start())
    await waiting.wait()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not starting.done()
    assert job.state is JobState.WAITING_FOR_CONFIRMATION
    assert job.actions() == {"cancel", "start-now"}
    job.approve()
    await starting
    assert job.state is JobState.RUNNING
    assert "Waiting for confirmation" in job.log_path.read_text()
    job.finish()


async def test_job_at_threshold_needs_confirmation() -> None:
    confirmation = Confirmation(Level.AVERAGE)
    assert confirmation.needs_confirmation(Level.AVERAGE)
    assert confirmation.needs_confirmation(Level.DANGEROUS)
    assert not confirmation.needs_confirmation(Level.MOSTLY_HARMLESS)
    assert not Confirmation(None).needs_confirmation(Level.DANGEROUS)


async def test_harmless_job_does_not_wait_for_confirmation(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(Level.AVERAGE))
    job = registry.create("lint", level=Level.HARMLESS)
    states = record_states(job)
    await job.start()
    assert states == [JobState.RUNNING]
    job.finish()


async def test_removing_threshold_releases_waiting_jobs(jobs_dir: Path) -> None:
    confirmation = Confirmation(Level.AVERAGE)
    registry = JobRegistry(jobs_dir, confirmation)
    jobs = [registry.create(f"deploy{i}", level=Level.DANGEROUS) for i in range(3)]
    events = [state_reached(job, JobState.WAITING_FOR_CONFIRMATION) for job in jobs]
    starts = [asyncio.create_task(job.start()) for job in jobs]
    for event in events:
        await event.wait()
    confirmation.set_threshold(None)
    await asyncio.gather(*starts)
    assert [job.state for job in jobs] == [JobState.RUNNING] * 3
    for job in jobs:
        job.finish()


async def test_threshold_change_releases_only_jobs_that_no_longer_need_it(jobs_dir: Path) -> None:
    confirmation = Confirmation(Level.AVERAGE)
    registry = JobRegistry(jobs_dir, confirmation)
    average = registry.create("test", level=Level.AVERAGE)
    dangerous = registry.create("deploy", level=Level.DANGEROUS)
    waits = [state_reached(job, JobState.WAITING_FOR_CONFIRMATION) for job in (average, dangerous)]
    average_start = asyncio.create_task(average.start())
    dangerous_start = asyncio.create_task(dangerous.start())
    for event in waits:
        await event.wait()
    confirmation.set_threshold(Level.DANGEROUS)
    await average_start
    assert average.state is JobState.RUNNING
    for _ in range(20):
        await asyncio.sleep(0)
    assert not dangerous_start.done()
    assert dangerous.state is JobState.WAITING_FOR_CONFIRMATION
    dangerous.approve()
    await dangerous_start
    average.finish()
    dangerous.finish()


async def test_pooled_job_waits_ready_and_releases_slot_when_finished(
    registry: JobRegistry,
) -> None:
    pool = Pool("build", 1)
    first = registry.create("first", pool=pool)
    second = registry.create("second", pool=pool)
    await first.start()
    assert pool.in_use == 1
    ready = state_reached(second, JobState.READY)
    second_start = asyncio.create_task(second.start())
    await ready.wait()
    while pool.queue_length == 0:
        await asyncio.sleep(0)
    assert second.state is JobState.READY
    assert second.actions() == {"cancel"}
    first.finish()
    await second_start
    assert second.state is JobState.RUNNING
    assert pool.in_use == 1
    second.finish()
    assert pool.in_use == 0


async def test_start_may_choose_another_pool_and_level_than_the_job_was_created_with(
    jobs_dir: Path,
) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(Level.DANGEROUS))
    created_in, chosen = Pool("created", 1), Pool("chosen", 1)
    job = registry.create("deploy", pool=created_in, level=Level.HARMLESS)
    other = registry.create("lint", pool=created_in)
    await other.start(pool=None)
    assert (other.pool, created_in.in_use) == (None, 0), "pool=None runs it in no pool"
    waiting = state_reached(job, JobState.WAITING_FOR_CONFIRMATION)
    starting = asyncio.create_task(job.start(pool=chosen, level=Level.DANGEROUS))
    await waiting.wait()
    assert job.level is Level.DANGEROUS
    job.approve()
    await starting
    assert job.pool is chosen
    assert (chosen.in_use, created_in.in_use) == (1, 0)
    job.finish()
    other.finish()
    assert chosen.in_use == 0


async def test_high_priority_job_gets_the_slot_first(registry: JobRegistry) -> None:
    pool = Pool("build", 1)
    holder = registry.create("holder", pool=pool)
    await holder.start()
    normal = registry.create("normal", pool=pool)
    urgent = registry.create("urgent", pool=pool, high_priority=True)
    running: list[Job] = []

    def record_running(job: Job) -> None:
        if job.state is JobState.RUNNING:
            running.append(job)

    normal.on_state_change(record_running)
    urgent.on_state_change(record_running)
    normal_start = asyncio.create_task(normal.start())
    while pool.queue_length < 1:
        await asyncio.sleep(0)
    urgent_start = asyncio.create_task(urgent.start())
    while pool.queue_length < 2:
        await asyncio.sleep(0)
    holder.finish()
    await urgent_start
    urgent.finish()
    await normal_start
    normal.finish()
    assert running == [urgent, normal]


async def test_cancel_while_waiting_for_confirmation_raises_job_cancelled(
    jobs_dir: Path,
) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(Level.AVERAGE))
    job = registry.create("deploy", level=Level.DANGEROUS)
    waiting = state_reached(job, JobState.WAITING_FOR_CONFIRMATION)
    starting = asyncio.create_task(job.start())
    await waiting.wait()
    job.cancel("No longer needed")
    with pytest.raises(JobCancelled, match="No longer needed") as info:
        await starting
    assert not isinstance(info.value, asyncio.CancelledError)
    assert job.started is None
    assert job.actions() == set()
    job.finish(str(info.value))
    assert job.state is JobState.FAILED
    assert job.error == "No longer needed"
    assert job.log_path.read_text().splitlines()[-1].endswith("Job failed: No longer needed")


async def test_cancel_while_waiting_for_pool_raises_and_frees_nothing(
    registry: JobRegistry,
) -> None:
    pool = Pool("build", 1)
    holder = await pool.acquire()
    job = registry.create("build", pool=pool)
    starting = asyncio.create_task(job.start())
    while pool.queue_length == 0:
        await asyncio.sleep(0)
    job.cancel()
    with pytest.raises(JobCancelled, match=r"^Cancelled$"):
        await starting
    assert pool.queue_length == 0
    assert pool.in_use == 1
    job.finish("Cancelled")
    assert pool.in_use == 1
    holder.release()
    assert pool.in_use == 0


async def test_cancel_just_after_pool_grants_slot_hands_it_back(registry: JobRegistry) -> None:
    pool = Pool("build", 1)
    holder = await pool.acquire()
    job = registry.create("build", pool=pool)
    starting = asyncio.create_task(job.start())
    while pool.queue_length == 0:
        await asyncio.sleep(0)
    holder.release()
    assert pool.in_use == 1
    job.cancel()
    with pytest.raises(JobCancelled):
        await starting
    assert pool.in_use == 0
    job.finish("Cancelled")


async def test_cancel_after_pool_granted_but_before_start_resumed_hands_slot_back(
    registry: JobRegistry,
) -> None:
    pool = Pool("build", 1)
    holder = await pool.acquire()
    job = registry.create("build", pool=pool)
    starting = asyncio.create_task(job.start())
    while pool.queue_length == 0:
        await asyncio.sleep(0)
    holder.release()
    # One step lets the pool's acquire finish while start() has not yet resumed.
    await asyncio.sleep(0)
    job.cancel()
    with pytest.raises(JobCancelled):
        await starting
    assert pool.in_use == 0
    assert job.state is not JobState.RUNNING
    job.finish("Cancelled")


async def test_cancel_before_start_makes_start_raise(registry: JobRegistry) -> None:
    job = registry.create("build")
    job.cancel("stale")
    with pytest.raises(JobCancelled, match="stale"):
        await job.start()
    assert job.state is JobState.CREATED
    job.finish("stale")


@pytest.mark.parametrize("job_cancelled_too", [False, True])
async def test_caller_task_cancellation_is_not_turned_into_job_cancelled(
    registry: JobRegistry, job_cancelled_too: bool
) -> None:
    # With the job cancelled as well, the caller's cancellation still wins.
    pool = Pool("build", 1)
    holder = await pool.acquire()
    job = registry.create("build", pool=pool)
    starting = asyncio.create_task(job.start())
    while pool.queue_length == 0:
        await asyncio.sleep(0)
    if job_cancelled_too:
        job.cancel()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert pool.queue_length == 0
    assert pool.in_use == 1
    holder.release()
    job.finish("Cancelled")


async def test_finish_while_start_is_waiting_raises(jobs_dir: Path) -> None:
    registry = JobRegistry(jobs_dir, Confirmation(Level.HARMLESS))
    job = registry.create("build")
    waiting = state_reached(job, JobState.WAITING_FOR_CONFIRMATION)
    starting = asyncio.create_task(job.start())
    await waiting.wait()
    with pytest.raises(RuntimeError, match="start"):
        job.finish()
    job.cancel()
    with pytest.raises(JobCancelled):
        await starting
    job.finish("Cancelled")
    assert job.state is JobState.FAILED


async def test_cancel_while_running_calls_callbacks(registry: JobRegistry) -> None:
    job = registry.create("build")
    await job.start()
    reasons: list[str] = []
    job.on_cancel(lambda reason: reasons.append(f"first: {reason}"))
    job.on_cancel(lambda reason: reasons.append(f"second: {reason}"))
    assert not job.is_cancelled
    job.cancel("Superseded")
    assert reasons == ["first: Superseded", "second: Superseded"]
    assert job.is_cancelled
    assert job.cancelled_reason == "Superseded"
    assert job.state is JobState.RUNNING
    assert job.actions() == set()
    job.on_cancel(lambda reason: reasons.append(f"late: {reason}"))
    assert reasons[-1] == "late: Superseded"
    job.cancel("again")
    assert len(reasons) == 3
    assert job.cancelled_reason == "Superseded"
    job.finish("Cancelled")
    assert job.error == "Cancelled"


async def test_failing_cancel_callback_does_not_stop_the_others(registry: JobRegistry) -> None:
    job = registry.create("build")
    await job.start()
    called: list[str] = []

    def broken(reason: str) -> None:
        raise OSError("process already gone")

    job.on_cancel(broken)
    job.on_cancel(called.append)
    job.cancel()
    assert called == ["Cancelled"]
    assert "process already gone" in job.log_path.read_text()
    job.finish("Cancelled")


async def test_cancel_after_finish_does_nothing(registry: JobRegistry) -> None:
    job = registry.create("build")
    calls: list[str] = []
    job.on_cancel(calls.append)
    job.finish()
    job.cancel()
    assert calls == []
    assert not job.is_cancelled
    assert job.state is JobState.OK


async def test_registry_forgets_all_but_the_latest_finished_jobs(tmp_path: Path) -> None:
    registry = JobRegistry(tmp_path / "job", Confirmation())
    registry.keep_finished = 2
    jobs = [registry.create("j") for _ in range(4)]
    for job in jobs[:3]:
        job.finish()
    assert registry.get(jobs[0].id) is None, "the oldest finished job is forgotten"
    assert all(registry.get(job.id) is job for job in jobs[1:])
    assert jobs[0].log_path.exists(), "its log stays"
