"""Where a build goes and in what order: the scheduler's rules, as pure functions.

**Cache affinity** (OCluster's rule). The hint table names the workers of a pool that built a
cache hint before; a build with that hint prefers the least loaded of them that can take work
(not paused, not draining, connected). A worker's *load* is the builds assigned to it (running,
or waiting there for one of its slots) per slot of its capacity. The preference is dropped (the
build may go anywhere in the pool) when even that worker's queue (builds waiting there for a
slot) is longer by more than one than the queue of the pool's least loaded worker: waiting
behind more than one extra build is taken to cost more than building afresh elsewhere.

**Priority** (Dask runs a higher priority first): `URGENT_PRIORITY` for an urgent build, minus
the number of builds its client already has queued or running in the pool. A client's builds
thus get 0, -1, -2, ... as it submits them, and another client's first build (0) goes before
the busy client's second: one busy client cannot starve another, and clients share a pool in
turns. An urgent build goes before every non-urgent one, and urgent builds share in turns
among themselves the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

URGENT_PRIORITY = 1_000_000
"""What being urgent adds to a build's priority: more than any client's queue can take away."""


@dataclass(frozen=True)
class WorkerLoad:
    """A connected worker of a pool and the builds assigned to it (running or waiting there)."""

    address: str
    name: str
    capacity: int
    assigned: int

    @property
    def running(self) -> int:
        """The builds running on the worker (each takes one of its `capacity` slots)."""
        return min(self.assigned, self.capacity)

    @property
    def queued(self) -> int:
        """The builds waiting on the worker for a slot."""
        return self.assigned - self.running

    @property
    def load(self) -> float:
        """Assigned builds per slot."""
        return self.assigned / self.capacity if self.capacity > 0 else float("inf")


def preferred_workers(pool: Collection[WorkerLoad], hinted: Collection[str]) -> list[str]:
    """The addresses a build should prefer, least loaded first: the workers of `pool` (those
    that can take work) named in `hinted` (names from the hint table) whose queue is not too
    long; [] means anywhere in the pool."""
    if not pool:
        return []
    shortest_queue = min(worker.queued for worker in pool)
    candidates = sorted((worker for worker in pool if worker.name in hinted),
                        key=lambda worker: (worker.load, worker.name))
    return [worker.address for worker in candidates if worker.queued <= shortest_queue + 1]


def priority(urgent: bool, active_builds: int) -> int:
    """The Dask priority of a build whose client has `active_builds` builds queued or running
    in the same pool."""
    return (URGENT_PRIORITY if urgent else 0) - active_builds
