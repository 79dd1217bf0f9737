"""`pipeline cluster scheduler [--host H] [--port P] [--state-dir DIR] [--metrics-port N]`:
Dask's own scheduler, with `ClusterPlugin` keeping the cluster's pools, workers and cache-hint
table in SQLite under DIR (`pipeline.cluster.scheduler_state`), answering the handlers of
`pipeline.cluster.protocol` and counting builds for Prometheus.

A worker belongs to the pool named by the resource it offers (`--resources "linux-x86_64=2"`:
pool `linux-x86_64`, capacity 2; one pool per worker). A build is the Dask task whose key starts
with `BUILD_KEY_PREFIX` (`protocol.task_key`), restricted to one slot of its pool's resource.

Pause and drain use Dask's own worker status on the scheduler, so that Dask itself gives no new
task to such a worker: paused, or closing gracefully while draining (once its builds have ended,
Dask's `retire_workers` closes it). Builds a paused worker already holds (running, or waiting
there for a slot) still run there. The status is held: if the worker reports a status of its own
(it resumes after a pause of its own, or reconnects), the held one is put back.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sqlite3
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
from distributed import Scheduler, SchedulerPlugin
from distributed.core import Status
from distributed.scheduler import TaskState, WorkerState

from pipeline.cluster.cli import EXIT_USAGE, UsageParser, port
from pipeline.cluster.placement import WorkerLoad, preferred_workers, priority
from pipeline.cluster.protocol import (
    ADMIN_HANDLER,
    ENDED_HANDLER,
    PLACE_HANDLER,
    BuildRequest,
)
from pipeline.cluster.scheduler_metrics import SchedulerMetrics
from pipeline.cluster.scheduler_state import SchedulerState, WorkerRecord

BUILD_KEY_PREFIX = "pipeline-build-"
"""What `protocol.task_key` starts every build's key with."""

PLACEMENT_WINDOW = 30.0
"""Seconds during which a placed build not yet submitted still counts in its client's share (a
client places a build, then submits it: the submission may arrive after the next placement)."""

DRAIN_POLL = 0.1
"""Seconds between two looks at a draining worker's builds."""

RETIRE_RETRY = 2.0
"""Seconds before retiring a drained worker again when Dask could not (it holds results that no
other worker can take yet)."""

ADMIN_STIMULUS = "pipeline-admin"
"""The prefix of the Dask stimulus ids of the status changes this plugin makes."""

BUILDING_STATES = ("waiting", "no-worker", "queued", "processing")
"""The Dask task states of a build that has neither finished nor been cancelled."""


@dataclass(frozen=True)
class LiveBuild:
    """A build that Dask holds and that has not ended: its pool and its client."""

    pool: str
    client: str


def worker_pool(ws: WorkerState) -> str | None:
    """The pool of a worker: the (one) resource it offers; None for a worker offering none."""
    return min(ws.resources) if ws.resources else None


def _request_of(ts: TaskState) -> BuildRequest | None:
    """The build request among a task's arguments, if it has one."""
    for arg in getattr(ts.run_spec, "args", ()):
        if isinstance(arg, BuildRequest):
            return arg
    return None


