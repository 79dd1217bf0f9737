"""The client side of the build cluster: submit a `BuildRequest`, follow its events, get its
result id (the contract is `pipeline.cluster.protocol`).

One `ClusterClient` wraps one asynchronous Dask `Client` of a scheduler and one subscription to
the events topic, whose events it hands to the submission they belong to (by request id). A
submission (`ClusterBuild`) yields its `started` event, then its log chunks in `seq` order: a
chunk that arrives early waits for the ones before it, none is dropped, and a gap still open when
the task has ended fails the build loudly rather than losing log.

What Dask says of a build's end is turned into the build's outcome:

- the task's value: the result id (and the scheduler's plugin learns which worker has the
  cache hint's steps, `ENDED_HANDLER`);
- the task's error: raised as the worker raised it (e.g. the builder's `BuildError`);
- `KilledWorker` (the scheduler allows no retry: a build may have had effects): `WorkerLost`,
  "worker NAME was lost during the build";
- the scheduler went away ("scheduler-connection-lost"): once the client has reconnected, the
  build is submitted again under a new request id, its log starting again from chunk 0; a build
  that had ended is not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from distributed import Client, Event
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker

from pipeline.cluster.protocol import (
    ENDED_HANDLER,
    EVENTS_TOPIC,
    PLACE_HANDLER,
    BuildEvent,
    BuildOutcome,
    BuildRequest,
    cancel_event,
    event_from_message,
    task_key,
)

TASK = "pipeline.cluster.worker.run_build"
"""The import path of the task function every build runs (on a worker)."""

LOG_GAP_GRACE = 5.0
"""Seconds a build that has ended waits for log chunks missing before its last one (events and
the task's end travel on different scheduler messages) before it fails."""

RECONNECT_POLL = 0.1
"""Seconds between looks at whether a client that lost its scheduler has reconnected."""

SCHEDULER_LOST = "scheduler-connection-lost"
"""The reason Dask gives to the futures it cancels when the scheduler's connection is lost."""


class WorkerLost(Exception):
    """The worker running a build died: the build is not retried (it may have had effects)."""


class LogGap(Exception):
    """A build ended with log chunks missing before its last one."""


class _SchedulerLost(Exception):
    """The scheduler went away during a submission (it is submitted again on reconnection)."""


class _End:
    """The end of a submission's events (sentinel in its queue)."""


def new_request(spec: str, *, source: Any, pool: str, cache_hint: str | None, urgent: bool,
                client: str) -> BuildRequest:
    """A request for building `spec` with a fresh request id."""
    return BuildRequest(uuid.uuid4().hex, spec, source, pool, cache_hint, urgent, client)


class ClusterBuild:
    """One build submitted to the cluster.

    Iterate over it for its events: the `started` event of each submission (with the worker's
    name), then its log chunks in order; the iteration ends when the build has ended, and then
    `result()` gives the result id or raises why the build failed. Used as an async context
    manager, leaving it before the build has ended (e.g. its job was cancelled) cancels the
    build.
    """

    def __init__(self, request: BuildRequest) -> None:
        """A submission of `request`, not yet sent (see `ClusterClient.submit`)."""
        self.request = request
        """The current submission (a new one, with a new request id, after a scheduler
        restart)."""
        self.worker: str | None = None
        """The name of the worker running it, once started."""
        self._queue: asyncio.Queue[BuildEvent | _End] = asyncio.Queue()
        self._next_seq = 0
        self._early: dict[int, BuildEvent] = {}
        self._filled = asyncio.Event()
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._cancel: Callable[[], Awaitable[None]] | None = None

    # What the client (or a test's fake event source) feeds in.

    def deliver(self, event: BuildEvent) -> None:
        """Take one event of the current submission: `started` is passed on at once; a log chunk
        is passed on when every chunk before it has been."""
        if event.kind == "started":
            self.worker = event.worker
            self._queue.put_nowait(event)
            return
        if event.seq < self._next_seq or event.seq in self._early:
            return  # a copy of one already taken (the topic's history, replayed)
        self._early[event.seq] = event
        while self._next_seq in self._early:
            self._queue.put_nowait(self._early.pop(self._next_seq))
            self._next_seq += 1
        if not self._early:
            self._filled.set()

    def resubmitted(self, request: BuildRequest) -> None:
        """Start over as `request` (same build, new id): its chunks count from 0 again."""
        self.request = request
        self._next_seq = 0
        self._early.clear()

    async def settle(self, grace: float) -> None:
        """Wait up to `grace` seconds for the chunks missing before the last one received;
        raises `LogGap` naming them if they do not come."""
        if not self._early:
            return
        self._filled.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._filled.wait(), grace)
        if self._early:
            missing = sorted(set(range(self._next_seq, max(self._early))) - set(self._early))
            raise LogGap(f"the build's log lost chunks {missing[0]}..{missing[-1]} "
                         f"(of request {self.request.request_id})")

    def end(self, result: str | None = None, error: BaseException | None = None) -> None:
        """The build has ended with `result` (its result id) or `error`."""
        if self._done.done():
            return
        if isinstance(error, asyncio.CancelledError):
            self._done.cancel()  # result() raises CancelledError
        elif error is not None:
            self._done.set_exception(error)
        else:
            assert result is not None, "a build ends with a result or an error"
            self._done.set_result(result)
        self._queue.put_nowait(_End())

    # What the submitter uses.

    def __aiter__(self) -> ClusterBuild:
        """The events, in order, until the build ends."""
        return self

    async def __anext__(self) -> BuildEvent:
        """The next event (waiting for it can be cancelled without losing it)."""
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # for any later look: still ended
            raise StopAsyncIteration
        return item

    async def result(self) -> str:
        """The result id; raises the build's error."""
        return await self._done

    async def cancel(self) -> None:
        """Cancel the build (on its worker too) unless it has ended."""
        if not self._done.done() and self._cancel is not None:
            await self._cancel()

    async def __aenter__(self) -> ClusterBuild:
        """This build."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Cancel the build if it has not ended."""
        await asyncio.shield(self.cancel())


