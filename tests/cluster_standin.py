"""STAND-IN, until the cluster's own processes are merged: what `pipeline.cluster.worker`
(`run_build`) and the scheduler plugin of `pipeline.cluster.scheduler` (`PLACE_HANDLER`,
`ENDED_HANDLER`) do, reduced to the contract of `pipeline.cluster.protocol`, so that the
client's tests run real Dask processes (`dask scheduler|worker --preload THIS_FILE`).

`run_build` runs the request's spec text as a shell command (not a sandboxed build): its output
is the step log, sent as numbered `log` events after a `started` one; setting the request's
cancel event kills the command; a non-zero exit fails the build with the builder's
`BuildError`. The scheduler's handlers place every build anywhere in its pool (urgent ones
first) and record the ends they are told of (`standin_ended` reads them).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from dataclasses import asdict
from typing import Any

from distributed import Scheduler, get_worker

from pipeline.cluster.protocol import (
    ENDED_HANDLER,
    EVENTS_TOPIC,
    PLACE_HANDLER,
    BuildEvent,
    BuildOutcome,
    BuildRequest,
    cancel_event,
)
from pipeline.obuilder.protocols import BuildError

CHUNK = 65536


async def run_build(request: BuildRequest) -> BuildOutcome:
    """Run `request.spec` as a shell command on this worker, streaming its output as events."""
    worker = get_worker()
    worker.log_event(EVENTS_TOPIC,
                     asdict(BuildEvent(request.request_id, "started", worker.name)))
    process = await asyncio.create_subprocess_shell(
        request.spec, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)

    async def kill_when_cancelled() -> None:
        await worker.scheduler.event_wait(name=cancel_event(request), timeout=None)
        os.killpg(process.pid, signal.SIGKILL)

    watcher = asyncio.create_task(kill_when_cancelled())
    try:
        assert process.stdout is not None
        seq = 0
        while chunk := await process.stdout.read(CHUNK):
            worker.log_event(EVENTS_TOPIC, asdict(
                BuildEvent(request.request_id, "log", worker.name, seq, chunk)))
            seq += 1
        status = await process.wait()
    finally:
        watcher.cancel()
    if status != 0:
        raise BuildError(f"command exited with status {status}")
    return BuildOutcome(hashlib.sha256(request.spec.encode()).hexdigest(), worker.name)


def dask_setup(server: Any) -> None:
    """Preload hook: on the scheduler, the plugin's handlers."""
    if not isinstance(server, Scheduler):
        return
    ended: list[dict[str, Any]] = []

    def place(pool: str, cache_hint: str | None, client: str, urgent: bool) -> dict[str, Any]:
        return {"workers": [], "priority": 1 if urgent else 0}

    def end(**report: Any) -> None:
        ended.append(report)

    server.handlers[PLACE_HANDLER] = place
    server.handlers[ENDED_HANDLER] = end
    server.handlers["standin_ended"] = lambda: ended