class ClusterPlugin(SchedulerPlugin):
    """The cluster's state on the Dask scheduler: the hint table, paused and draining workers,
    the builds in flight per pool and client, and the handlers of `pipeline.cluster.protocol`.

    Everything runs on the scheduler's event loop (Dask calls the hooks and handlers there)."""

    name = "pipeline-cluster"

    def __init__(self, state: SchedulerState, metrics: SchedulerMetrics) -> None:
        self.state = state
        self.metrics = metrics
        self.scheduler: Scheduler | None = None
        self.live: dict[str, LiveBuild] = {}
        self.active: Counter[tuple[str, str]] = Counter()
        self.live_per_pool: Counter[str] = Counter()
        self.placements: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)
        """When each (pool, client)'s builds placed but not yet submitted were placed."""
        self.names: dict[str, str] = {}
        """Worker address -> name, kept after it leaves (a build's end may come later)."""
        self.reported: dict[str, Status] = {}
        """Worker address -> the status the worker itself last reported."""
        self.drains: dict[str, asyncio.Task[None]] = {}

    async def start(self, scheduler: Scheduler) -> None:
        """Register the protocol's handlers on `scheduler`."""
        self.scheduler = scheduler
        scheduler.handlers[PLACE_HANDLER] = self.place
        scheduler.handlers[ENDED_HANDLER] = self.ended
        scheduler.handlers[ADMIN_HANDLER] = self.admin
        for pool in self.state.pools():
            self._refresh_pool(pool)

    async def close(self) -> None:
        """Stop the drains in progress."""
        for task in list(self.drains.values()):
            task.cancel()

    # -- Dask's hooks --------------------------------------------------------------------------

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        """Record a worker that connected and put back the status an administrator gave it."""
        ws = scheduler.workers[worker]
        pool = worker_pool(ws)
        if pool is None:
            return
        name = str(ws.name)
        self.names[worker] = name
        record = self.state.worker_seen(name, pool, int(ws.resources[pool]), worker)
        if record.paused or record.draining:
            self._apply_status(worker)
        if record.draining:
            self._start_drain(worker)
        self._refresh_pool(pool)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        """Record that a worker left."""
        name = self.names.get(worker)
        self.reported.pop(worker, None)
        record = self.state.worker(name) if name else None
        if record is None or record.address != worker:
            return  # not a pool's worker, or one that has reconnected elsewhere since
        self.state.worker_left(record.name)
        self._refresh_pool(record.pool)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Follow builds through Dask's task states for the metrics and the fair share."""
        if not (isinstance(key, str) and key.startswith(BUILD_KEY_PREFIX)):
            return
        build = self.live.get(key)
        if build is None:
            if finish not in BUILDING_STATES:
                return
            build = self._new_build(key)
            if build is None:
                return
        elif finish in ("memory", "erred"):
            outcome = "ok" if finish == "memory" else "failed"
            self.metrics.finished.labels(build.pool, outcome).inc()
            self._end(key)
        elif finish == "forgotten":
            self.metrics.cancelled.labels(build.pool).inc()
            self._end(key)
        self._refresh_pool(build.pool)

    def log_event(self, topic: str, msg: Any) -> None:
        """Note a worker's own status changes; put back a held status the worker dropped."""
        if not (isinstance(msg, dict) and msg.get("action") == "worker-status-change"):
            return
        if str(msg.get("stimulus_id", "")).startswith(ADMIN_STIMULUS):
            return
        status = Status[msg["status"]]
        self.reported[topic] = status
        if status == Status.running and self._held_status(topic) is not None:
            # Not from inside this hook: Dask is in the middle of applying the change.
            asyncio.get_running_loop().call_soon(self._apply_status, topic)

    # -- the protocol's handlers ---------------------------------------------------------------

    def place(self, pool: str, cache_hint: str | None, client: str, urgent: bool
              ) -> dict[str, Any]:
        """`PLACE_HANDLER`: the workers a build should prefer ([]: anywhere in the pool) and
        its priority (see `pipeline.cluster.placement`)."""
        hinted = self.state.hinted_workers(pool, cache_hint) if cache_hint else {}
        workers = preferred_workers(self._pool_loads(pool, available_only=True), hinted) \
            if hinted else []
        build_priority = priority(urgent, self._active_builds(pool, client))
        self.placements[(pool, client)].append(time.monotonic())
        return {"workers": workers, "priority": build_priority}

    def ended(self, pool: str, cache_hint: str | None, worker: str, client: str, ok: bool
              ) -> None:
        """`ENDED_HANDLER`: a build of `pool` ended on `worker` (an address). The hint table
        learns that the worker has the hint's steps (a failed build has built some of them
        too); a build whose hint the table knew counts as an affinity hit if it ran on a worker
        the table named, else as a miss (a hint's first build counts as neither)."""
        if not cache_hint:
            return
        name = self.names.get(worker, worker)
        hinted = self.state.hinted_workers(pool, cache_hint)
        if hinted:
            counter = self.metrics.affinity_hits if name in hinted else \
                self.metrics.affinity_misses
            counter.labels(pool).inc()
        self.state.built(pool, cache_hint, name)

    def admin(self, command: str, worker: str | None = None) -> dict[str, Any]:
        """`ADMIN_HANDLER`: `show` -> {"pools": [...], "workers": [...]}; `pause`, `unpause`,
        `drain`, `forget` a worker (by name or address) -> {"done": message}. A refusal (an
        unknown worker or command, forgetting a connected worker) -> {"error": message}."""
        if command == "show":
            return self._show()
        actions = {"pause": self._pause, "unpause": self._unpause, "drain": self._drain,
                   "forget": self._forget}
        if command not in actions:
            return {"error": f"unknown command {command!r}"}
        record = self._find_worker(worker or "")
        if record is None:
            return {"error": f"unknown worker {worker!r}"}
        return actions[command](record)

    # -- administration ------------------------------------------------------------------------

    def _pause(self, record: WorkerRecord) -> dict[str, Any]:
        self.state.set_paused(record.name, True)
        self._apply_named_status(record)
        return {"done": f"worker {record.name} paused"}

    def _unpause(self, record: WorkerRecord) -> dict[str, Any]:
        # Unpausing also stops a drain that has not finished: the worker takes work again.
        self.state.set_paused(record.name, False)
        self.state.set_draining(record.name, False)
        self._apply_named_status(record)
        return {"done": f"worker {record.name} unpaused"}

    def _drain(self, record: WorkerRecord) -> dict[str, Any]:
        address = self._connected_address(record)
        if address is None:
            return {"error": f"worker {record.name} is not connected"}
        self.state.set_draining(record.name, True)
        self._apply_status(address)
        self._start_drain(address)
        return {"done": f"worker {record.name} draining: it takes no new build and leaves "
                        "once its builds have ended"}

    def _forget(self, record: WorkerRecord) -> dict[str, Any]:
        if self._connected_address(record) is not None:
            return {"error": f"worker {record.name} is connected: drain it first"}
        self.state.forget(record.name)
        return {"done": f"worker {record.name} forgotten"}

    def _show(self) -> dict[str, Any]:
        assert self.scheduler is not None
        pools = []
        # A pool with builds waiting but no worker yet is shown too: that is why they wait.
        waiting = {pool for pool, count in self.live_per_pool.items() if count}
        for pool in sorted(set(self.state.pools()) | waiting):
            loads = self._pool_loads(pool, available_only=False)
            running = sum(load.running for load in loads)
            pools.append({"name": pool, "workers": len(loads),
                          "capacity": sum(load.capacity for load in loads),
                          "running": running, "queued": self.live_per_pool[pool] - running})
        workers = []
        for record in self.state.workers():
            address = self._connected_address(record)
            row: dict[str, Any] = {"name": record.name, "pool": record.pool,
                                   "address": address or record.address,
                                   "connected": address is not None,
                                   "capacity": record.capacity, "running": 0, "queued": 0,
                                   "paused": record.paused, "draining": record.draining,
                                   "last_seen": record.last_seen}
            if address is not None:
                ws = self.scheduler.workers[address]
                load = self._load(ws, record.pool)
                row.update(capacity=load.capacity, running=load.running, queued=load.queued,
                           last_seen=ws.last_seen)
                free_disk = ws.metrics.get("free_disk", ws.extra.get("free_disk"))
                if free_disk is not None:
                    row["free_disk"] = free_disk
            workers.append(row)
        return {"pools": pools, "workers": workers}

    def _find_worker(self, worker: str) -> WorkerRecord | None:
        """The record of the worker named `worker`, or connected (else last seen) at it."""
        record = self.state.worker(worker)
        if record is None and worker in self.names:
            record = self.state.worker(self.names[worker])
        if record is None:
            record = next((known for known in self.state.workers() if known.address == worker),
                          None)
        return record

    def _connected_address(self, record: WorkerRecord) -> str | None:
        """The address of the worker of `record` if it is connected."""
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(record.address)
        return record.address if ws is not None and str(ws.name) == record.name else None

    def _held_status(self, address: str) -> Status | None:
        """The status an administrator gave the worker at `address`, if any."""
        name = self.names.get(address)
        record = self.state.worker(name) if name else None
        if record is None or record.address != address:
            return None
        if record.draining:
            return Status.closing_gracefully
        return Status.paused if record.paused else None

    def _apply_named_status(self, record: WorkerRecord) -> None:
        address = self._connected_address(record)
        if address is not None:
            self._apply_status(address)

    def _apply_status(self, address: str) -> None:
        """Give the connected worker at `address` its held status on the scheduler, or, if it
        has none, the status it last reported itself (running unless it paused itself)."""
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return
        status = self._held_status(address) or self.reported.get(address, Status.running)
        self.scheduler.handle_worker_status_change(
            status, ws, stimulus_id=f"{ADMIN_STIMULUS}-{time.time()}")
        pool = worker_pool(ws)
        if pool is not None:
            self._refresh_pool(pool)

    def _start_drain(self, address: str) -> None:
        if address not in self.drains:
            self.drains[address] = asyncio.get_running_loop().create_task(
                self._retire_when_idle(address))

    async def _retire_when_idle(self, address: str) -> None:
        """Wait until the draining worker at `address` has no build left, then retire it with
        Dask's `retire_workers` (which moves the results it holds elsewhere and closes it)."""
        assert self.scheduler is not None
        try:
            while self._held_status(address) == Status.closing_gracefully:
                ws = self.scheduler.workers.get(address)
                if ws is None:
                    return
                if ws.processing:
                    await asyncio.sleep(DRAIN_POLL)
                    continue
                retired = await self.scheduler.retire_workers(
                    workers=[address], close_workers=True,
                    stimulus_id=f"{ADMIN_STIMULUS}-drain-{time.time()}")
                if address in retired:
                    return
                await asyncio.sleep(RETIRE_RETRY)
        finally:
            self.drains.pop(address, None)

    # -- builds in flight ----------------------------------------------------------------------

    def _new_build(self, key: str) -> LiveBuild | None:
        """Start following the build `key` (None if it names no pool)."""
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return None
        request = _request_of(ts)
        restrictions = ts.resource_restrictions or {}
        pool = request.pool if request else min(restrictions, default=None)
        if pool is None:
            return None
        # Without a request (a task not sent by our client), its Dask client stands for it.
        client = request.client if request else min(cs.client_key for cs in ts.who_wants or ())
        build = LiveBuild(pool, client)
        self.live[key] = build
        self.active[(pool, client)] += 1
        self.live_per_pool[pool] += 1
        placed = self.placements.get((pool, client))
        if placed:
            placed.popleft()
        self.metrics.submitted.labels(pool).inc()
        return build

    def _end(self, key: str) -> None:
        build = self.live.pop(key)
        self.active[(build.pool, build.client)] -= 1
        self.live_per_pool[build.pool] -= 1

    def _active_builds(self, pool: str, client: str) -> int:
        """The builds of `client` queued or running in `pool`, and those it placed lately but
        whose task has not arrived yet."""
        placed = self.placements[(pool, client)]
        expired = time.monotonic() - PLACEMENT_WINDOW
        while placed and placed[0] < expired:
            placed.popleft()
        return self.active[(pool, client)] + len(placed)

    def _load(self, ws: WorkerState, pool: str) -> WorkerLoad:
        assigned = sum(1 for ts in ws.processing if ts.key in self.live)
        return WorkerLoad(ws.address, str(ws.name), int(ws.resources.get(pool, 0)), assigned)

    def _pool_loads(self, pool: str, *, available_only: bool) -> list[WorkerLoad]:
        """The connected workers of `pool` (only those taking work if `available_only`)."""
        assert self.scheduler is not None
        return [self._load(ws, pool) for ws in self.scheduler.workers.values()
                if worker_pool(ws) == pool
                and (ws.status == Status.running or not available_only)]

    def _refresh_pool(self, pool: str) -> None:
        """Set `pool`'s gauges from the scheduler's state."""
        loads = self._pool_loads(pool, available_only=False)
        running = sum(load.running for load in loads)
        self.metrics.running.labels(pool).set(running)
        self.metrics.queued.labels(pool).set(self.live_per_pool[pool] - running)
        self.metrics.capacity.labels(pool).set(sum(load.capacity for load in loads))
        self.metrics.workers.labels(pool).set(len(loads))
        available = len(self._pool_loads(pool, available_only=True))
        self.metrics.paused.labels(pool).set(len(loads) - available)


