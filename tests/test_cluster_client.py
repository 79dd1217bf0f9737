"""The cluster client against a real Dask scheduler and workers (separate processes on
127.0.0.1; see cluster_fixtures.py for the stand-in they preload until the cluster's own
processes are merged)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import cluster_standin
import pytest
from cluster_fixtures import Cluster, cluster  # noqa: F401 (a fixture)
from obuilder_fixtures import HANG_GUARD

from pipeline.cluster.client import ClusterBuild, ClusterClient, WorkerLost, new_request
from pipeline.cluster.protocol import BuildEvent

POOL = "linux-x86_64"


@pytest.fixture(autouse=True)
def standin_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client submits `pipeline.cluster.worker.run_build`: the stand-in's, for now."""
    monkeypatch.setitem(sys.modules, "pipeline.cluster.worker", cluster_standin)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[ClusterClient]:  # noqa: F811
    connected = await ClusterClient.connect(cluster.address, name="test-client")
    try:
        yield connected
    finally:
        await connected.close()


def submit(client: ClusterClient, command: str, pool: str = POOL) -> ClusterBuild:
    return client.submit(new_request(command, source=None, pool=pool, cache_hint="hint",
                                     urgent=False, client=client.name))


async def all_events(build: ClusterBuild) -> list[BuildEvent]:
    """Every event of the build, until it ends (bounded)."""
    async with asyncio.timeout(HANG_GUARD):
        return [event async for event in build]


async def until_started(build: ClusterBuild) -> AsyncIterator[BuildEvent]:
    """The build's events, after waiting (bounded) for its started event."""
    events = aiter(build)
    async with asyncio.timeout(HANG_GUARD):
        started = await anext(events)
    assert started.kind == "started"
    return events


async def test_a_build_streams_every_line_in_order_and_gives_its_result(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    build = submit(client, "seq 1 100000")
    events = await all_events(build)
    result = await build.result()
    assert events[0].kind == "started" and events[0].worker == "w1"
    assert [event.seq for event in events[1:]] == list(range(len(events) - 1))
    assert b"".join(event.data for event in events[1:]) == \
        "".join(f"{n}\n" for n in range(1, 100001)).encode()
    assert result == cluster_standin.hashlib.sha256(b"seq 1 100000").hexdigest()
    ended = await client.dask.scheduler.standin_ended()
    assert [(e["pool"], e["cache_hint"], e["client"], e["ok"]) for e in ended] == \
        [(POOL, "hint", "test-client", True)]
    assert ended[0]["worker"] in (await client.dask.scheduler.identity())["workers"]


async def test_a_failed_build_raises_the_workers_error(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    build = submit(client, "echo failing; exit 3")
    events = await all_events(build)
    with pytest.raises(Exception, match="exited with status 3") as error:
        await build.result()
    assert type(error.value).__name__ == "BuildError"
    assert events[-1].data == b"failing\n"


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
        tmp_path: Path, cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    pid_file = tmp_path / "pid"
    build = submit(client, f"echo $$ > {pid_file}.new && mv {pid_file}.new {pid_file}"
                           " && echo running && exec sleep 600")
    events = await until_started(build)
    async with asyncio.timeout(HANG_GUARD):
        assert (await anext(events)).data == b"running\n"
    pid = int(pid_file.read_text())
    assert Path(f"/proc/{pid}").exists()
    await build.cancel()
    async with asyncio.timeout(HANG_GUARD):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await build.result()


async def test_a_worker_killed_mid_build_fails_it_naming_the_worker(
        cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("doomed", POOL)
    build = submit(client, "echo running && exec sleep 600")
    events = await until_started(build)
    async with asyncio.timeout(HANG_GUARD):
        assert (await anext(events)).data == b"running\n"
    cluster.kill(cluster.workers["doomed"])
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(WorkerLost, match=r"^worker doomed was lost during the build$"):
            await build.result()


async def test_a_scheduler_restart_resubmits_unfinished_builds_and_not_finished_ones(
        tmp_path: Path, cluster: Cluster, client: ClusterClient) -> None:  # noqa: F811
    await cluster.start_worker("w1", POOL)
    runs = tmp_path / "runs"
    finished = submit(client, f"echo finished >> {runs}")
    async with asyncio.timeout(HANG_GUARD):
        finished_result = await finished.result()
    queued = submit(client, f"echo queued >> {runs}; echo done", pool="linux-arm64")
    first_id = queued.request.request_id
    cluster.kill(cluster.workers["w1"])
    cluster.kill(cluster.scheduler)
    await cluster.start_scheduler()
    await cluster.start_worker("arm", "linux-arm64")
    events = await all_events(queued)
    await queued.result()
    assert queued.request.request_id != first_id
    assert [event.kind for event in events] == ["started", "log"]
    assert events[1].data == b"done\n"
    assert runs.read_text() == "finished\nqueued\n"
    assert await finished.result() == finished_result