class ClusterClient:
    """A connection to a cluster's scheduler at `address`, for submitting builds."""

    def __init__(self, dask: Client, name: str) -> None:
        """Wrap the connected asynchronous Dask client `dask`; `name` is this client's name for
        the scheduler's fair share (see `connect`)."""
        self.dask = dask
        self.name = name
        self._builds: dict[str, ClusterBuild] = {}
        self._subscribed_to: object = None
        self._runs: set[asyncio.Task[None]] = set()
        self._subscribe()

    @classmethod
    async def connect(cls, address: str, *, name: str | None = None) -> ClusterClient:
        """A client of the scheduler at `address` (`tcp://HOST:PORT`); `name` (default: this
        host and process) is what the fair share counts builds by."""
        dask = await Client(address, asynchronous=True, set_as_default=False)
        return cls(dask, name or f"{socket.gethostname()}-{os.getpid()}")

    async def close(self) -> None:
        """Stop following builds and close the Dask client."""
        for run in self._runs:
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        await self.dask.close()

    def submit(self, request: BuildRequest) -> ClusterBuild:
        """Send `request` to the cluster; the build's events and outcome come through the
        `ClusterBuild` returned."""
        build = ClusterBuild(request)
        run = asyncio.get_running_loop().create_task(self._run(build),
                                                      name=f"build {request.request_id}")
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        return build

    def _subscribe(self) -> None:
        # A new scheduler knows no subscription: made again on each connection.
        self._subscribed_to = self.dask.scheduler_comm
        self.dask.subscribe_topic(EVENTS_TOPIC, self._dispatch)

    async def _dispatch(self, event: tuple[float, Any]) -> None:
        """Hand an event of the topic to its build (an event of no build of this client's, e.g.
        another client's, is not ours)."""
        build_event = event_from_message(event[1])
        build = self._builds.get(build_event.request_id)
        if build is None:
            return
        build.deliver(build_event)

    async def _reconnected(self) -> None:
        """Wait until the Dask client has a new connection to the scheduler (it reconnects by
        itself once it sees the old one closed), then follow the events topic on it."""
        while self.dask.status != "running" or self.dask.scheduler_comm is self._subscribed_to:
            if self.dask.status == "closed":
                raise ConnectionError("lost the cluster's scheduler and could not reconnect")
            await asyncio.sleep(RECONNECT_POLL)
        self._subscribe()

    async def _run(self, build: ClusterBuild) -> None:
        """Submit `build` until it ends (again after each scheduler restart) and end it."""
        try:
            build.end(await self._submit_until_ended(build))
        except asyncio.CancelledError:
            build.end(error=asyncio.CancelledError())
            raise
        except Exception as error:  # ended with it: the submitter sees it in result()
            build.end(error=error)

    async def _submit_until_ended(self, build: ClusterBuild) -> str:
        while True:
            request = build.request
            self._builds[request.request_id] = build
            try:
                outcome = await self._submit_once(build, request)
            except _SchedulerLost:
                await self._reconnected()
                build.resubmitted(replace(request, request_id=uuid.uuid4().hex))
                continue
            finally:
                del self._builds[request.request_id]
            return outcome.result

    async def _scheduler(self, handler: str, **arguments: Any) -> Any:
        """Call the scheduler's `handler`; raises `_SchedulerLost` if the scheduler is gone."""
        try:
            return await getattr(self.dask.scheduler, handler)(**arguments)
        except OSError as error:  # CommClosedError among them
            raise _SchedulerLost() from error

    async def _submit_once(self, build: ClusterBuild, request: BuildRequest) -> BuildOutcome:
        """One submission: placed by the scheduler's plugin, run as the task `TASK`."""
        placement = await self._scheduler(
            PLACE_HANDLER, pool=request.pool, cache_hint=request.cache_hint,
            client=request.client, urgent=request.urgent)
        module, _, function = TASK.rpartition(".")
        # The preferred workers are a soft preference (Dask: only given with a list).
        preference = ({"workers": placement["workers"], "allow_other_workers": True}
                      if placement["workers"] else {})
        future = self.dask.submit(
            getattr(importlib.import_module(module), function), request,
            key=task_key(request), resources={request.pool: 1},
            priority=placement["priority"], pure=False, **preference)

        async def cancel() -> None:
            await Event(cancel_event(request), client=self.dask).set()
            await self.dask.cancel([future], reason="the build was cancelled")

        build._cancel = cancel
        try:
            outcome: BuildOutcome = await future
        except FutureCancelledError as error:
            if error.reason == SCHEDULER_LOST:
                raise _SchedulerLost() from error
            raise asyncio.CancelledError() from error
        except KilledWorker as error:
            await self._ended(request, build.worker, ok=False)
            # Its name from its started event (Dask's error knows the worker by address).
            lost = build.worker or error.last_worker
            raise WorkerLost(f"worker {lost} was lost during the build") from None
        except Exception:  # the build's own error, raised on the worker
            await build.settle(LOG_GAP_GRACE)
            await self._ended(request, build.worker, ok=False)
            raise
        await build.settle(LOG_GAP_GRACE)
        await self._ended(request, outcome.worker, ok=True)
        return outcome

    async def _ended(self, request: BuildRequest, worker: str | None, *, ok: bool) -> None:
        """Tell the scheduler's plugin that the build ended on `worker` (a name)."""
        if worker is None:
            return  # it never started: no worker learnt anything
        # A scheduler gone now only misses what the build taught it: the build is not re-run.
        with contextlib.suppress(_SchedulerLost):
            await self._scheduler(ENDED_HANDLER, pool=request.pool,
                                  cache_hint=request.cache_hint, worker=worker,
                                  client=request.client, ok=ok)
