"""The cluster client against the cluster's real processes (`pipeline cluster scheduler` and
`worker`s with their own rsync stores, building busybox specs with runc; see
cluster_fixtures.py), separate processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cluster_fixtures import Cluster, cluster, command_output, sleeping  # noqa: F401 (a fixture)
from obuilder_fixtures import HANG_GUARD

from pipeline.cluster.client import ClusterBuild, ClusterClient, WorkerLost, new_request
from pipeline.cluster.protocol import BuildEvent

POOL = "linux-x86_64"


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[ClusterClient]:  # noqa: F811
    connected = await ClusterClient.connect(cluster.address, name="test-client")
    try:
        yield connected
    finally:
        await connected.close()


def submit(client: ClusterClient, command: str, pool: str = POOL) -> ClusterBuild:
    """Build a busybox image running the shell `command`."""
    spec = f'((from busybox) (run (shell "{command}")))'
    return client.submit(new_request(spec, source=None, pool=pool, cache_hint="hint",
                                     urgent=False, client=client.name))


def log_of(events: list[BuildEvent]) -> bytes:
    """The step log in the log events `events`, checking that they are numbered in order."""
    chunks = [event for event in events if event.kind == "log"]
    assert [event.seq for event in chunks] == list(range(len(chunks)))
    return b"".join(event.data for event in chunks)


async def all_events(build: ClusterBuild) -> list[BuildEvent]:
    """Every event of the build, until it ends (bounded)."""
    async with asyncio.timeout(HANG_GUARD):
        return [event async for event in build]


async def until_printed(build: ClusterBuild, text: str) -> None:
    """Wait (bounded) for the build to start and its command to print `text`."""
    seen: list[BuildEvent] = []
    async with asyncio.timeout(HANG_GUARD):
        async for event in build:
            seen.append(event)
            if text in command_output(log_of(seen)):
                break
    assert seen[0].kind == "started"


async def start_sleeping_build(client: ClusterClient) -> tuple[ClusterBuild, list[int]]:
    """A build whose step sleeps, once the step runs; the pids of its sandboxed `sleep` (found
    in /proc by a duration of its own)."""
    seconds = 100000 + uuid.uuid4().int % 100000
    build = submit(client, f"echo running; exec sleep {seconds}")
    await until_printed(build, "running\n")
    pids = sleeping(seconds)
    assert pids, "the sandboxed sleep is running"
    return build, pids


async def test_a_build_streams_every_line_in_order_and_gives_its_result(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    build = submit(client, "seq 1 100000")
    events = await all_events(build)
    result = await build.result()
    assert events[0].kind == "started" and events[0].worker == "w1"
    log = log_of(events[1:])
    assert command_output(log) == "".join(f"{n}\n" for n in range(1, 100001))
    assert log.decode().splitlines()[-1].rstrip("\x1f") == f'---> saved as "{result}"'
    # The scheduler's plugin was told where the hint was built: the hint's next build is an
    # affinity hit (its first was neither a hit nor a miss).
    assert await cluster.metric("pipeline_cluster_affinity_hits_total", POOL) == 0
    again = submit(client, "echo again")
    await again.result()
    assert again.worker == "w1"
    assert await cluster.metric("pipeline_cluster_affinity_hits_total", POOL) == 1


async def test_a_failed_build_raises_the_workers_error(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    build = submit(client, "echo failing; exit 3")
    events = await all_events(build)
    with pytest.raises(Exception, match="exited with status 3") as error:
        await build.result()
    assert type(error.value).__name__ == "BuildError"
    assert command_output(log_of(events)) == "failing\n"


async def test_a_build_waits_for_a_worker_of_its_pool(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("arm", "linux-arm64")
    build = submit(client, "echo built")
    events = aiter(build)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await anext(events)
    await cluster.start_worker("x86", POOL)
    async with asyncio.timeout(HANG_GUARD):
        started = await anext(events)
        await build.result()
    assert started.worker == "x86"


async def test_cancelling_kills_the_builds_process_on_the_worker(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    build, pids = await start_sleeping_build(client)
    await build.cancel()
    async with asyncio.timeout(HANG_GUARD):
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await build.result()


async def test_a_worker_killed_mid_build_fails_it_naming_the_worker(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("doomed", POOL)
    build, _ = await start_sleeping_build(client)
    cluster.workers["doomed"].kill()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(WorkerLost, match=r"^worker doomed was lost during the build$"):
            await build.result()


async def test_a_scheduler_restart_resubmits_unfinished_builds_and_not_finished_ones(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    finished = submit(client, "echo finished")
    async with asyncio.timeout(HANG_GUARD):
        finished_result = await finished.result()
    queued = submit(client, "echo done", pool="linux-arm64")
    first_id = queued.request.request_id
    cluster.workers["w1"].kill()
    assert cluster.scheduler is not None
    cluster.scheduler.kill()
    await cluster.start_scheduler()
    # w1 is back: a finished build submitted again would run there.
    await cluster.start_worker("w1", POOL)
    await cluster.start_worker("arm", "linux-arm64")
    events = await all_events(queued)
    await queued.result()
    assert queued.request.request_id != first_id
    assert events[0].kind == "started" and events[0].worker == "arm"
    assert command_output(log_of(events)) == "done\n"
    # What the new scheduler was given: the unfinished build only.
    assert await cluster.metric("pipeline_cluster_jobs_submitted_total", "linux-arm64") == 1
    assert await cluster.metric("pipeline_cluster_jobs_submitted_total", POOL) == 0
    assert await finished.result() == finished_result
