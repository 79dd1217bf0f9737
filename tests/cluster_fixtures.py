"""The cluster's real processes on 127.0.0.1 for the tests: `pipeline cluster scheduler` and
`pipeline cluster worker` (each with its own rsync store, runc and the session's local busybox
image directory), each in its own process group, killed at teardown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from distributed import Client
from obuilder_fixtures import HANG_GUARD
from registry_fixtures import free_port

from pipeline.obuilder.log_format import MARK, parse_outcome

CLUSTER = [sys.executable, "-m", "pipeline", "cluster"]


def worker_argv(address: str, name: str, pool: str, store: str, state_dir: Path, *extra: str,
                fetcher: str | None = None, capacity: int = 2) -> list[str]:
    """The command line of `pipeline cluster worker` `name` of `pool` building on `store`."""
    fetcher_options = ["--fetcher", fetcher] if fetcher else []
    return [*CLUSTER, "worker", address, "--pool", pool, "--capacity", str(capacity),
            "--store", store, *fetcher_options, "--name", name, "--state-dir", str(state_dir),
            *extra]


class ClusterProcess:
    """A process in its own process group, its stdout read line by line, its stderr (Dask's
    logging) in the file `stderr`."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        """Start `argv`."""
        self.stderr = stderr
        with open(stderr, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                            start_new_session=True)
        self.lines: list[str] = []

    async def wait_for_line(self, text: str) -> str:
        """The next line of stdout containing `text` (bounded)."""
        async with asyncio.timeout(HANG_GUARD):
            while True:
                assert self.process.stdout is not None
                line = await asyncio.to_thread(self.process.stdout.readline)
                assert line, f"exited with {self.process.wait()}: {self.stderr.read_text()}"
                self.lines.append(line)
                if text in line:
                    return line

    def kill(self) -> None:
        """Kill the process and its process group, and reap it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


class Cluster:
    """A scheduler at `address` (its state under the test's directory, kept across restarts)
    and the workers started by name."""

    def __init__(self, directory: Path, images: Path) -> None:
        """Nothing started yet; stores, states and logs go under `directory`, images come
        from `images`."""
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.directory = directory
        self.images = images
        self.scheduler: ClusterProcess | None = None
        self.metrics_url = ""
        self.workers: dict[str, ClusterProcess] = {}

    async def start_scheduler(self) -> None:
        """Start the scheduler (again, on the same port and state) and wait until it listens."""
        self.scheduler = ClusterProcess(
            [*CLUSTER, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--state-dir", str(self.directory / "scheduler-state"), "--metrics-port", "0"],
            self.directory / "scheduler.log")
        await self.scheduler.wait_for_line(f"scheduler listening at {self.address}")
        line = await self.scheduler.wait_for_line("metrics at ")
        self.metrics_url = line.strip().removeprefix("metrics at ")

    async def start_worker(self, name: str, pool: str, capacity: int = 1, *,
                           store: str | None = None) -> None:
        """Start worker `name` of `pool` on `store` with the store's default fetcher, or by
        default on an rsync store of its own (kept across restarts of the worker) with the
        busybox image directory; wait until the scheduler knows it."""
        if store is None:
            directory = self.directory / f"{name}-store"
            directory.mkdir(exist_ok=True)
            store, fetcher = f"rsync:{directory}", f"local:{self.images}"
        else:
            fetcher = None
        worker = ClusterProcess(
            worker_argv(self.address, name, pool, store, self.directory / f"{name}-state",
                        fetcher=fetcher, capacity=capacity),
            self.directory / f"{name}.log")
        self.workers[name] = worker
        await worker.wait_for_line(f"worker {name} of pool {pool} at tcp://")
        await self.wait_for_workers({name})

    async def wait_for_workers(self, names: set[str]) -> None:
        """Wait until the scheduler knows the workers `names`."""
        async with asyncio.timeout(HANG_GUARD), \
                Client(self.address, asynchronous=True, set_as_default=False) as client:
            while not names <= {info["name"] for info in
                                (await client.scheduler.identity())["workers"].values()}:
                await asyncio.sleep(0.1)

    async def metric(self, name: str, pool: str) -> float:
        """The value of the scheduler's metric `name` for `pool` (0 if it has none yet)."""
        text = await asyncio.to_thread(_fetch, self.metrics_url)
        found = re.search(rf'^{name}{{pool="{pool}"}} (\S+)$', text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    def stop(self) -> None:
        """Kill every process."""
        for process in [*self.workers.values(), self.scheduler]:
            if process is not None:
                process.kill()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HANG_GUARD) as response:
        return response.read().decode()


def command_output(log: bytes) -> str:
    """What the last step's command printed in the step log `log`: the lines after its header,
    without the builder's own marked lines (headers and outcomes)."""
    printed: list[str] = []
    for line in log.decode().splitlines(keepends=True):
        text = line.rstrip("\n")
        if not text.endswith(MARK.decode()):
            printed.append(line)
        elif parse_outcome(text.removesuffix(MARK.decode())) is None:
            printed = []  # the header of a next step
    return "".join(printed)


def sleeping(seconds: int) -> list[int]:
    """The processes running `sleep SECONDS`, found in /proc (a build's sandboxed process is
    found by a duration of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == \
                    f"sleep\0{seconds}\0".encode():
                found.append(int(entry.name))
        except OSError:
            pass  # a process that has just exited
    return found


@pytest.fixture
async def cluster(tmp_path: Path, busybox_images: Path) -> AsyncIterator[Cluster]:
    """A running scheduler, no worker yet."""
    directory = tmp_path / "cluster"
    directory.mkdir()
    running = Cluster(directory, busybox_images)
    try:
        await running.start_scheduler()
        yield running
    finally:
        running.stop()
