"""Measure builds on the build cluster against the in-process build primitive, in one run.

    python benchmarks/cluster.py --json

Starts a `pipeline cluster scheduler` and four `pipeline cluster worker`s (pool `linux-x86_64`,
capacity 1, each its own rsync store, busybox from a local image directory) on 127.0.0.1, and
one in-process `Builder` on its own store. Then, each through the cluster
(`pipeline.primitives.cluster.build_on_cluster`) and in-process
(`pipeline.primitives.obuilder.build_in_job`), each build in a job of its own:

- 500 fully cached builds of 10 specs (one cache hint each; every spec built once first on
  both sides): the per-job time one at a time (the cluster's overhead per job is its mean minus
  the in-process mean, in ms), the throughput with all 500 at once (jobs/s), and the affinity
  hit rate (the share of cluster builds that ran on the worker that built their hint first:
  overall, one at a time and all at once, with how many workers made the first builds);
- 100 one-step builds (each a new `run` step), all at once: throughput (jobs/s);
- log latency: a step printing 1,000 lines/s for 5 s, each stamped with the kernel's uptime
  (`/proc/uptime`, 10 ms resolution, the same clock outside the sandbox), against the uptime
  when the job's log receives it: median and 95th percentile (ms).

Needs root and runc (the workers build with runc, as the in-process builder does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from builder import make_image
from distributed import Client

import pipeline as p
from pipeline.jobs import Confirmation, JobRegistry
from pipeline.primitives.cluster import build_on_cluster, close_clients
from pipeline.primitives.obuilder import build_in_job

POOL = "linux-x86_64"
WORKERS = 4
CACHED_BUILDS = 500
CACHED_SPECS = 10
ONE_STEP_BUILDS = 100
LOG_SECONDS = 5
LOG_LINES_PER_TICK = 10
"""Lines per 10 ms tick of /proc/uptime: 1,000 lines/s."""
READY_TIMEOUT = 60


def cached_spec(n: int) -> str:
    return f'((from busybox) (run (shell "echo cached {n}")))'


def one_step_spec(n: int) -> str:
    return f'((from busybox) (run (shell "echo step {n} {time.time_ns()}")))'


def log_spec() -> str:
    # A busy loop (no process per line): each new uptime tick prints LOG_LINES_PER_TICK lines
    # stamped with it, until LOG_SECONDS have passed.
    script = (f'read start _ < /proc/uptime; last=""; end=$(( ${{start%.*}} + {LOG_SECONDS} )); '
              'while :; do read up _ < /proc/uptime; [ "${up%.*}" -ge "$end" ] && break; '
              'if [ "$up" != "$last" ]; then last=$up; '
              f'for i in {" ".join(str(i) for i in range(LOG_LINES_PER_TICK))}; '
              'do echo "stamp $up"; done; fi; done')
    return f"((from busybox) (run (shell {json.dumps(script)})))"


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


class Processes:
    """The scheduler and workers, each its own process group, killed at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.running.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline", "cluster", *args], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def wait_for_cluster(address: str, workers: int) -> None:
    """Wait until the scheduler at `address` answers and knows `workers` workers."""
    async with asyncio.timeout(READY_TIMEOUT):
        while True:
            try:
                async with Client(address, asynchronous=True, set_as_default=False,
                                  timeout=1) as client:
                    while len((await client.scheduler.identity())["workers"]) < workers:
                        await asyncio.sleep(0.1)
                    return
            except OSError:
                await asyncio.sleep(0.1)


class Runner:
    """Runs builds as jobs (made by a registry, as the engine makes them) on either side."""

    def __init__(self, state: Path, address: str, store: str, fetcher: str) -> None:
        self.registry = JobRegistry(state / "job", Confirmation())
        self.address = address
        self.store = store
        self.fetcher = fetcher
        self.workers: list[str] = []
        """The worker each cluster build ran on, in order."""

    async def _in_job(self, body: Callable[[p.Job], Awaitable[str]]) -> str:
        job = self.registry.create("benchmark")
        try:
            result = await body(job)
        except BaseException as error:
            job.finish(str(error))
            raise
        job.finish()
        return result

    async def cluster(self, spec: str, hint: str | None,
                      log: Callable[[bytes], None] | None = None) -> str:
        async def body(job: p.Job) -> str:
            result = await build_on_cluster(job, spec, None, pool=POOL, cluster=self.address,
                                            cache_hint=hint, log=log)
            self.workers.append(worker_of(job))
            return result
        return await self._in_job(body)

    async def in_process(self, spec: str) -> str:
        async def body(job: p.Job) -> str:
            await job.start(pool=None)
            return await build_in_job(job, spec, None, store=self.store, fetcher=self.fetcher)
        return await self._in_job(body)


def worker_of(job: p.Job) -> str:
    """The worker a cluster job's log says it ran on."""
    marker = "Running on worker "
    line = next(line for line in job.log_path.read_text().splitlines() if marker in line)
    return line.split(marker, 1)[1].strip()


