"""The cluster's scheduler: a real `pipeline cluster scheduler` process, real Dask workers (in
this process, so that their builds are fakes the tests hold and release) and real clients.

The builds here are `held_builds.held_build`, a task that records that it started and waits
until the test releases it: what the scheduler does with builds does not depend on what they
run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Future, Worker
from distributed.core import Status
from held_builds import RELEASED, STARTED, held_build, release

from pipeline.cluster.placement import URGENT_PRIORITY
from pipeline.cluster.protocol import (
    ADMIN_HANDLER,
    ENDED_HANDLER,
    PLACE_HANDLER,
    BuildRequest,
    task_key,
)

POOL = "linux-x86_64"
READY_TIMEOUT = 20.0

@pytest.fixture(autouse=True)
def _no_held_builds() -> Iterator[None]:
    yield
    RELEASED.clear()
    STARTED.clear()


@dataclass
class SchedulerProcess:
    """A running `pipeline cluster scheduler`."""

    process: subprocess.Popen[str]
    address: str
    metrics_url: str | None

    def stop(self) -> int:
        """SIGTERM it; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=READY_TIMEOUT)


@pytest.fixture
def start_scheduler(tmp_path: Path) -> Iterator[Callable[..., SchedulerProcess]]:
    """Start `pipeline cluster scheduler` processes on 127.0.0.1 (killed at teardown)."""
    started: list[subprocess.Popen[str]] = []

    def start(state_dir: Path, *options: str) -> SchedulerProcess:
        stderr = open(tmp_path / f"scheduler-{len(started)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "cluster", "scheduler", "--host", "127.0.0.1",
             "--port", "0", "--state-dir", str(state_dir), *options],
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
        stderr.close()
        started.append(process)
        lines = read_lines(process, 2 if "--metrics-port" in options else 1)
        address = lines[0].removeprefix("scheduler listening at ")
        metrics = lines[1].removeprefix("metrics at ") if len(lines) > 1 else None
        return SchedulerProcess(process, address, metrics)

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def read_lines(process: subprocess.Popen[str], count: int) -> list[str]:
    """The first `count` lines the process prints (failing if it does not within the time)."""
    assert process.stdout is not None
    stdout = process.stdout
    # Read in a thread: a text stream may hold several lines from one read of its pipe, which
    # waiting on the pipe itself (select) would not see.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        lines = reader.submit(lambda: [stdout.readline() for _ in range(count)])
        try:
            read = lines.result(timeout=READY_TIMEOUT)
        except concurrent.futures.TimeoutError:
            process.kill()  # ends the read
            raise AssertionError(f"no line from the scheduler within {READY_TIMEOUT} s") \
                from None
    assert all(read), f"the scheduler exited with {process.wait()}"
    return [line.strip() for line in read]


@asynccontextmanager
async def workers(address: str, *names: str, capacity: int = 2,
                  free_disk: int | None = None) -> AsyncIterator[list[Worker]]:
    """Dask workers of the pool `POOL`, `capacity` slots each (reporting `free_disk` bytes
    free, as the cluster's workers do, if given)."""
    metrics = {} if free_disk is None else {"free_disk": lambda worker: free_disk}
    started = [Worker(address, name=name, resources={POOL: capacity}, nthreads=capacity,
                      dashboard=False, metrics=metrics)
               for name in names]
    try:
        await asyncio.gather(*started)
        yield started
    finally:
        await asyncio.gather(*(worker.close() for worker in started), return_exceptions=True)


@asynccontextmanager
async def client_of(address: str) -> AsyncIterator[Client]:
    """A Dask client of the scheduler at `address`, on the test's loop."""
    async with Client(address, asynchronous=True) as client:
        yield client


def request(request_id: str, *, client: str = "client-a", hint: str | None = None,
            urgent: bool = False, spec: str = "ok") -> BuildRequest:
    """A build request of the pool `POOL` (a `spec` of "fail" makes the held build fail)."""
    return BuildRequest(request_id, spec, None, POOL, hint, urgent, client)


async def call(connection: Client, handler: str, /, **kwargs: Any) -> Any:
    """Call one of the scheduler plugin's handlers."""
    return await getattr(connection.scheduler, handler)(**kwargs)


async def submit(client: Client, build: BuildRequest, *, workers: list[str] | None = None,
                 strict: bool = False) -> Future:
    """Submit `build` as the cluster's client does: placed by the scheduler, unless the test
    names its `workers` (only those if `strict`: to load a worker)."""
    if workers is None:
        placement = await call(client, PLACE_HANDLER, pool=build.pool,
                               cache_hint=build.cache_hint, client=build.client,
                               urgent=build.urgent)
    else:
        placement = {"workers": workers, "priority": 0}
    preferred = list(placement["workers"])
    # Dask takes allow_other_workers only with a list of workers.
    return client.submit(held_build, build, key=task_key(build), resources={build.pool: 1},
                         workers=preferred or None,
                         allow_other_workers=bool(preferred) and not strict,
                         priority=placement["priority"], pure=False)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `condition` until it holds."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def show(client: Client) -> dict[str, Any]:
    """The scheduler's answer to the admin command `show`."""
    return await call(client, ADMIN_HANDLER, command="show")


