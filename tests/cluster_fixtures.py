"""A real Dask cluster on 127.0.0.1 for the client's tests: a scheduler and workers, each its
own process (group), killed at teardown.

The processes are `dask scheduler` / `dask worker` with `cluster_standin.py` preloaded, which
stands in for `pipeline cluster scheduler` / `pipeline cluster worker` until those are merged
(`SCHEDULER_COMMAND` and `WORKER_COMMAND` are the two places to change then).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from distributed import Client
from obuilder_fixtures import HANG_GUARD
from registry_fixtures import free_port

STANDIN = Path(__file__).with_name("cluster_standin.py")
DASK = str(Path(sys.executable).with_name("dask"))
SCHEDULER_COMMAND = [DASK, "scheduler", "--host", "127.0.0.1", "--no-dashboard",
                     "--preload", str(STANDIN)]
WORKER_COMMAND = [DASK, "worker", "--no-nanny", "--no-dashboard", "--preload", str(STANDIN)]
# No retry of a build whose worker died: the client must see the loss.
ENVIRONMENT = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}


class Cluster:
    """A scheduler at `address` and the workers started by name."""

    def __init__(self, logs: Path) -> None:
        """Nothing started yet; the processes' output goes to files under `logs`."""
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = logs
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=ENVIRONMENT, start_new_session=True)

    async def start_scheduler(self) -> None:
        """Start the scheduler (again, on the same port) and wait until it answers."""
        self.scheduler = self._spawn([*SCHEDULER_COMMAND, "--port", str(self.port)],
                                     "scheduler")
        async with asyncio.timeout(HANG_GUARD):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                return

    async def start_worker(self, name: str, pool: str, capacity: int = 1) -> None:
        """Start worker `name` offering `pool=capacity`; wait until the scheduler knows it."""
        self.workers[name] = self._spawn(
            [*WORKER_COMMAND, self.address, "--name", name, "--nthreads", str(capacity),
             "--resources", f"{pool}={capacity}"], name)
        await self.wait_for_workers({name})

    async def wait_for_workers(self, names: set[str]) -> None:
        """Wait until the scheduler knows the workers `names`."""
        async with asyncio.timeout(HANG_GUARD), \
                Client(self.address, asynchronous=True, set_as_default=False) as client:
            while not names <= {info["name"] for info in
                                (await client.scheduler.identity())["workers"].values()}:
                await asyncio.sleep(0.1)

    def kill(self, process: subprocess.Popen[bytes] | None) -> None:
        """Kill `process` and its process group, and reap it."""
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """Kill every process."""
        for process in self.workers.values():
            self.kill(process)
        self.kill(self.scheduler)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A running scheduler, no worker yet."""
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    running = Cluster(logs)
    try:
        await running.start_scheduler()
        yield running
    finally:
        running.stop()