async def timed(builds: list[Callable[[], Awaitable[str]]], *, at_once: bool) -> float:
    """Seconds to run `builds`, one at a time or all at once."""
    start = time.perf_counter()
    if at_once:
        await asyncio.gather(*(build() for build in builds))
    else:
        for build in builds:
            await build()
    return time.perf_counter() - start


async def measure(runner: Runner) -> dict[str, Any]:
    specs = [cached_spec(n) for n in range(CACHED_SPECS)]
    hints = [f"hint-{n}" for n in range(CACHED_SPECS)]
    first_worker = {}
    for spec, hint in zip(specs, hints, strict=True):
        await runner.in_process(spec)
        await runner.cluster(spec, hint)
        first_worker[hint] = runner.workers[-1]
    order = [n % CACHED_SPECS for n in range(CACHED_BUILDS)]

    runner.workers.clear()
    cluster_one = await timed([lambda n=n: runner.cluster(specs[n], hints[n]) for n in order],
                              at_once=False)
    local_one = await timed([lambda n=n: runner.in_process(specs[n]) for n in order],
                            at_once=False)
    cluster_all = await timed([lambda n=n: runner.cluster(specs[n], hints[n]) for n in order],
                              at_once=True)
    local_all = await timed([lambda n=n: runner.in_process(specs[n]) for n in order],
                            at_once=True)
    expected = [first_worker[hints[n]] for n in order]
    hits = [ran == wanted for ran, wanted in zip(runner.workers, expected * 2, strict=True)]

    cluster_steps = await timed([lambda n=n: runner.cluster(one_step_spec(n), None)
                                 for n in range(ONE_STEP_BUILDS)], at_once=True)
    local_steps = await timed([lambda n=n: runner.in_process(one_step_spec(n))
                               for n in range(ONE_STEP_BUILDS)], at_once=True)

    latencies: list[float] = []
    partial = bytearray()

    def on_log(data: bytes) -> None:
        now = uptime()
        partial.extend(data)
        *lines, rest = partial.split(b"\n")
        partial[:] = rest
        latencies.extend((now - float(line.split()[1])) * 1000 for line in lines
                         if line.startswith(b"stamp "))

    await runner.cluster(log_spec(), None, log=on_log)
    quantiles = statistics.quantiles(latencies, n=20)
    return {
        "cached_builds": CACHED_BUILDS,
        "cluster_cached_ms_per_job": 1000 * cluster_one / CACHED_BUILDS,
        "in_process_cached_ms_per_job": 1000 * local_one / CACHED_BUILDS,
        "cluster_overhead_ms_per_job": 1000 * (cluster_one - local_one) / CACHED_BUILDS,
        "cluster_cached_jobs_per_s": CACHED_BUILDS / cluster_all,
        "in_process_cached_jobs_per_s": CACHED_BUILDS / local_all,
        "affinity_hit_rate": sum(hits) / len(hits),
        # One at a time the preferred worker is always free; all at once its queue grows and
        # the placement rule sends builds elsewhere in the pool.
        "affinity_hit_rate_one_at_a_time": sum(hits[:len(order)]) / len(order),
        "affinity_hit_rate_all_at_once": sum(hits[len(order):]) / len(order),
        "workers_of_first_builds": len(set(first_worker.values())),
        "one_step_builds": ONE_STEP_BUILDS,
        "cluster_one_step_jobs_per_s": ONE_STEP_BUILDS / cluster_steps,
        "in_process_one_step_jobs_per_s": ONE_STEP_BUILDS / local_steps,
        "log_lines": len(latencies),
        "log_lines_per_s": len(latencies) / LOG_SECONDS,
        "log_latency_median_ms": statistics.median(latencies),
        "log_latency_p95_ms": quantiles[18],
    }


async def run(directory: Path) -> dict[str, Any]:
    images = make_image(directory)
    fetcher = f"local:{images}"
    processes = Processes(directory)
    port = 8786 + os.getpid() % 1000
    address = f"tcp://127.0.0.1:{port}"
    try:
        processes.start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--state-dir", str(directory / "scheduler"))
        for n in range(WORKERS):
            store = directory / f"worker-{n}"
            store.mkdir()
            processes.start(f"worker-{n}", "worker", address, "--pool", POOL, "--capacity",
                            "1", "--store", f"rsync:{store}", "--fetcher", fetcher,
                            "--name", f"worker-{n}",
                            "--state-dir", str(directory / f"worker-{n}-state"))
        await wait_for_cluster(address, WORKERS)
        local_store = directory / "in-process"
        local_store.mkdir()
        runner = Runner(directory / "state", address, f"rsync:{local_store}", fetcher)
        try:
            return await measure(runner)
        finally:
            await close_clients()
    finally:
        processes.stop()


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cluster-benchmark-") as directory:
        figures = asyncio.run(run(Path(directory)))
    print(json.dumps(figures, indent=None if options.json else 2))


if __name__ == "__main__":
    main()