async def worker_row(client: Client, name: str) -> dict[str, Any]:
    """The row of worker `name` in `show`."""
    rows = [row for row in (await show(client))["workers"] if row["name"] == name]
    assert len(rows) == 1, rows
    return rows[0]


async def assigned_to(client: Client, worker: Worker, count: int) -> None:
    """Wait until `count` builds run on or wait at `worker`, as the scheduler sees it."""
    async def holds() -> bool:
        row = await worker_row(client, str(worker.name))
        return bool(row["running"] + row["queued"] == count)
    await until(holds, f"{count} builds on {worker.name}")


async def test_the_hint_table_survives_a_restart(start_scheduler: Callable[..., SchedulerProcess],
                                                 tmp_path: Path) -> None:
    first = start_scheduler(tmp_path / "state")
    async with workers(first.address, "w1", "w2") as (w1, _w2), client_of(first.address) as client:
        await call(client, ENDED_HANDLER, pool=POOL, cache_hint="hint-a", worker=w1.address,
                   client="client-a", ok=True)
    assert first.stop() == 0

    second = start_scheduler(tmp_path / "state")
    async with workers(second.address, "w2", "w1") as (_w2, w1), \
            client_of(second.address) as client:
        placed = await call(client, PLACE_HANDLER, pool=POOL, cache_hint="hint-a",
                            client="client-a", urgent=False)
        assert list(placed["workers"]) == [w1.address]
        unknown = await call(client, PLACE_HANDLER, pool=POOL, cache_hint="hint-b",
                             client="client-a", urgent=False)
        assert list(unknown["workers"]) == []
        assert [row["name"] for row in (await show(client))["workers"]] == ["w1", "w2"]


async def test_placement_prefers_the_least_loaded_hinted_worker_that_can_take_work(
        start_scheduler: Callable[..., SchedulerProcess], tmp_path: Path) -> None:
    scheduler = start_scheduler(tmp_path / "state")
    async with workers(scheduler.address, "w1", "w2", "w3") as (w1, w2, _w3), \
            client_of(scheduler.address) as client:
        for worker in (w1, w2):
            await call(client, ENDED_HANDLER, pool=POOL, cache_hint="hint", worker=worker.address,
                       client="client-a", ok=True)

        async def place() -> list[str]:
            placed = await call(client, PLACE_HANDLER, pool=POOL, cache_hint="hint",
                                client="client-a", urgent=False)
            return list(placed["workers"])

        loading = [await submit(client, request("load-1"), workers=[w1.address], strict=True)]
        await assigned_to(client, w1, 1)
        assert await place() == [w2.address, w1.address]

        # Paused: w2 is no longer offered, and Dask itself gives it nothing (a build that
        # prefers it goes elsewhere).
        assert (await call(client, ADMIN_HANDLER, command="pause", worker="w2"))["done"]
        assert await place() == [w1.address]
        elsewhere = await submit(client, request("elsewhere"), workers=[w2.address])
        await until(lambda: _started("elsewhere"), "the build to start")
        release("elsewhere")
        assert await elsewhere.result() != "w2"

        # The worker pausing and resuming itself (as a worker low on disk does) does not end
        # the administrator's pause.
        resumed = await _resumed(client, w2)
        w2.status = Status.paused
        w2.status = Status.running

        async def heard() -> bool:
            return await _resumed(client, w2) > resumed
        await until(heard, "w2's own status to reach the scheduler")
        still = await submit(client, request("still-elsewhere"), workers=[w2.address])
        await until(lambda: _started("still-elsewhere"), "the build to start")
        release("still-elsewhere")
        assert await still.result() != "w2"

        # Overloaded: w1 has 2 builds waiting for a slot there while w3 has none.
        loading += [await submit(client, request(f"load-{i}"), workers=[w1.address], strict=True)
                    for i in (2, 3, 4)]
        await assigned_to(client, w1, 4)
        assert await place() == []

        assert (await call(client, ADMIN_HANDLER, command="unpause", worker="w2"))["done"]
        assert await place() == [w2.address]
        for i in range(1, 5):
            release(f"load-{i}")
        assert await client.gather(loading) == ["w1"] * 4


async def _started(request_id: str) -> bool:
    return request_id in STARTED


