"""Builds that the tests of the cluster's scheduler hold and release: the workers run in the
tests' process, so a build can wait until the test says it may finish.

A module of its own, because Dask's scheduler unpickles every task's function: the scheduler's
process imports this module (with `tests/` on its path), not the whole test file."""

from __future__ import annotations

import asyncio

from distributed import get_worker

from pipeline.cluster.protocol import BuildRequest

RELEASED: set[str] = set()
"""The request ids of the builds the test has released."""
POLL = 0.005
"""Seconds between a held build's looks at `RELEASED`."""
STARTED: list[str] = []
"""The request ids of the held builds, in the order they started."""


async def held_build(request: BuildRequest) -> str:
    """A build that starts, waits until the test releases it, and returns its worker's name
    (or fails, if its spec says so)."""
    STARTED.append(request.request_id)
    while request.request_id not in RELEASED:
        await asyncio.sleep(POLL)
    if request.spec == "fail":
        raise RuntimeError("the build failed")
    return str(get_worker().name)


def release(request_id: str) -> None:
    """Let the build `request_id` finish."""
    RELEASED.add(request_id)