def build_parser() -> UsageParser:
    """The options of `pipeline cluster scheduler`."""
    parser = UsageParser(prog="pipeline cluster scheduler",
                         description="Run the build cluster's Dask scheduler.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the interface to listen on (default 127.0.0.1; Dask has no "
                             "authentication: open it only to trusted machines)")
    parser.add_argument("--port", type=port, default=8786, help="default 8786; 0: any free port")
    parser.add_argument("--state-dir", metavar="DIR", type=Path, default=Path("var/scheduler"),
                        help="where the pools, workers and cache-hint table are kept "
                             "(default var/scheduler)")
    parser.add_argument("--metrics-port", metavar="N", type=port,
                        help="serve Prometheus metrics on this port (0: any free port)")
    return parser


def main(args: list[str]) -> int:
    """Run `pipeline cluster scheduler ...` until SIGINT or SIGTERM; its exit status."""
    options = build_parser().parse_args(args)
    try:
        state = SchedulerState(options.state_dir)
    except (OSError, sqlite3.Error) as exc:
        print(f"pipeline cluster scheduler: --state-dir {options.state_dir}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_serve(options.host, options.port, options.metrics_port, state))
    finally:
        state.close()


async def _serve(host: str, scheduler_port: int, metrics_port: int | None,
                 state: SchedulerState) -> int:
    # No silent retry of a build on another worker when its worker dies: the client sees it.
    dask.config.set({"distributed.scheduler.allowed-failures": 0})
    dashboard = importlib.util.find_spec("bokeh") is not None
    scheduler = Scheduler(host=host, port=scheduler_port, dashboard=dashboard,
                          dashboard_address=f"{host}:{8787 if dashboard else 0}")
    metrics = SchedulerMetrics()
    scheduler.add_plugin(ClusterPlugin(state, metrics))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await scheduler
    except RuntimeError as exc:
        # Dask wraps the reason it could not listen (a port in use, an unknown host).
        if not isinstance(exc.__cause__, OSError):
            raise
        print(f"pipeline cluster scheduler: cannot listen on {host}:{scheduler_port}: "
              f"{exc.__cause__}", file=sys.stderr)
        return EXIT_USAGE
    try:
        print(f"scheduler listening at {scheduler.address}", flush=True)
        if dashboard:
            print(f"dashboard at {scheduler.dashboard_link}", flush=True)
        if metrics_port is not None:
            try:
                served = metrics.serve(host, metrics_port)
            except OSError as exc:
                print(f"pipeline cluster scheduler: cannot serve metrics on {host}:"
                      f"{metrics_port}: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(f"metrics at http://{host}:{served}/metrics", flush=True)
        await stop.wait()
    finally:
        await scheduler.close()
    return 0