async def _resumed(client: Client, worker: Worker) -> int:
    """How many times the scheduler heard `worker` say it runs again (Dask logs a worker's
    status only when it changes on the scheduler)."""
    return sum(1 for _, message in await client.get_events(worker.address)
               if message.get("action") == "worker-status-change"
               and message["stimulus_id"].startswith("worker-status-change")
               and message["status"] == "running")


async def _count_started(count: int) -> bool:
    return len(STARTED) >= count


async def test_urgent_builds_first_then_clients_in_turns(
        start_scheduler: Callable[..., SchedulerProcess], tmp_path: Path) -> None:
    scheduler = start_scheduler(tmp_path / "state")
    async with workers(scheduler.address, "w1", capacity=1) as (w1,), \
            client_of(scheduler.address) as client:
        blocker = await submit(client, request("blocker", client="client-c"))
        await until(lambda: _started("blocker"), "the first build to start")
        futures = [await submit(client, request(f"a{i}", client="client-a")) for i in (1, 2, 3)]
        futures.append(await submit(client, request("b1", client="client-b")))
        futures.append(await submit(client, request("urgent", client="client-a", urgent=True)))
        await assigned_to(client, w1, 6)
        # One slot: each build starts once the one before it ends, in priority order.
        release("blocker")
        for started in range(2, 7):
            await until(lambda started=started: _count_started(started),
                        f"{started} builds to start")
            release(STARTED[-1])
        await client.gather([blocker, *futures])
        # a1 and b1 have the same priority (each is its client's first), so Dask takes
        # either first; b1 goes before a's later builds.
        assert STARTED[1] == "urgent"
        assert sorted(STARTED[2:4]) == ["a1", "b1"]
        assert STARTED[4:] == ["a2", "a3"]

        urgent = await call(client, PLACE_HANDLER, pool=POOL, cache_hint=None,
                            client="client-a", urgent=True)
        assert urgent["priority"] == URGENT_PRIORITY


async def admin(scheduler: str, *args: str) -> tuple[int, str, str]:
    """Run `pipeline cluster admin SCHEDULER ARGS...`: its status, output and errors."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "cluster", "admin", scheduler, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_admin_command(start_scheduler: Callable[..., SchedulerProcess],
                                 tmp_path: Path) -> None:
    scheduler = start_scheduler(tmp_path / "state")
    address = scheduler.address
    async with workers(address, "w1", free_disk=3 * 2**30) as (w1,), \
            workers(address, "w2") as (w2,), client_of(address) as client:
        status, out, _ = await admin(address, "show")
        assert status == 0
        assert re.search(rf"^{POOL}\s+2\s+4\s+0\s+0$", out, re.MULTILINE), out
        assert re.search(rf"^w1\s+{POOL}\s+{w1.address}\s+0/2\s+0\s+running\s+now\s+3 GiB$",
                         out, re.MULTILINE), out
        assert re.search(rf"^w2\s+{POOL}\s+{w2.address}\s+0/2\s+0\s+running\s+now\s+-$",
                         out, re.MULTILINE), out

        assert (await admin(address, "pause", "w1"))[:2] == (0, "worker w1 paused\n")
        status, out, _ = await admin(address, "show", "--json")
        assert status == 0 and '"paused": true' in out
        assert (await worker_row(client, "w1"))["paused"]
        assert (await admin(address, "unpause", w1.address))[:2] == (0, "worker w1 unpaused\n")
        assert not (await worker_row(client, "w1"))["paused"]

        status, out, err = await admin(address, "pause", "w9")
        assert (status, out, err) == (1, "", "pipeline cluster admin: unknown worker 'w9'\n")
        status, _, err = await admin(address, "forget", "w2")
        assert status == 1 and "w2 is connected: drain it first" in err

        # Drain: w2 finishes its build, takes no new one, then leaves.
        running = await submit(client, request("on-w2"), workers=[w2.address], strict=True)
        await until(lambda: _started("on-w2"), "the build on w2 to start")
        status, out, _ = await admin(address, "drain", "w2")
        assert status == 0 and out.startswith("worker w2 draining")
        assert (await worker_row(client, "w2"))["draining"]
        later = await submit(client, request("after-drain"))
        await until(lambda: _started("after-drain"), "the next build to start")
        release("after-drain")
        assert await later.result() == "w1"
        assert (await worker_row(client, "w2"))["draining"]
        release("on-w2")
        assert await running.result() == "w2"
        await until(lambda: _gone(client, "w2"), "w2 to leave")

        await call(client, ENDED_HANDLER, pool=POOL, cache_hint="hint", worker=w2.address,
                   client="client-a", ok=True)
        assert (await admin(address, "forget", "w2"))[:2] == (0, "worker w2 forgotten\n")
        assert [row["name"] for row in (await show(client))["workers"]] == ["w1"]
        status, _, err = await admin(address, "forget", "w2")
        assert status == 1 and "unknown worker 'w2'" in err
        async with workers(address, "w2"):
            # Its hint entries went with it: a worker of that name starts afresh.
            placed = await call(client, PLACE_HANDLER, pool=POOL, cache_hint="hint",
                                client="client-a", urgent=False)
            assert list(placed["workers"]) == []

    status, out, err = await admin("tcp://127.0.0.1:1", "show")
    assert status == 1 and out == ""
    assert err.startswith("pipeline cluster admin: cannot reach the scheduler at "
                          "tcp://127.0.0.1:1") and err.count("\n") == 1
    status, _, err = await admin(address, "pause")
    assert status == 2 and err.count("\n") == 1


async def _gone(client: Client, name: str) -> bool:
    return not (await worker_row(client, name))["connected"]


async def test_metrics(start_scheduler: Callable[..., SchedulerProcess], tmp_path: Path) -> None:
    scheduler = start_scheduler(tmp_path / "state", "--metrics-port", "0")
    assert scheduler.metrics_url is not None
    async with workers(scheduler.address, "w1") as (w1,), client_of(scheduler.address) as client:
        builds = [request("ok-1", hint="h"), request("ok-2", hint="h"),
                  request("fails", spec="fail")]
        futures = [await submit(client, build) for build in builds]
        for build in builds:
            release(build.request_id)
        await client.gather(futures, errors="skip")
        cancelled = await submit(client, request("cancelled"))
        await until(lambda: _started("cancelled"), "the build to start")
        held = await submit(client, request("held"))
        await assigned_to(client, w1, 2)
        await cancelled.cancel()
        for _ in range(2):
            await call(client, ENDED_HANDLER, pool=POOL, cache_hint="h", worker=w1.address,
                       client="client-a", ok=True)
        await call(client, ENDED_HANDLER, pool=POOL, cache_hint="h", worker="tcp://elsewhere:1",
                   client="client-a", ok=True)
        await call(client, ADMIN_HANDLER, command="pause", worker="w1")

        label = f'{{pool="{POOL}"}}'
        expected = {
            f"pipeline_cluster_jobs_submitted_total{label}": 5.0,
            f'pipeline_cluster_jobs_finished_total{{outcome="ok",pool="{POOL}"}}': 2.0,
            f'pipeline_cluster_jobs_finished_total{{outcome="failed",pool="{POOL}"}}': 1.0,
            f"pipeline_cluster_jobs_cancelled_total{label}": 1.0,
            f"pipeline_cluster_jobs_running{label}": 1.0,
            f"pipeline_cluster_queue_length{label}": 0.0,
            f"pipeline_cluster_capacity{label}": 2.0,
            f"pipeline_cluster_workers_connected{label}": 1.0,
            f"pipeline_cluster_workers_paused{label}": 1.0,
            # The first end of hint h teaches the table; then one hit, one miss.
            f"pipeline_cluster_affinity_hits_total{label}": 1.0,
            f"pipeline_cluster_affinity_misses_total{label}": 1.0,
        }

        async def served() -> bool:
            text = await asyncio.to_thread(_fetch, scheduler.metrics_url or "")
            values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                          if line and not line.startswith("#"))
            return all(float(values.get(name, "nan")) == value
                       for name, value in expected.items())

        await until(served, "the metrics")
        release("held")
        await held.result()

        # A pool that no worker offers: its build waits, and `show` says so.
        arm = await submit(client, dataclasses.replace(request("on-arm"), pool="linux-arm64"))
        async def waits() -> bool:
            pools = {pool["name"]: pool for pool in (await show(client))["pools"]}
            return "linux-arm64" in pools and pools["linux-arm64"] == {
                "name": "linux-arm64", "workers": 0, "capacity": 0, "running": 0, "queued": 1}
        await until(waits, "the build without a worker to be shown")
        await arm.cancel()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def scheduler_command(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `pipeline cluster scheduler ARGS...` to its end (it fails at once here)."""
    return subprocess.run([sys.executable, "-m", "pipeline", "cluster", "scheduler", *args],
                          capture_output=True, text=True, timeout=READY_TIMEOUT)


def test_usage_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.touch()
    for args in (["--port", "http"], ["--metrics-port", "-1"], ["--bogus"],
                 ["--state-dir", str(a_file)]):
        done = scheduler_command(*args)
        assert done.returncode == 2, done
        assert done.stderr.startswith("pipeline cluster scheduler: ")
        assert done.stderr.count("\n") == 1

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = scheduler_command("--port", str(port), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2, done
    # Dask's own log lines come first.
    assert done.stderr.splitlines()[-1].startswith(
        f"pipeline cluster scheduler: cannot listen on 127.0.0.1:{port}: ")
