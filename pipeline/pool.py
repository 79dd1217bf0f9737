"""Pools limit how many jobs use a resource at once (OCurrent's `Current.Pool`).

Waiters are served in FIFO order within a priority, and every high-priority waiter goes before any
normal one: the engine makes a job with no previous outcome high priority, so new work is not stuck
behind routine rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType
from typing import Any


class PoolSlot:
    """The right to use one unit of a pool's capacity, until :meth:`release` is called.

    Also a synchronous context manager: ``with slot:`` releases the slot on exit.
    """

    def __init__(self, pool: Pool) -> None:
        """Create a slot counted against `pool`; only :class:`Pool` makes these."""
        self._pool = pool
        self._released = False

    @property
    def pool(self) -> Pool:
        """The pool this slot belongs to."""
        return self._pool

    @property
    def released(self) -> bool:
        """Whether the slot has been given back."""
        return self._released

    def release(self) -> None:
        """Give the slot back to the pool, waking the next waiter. Calling it again does nothing."""
        if self._released:
            return
        self._released = True
        self._pool._slot_released()

    def __enter__(self) -> PoolSlot:
        """Return the slot itself; it is released when the block exits."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the slot, whether or not the block raised."""
        self.release()

    def __repr__(self) -> str:
        """Show the pool and whether the slot is still held."""
        status = "released" if self._released else "held"
        return f"<PoolSlot {self._pool.name!r} {status}>"


class Pool:
    """A named resource that at most `capacity` holders may use at the same time.

    Not thread-safe: use it from one event loop.
    """

    def __init__(self, name: str, capacity: int) -> None:
        """Create an empty pool. A capacity of 0 holds every acquirer until it is raised."""
        _check_capacity(capacity)
        self._name = name
        self._capacity = capacity
        self._in_use = 0
        self._high: deque[asyncio.Future[PoolSlot]] = deque()
        self._normal: deque[asyncio.Future[PoolSlot]] = deque()

    @property
    def name(self) -> str:
        """The pool's name, as shown in the web UI and metrics."""
        return self._name

    @property
    def capacity(self) -> int:
        """How many slots may be held at once."""
        return self._capacity

    @property
    def in_use(self) -> int:
        """How many slots are held now (may exceed `capacity` just after it was lowered)."""
        return self._in_use

    @property
    def queue_length(self) -> int:
        """How many acquirers are waiting for a slot."""
        return len(self._high) + len(self._normal)

    async def acquire(self, *, high_priority: bool = False) -> PoolSlot:
        """Wait for a free slot and return it.

        Returns without suspending if a slot is free and nobody is queued. Otherwise the caller
        queues behind earlier waiters of its priority and behind every high-priority waiter. If the
        awaiting task is cancelled it leaves the queue holding nothing; a slot granted to it at the
        very moment of cancellation is handed back to the pool.
        """
        waiter: asyncio.Future[PoolSlot] = asyncio.get_running_loop().create_future()
        queue = self._high if high_priority else self._normal
        queue.append(waiter)
        # Granting through the queue keeps one code path for the free and the busy case; awaiting
        # an already-resolved future does not suspend, so a free slot is still returned at once.
        self._grant_waiters()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                waiter.result().release()
            else:
                # _grant_waiters may already have dropped this cancelled waiter from the queue.
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    def set_capacity(self, capacity: int) -> None:
        """Change the capacity.

        Growing it serves waiters at once. Shrinking it revokes no slot: it only makes acquirers
        wait until enough holders have released theirs.
        """
        _check_capacity(capacity)
        self._capacity = capacity
        self._grant_waiters()

    def stats(self) -> dict[str, Any]:
        """Return the pool's name, capacity, in_use and queue_length, e.g. for /metrics."""
        return {
            "name": self._name,
            "capacity": self._capacity,
            "in_use": self._in_use,
            "queue_length": self.queue_length,
        }

    def __repr__(self) -> str:
        """Summarise the pool's use."""
        return (
            f"<Pool {self._name!r} {self._in_use}/{self._capacity} in use, "
            f"{self.queue_length} queued>"
        )

    def _slot_released(self) -> None:
        self._in_use -= 1
        self._grant_waiters()

    def _grant_waiters(self) -> None:
        while self._in_use < self._capacity:
            waiter = self._next_waiter()
            if waiter is None:
                return
            self._in_use += 1
            waiter.set_result(PoolSlot(self))

    def _next_waiter(self) -> asyncio.Future[PoolSlot] | None:
        for queue in (self._high, self._normal):
            while queue:
                waiter = queue.popleft()
                # A waiter cancelled but not yet resumed is still queued; it must not get a slot.
                if not waiter.done():
                    return waiter
        return None


def _check_capacity(capacity: int) -> None:
    if capacity < 0:
        raise ValueError(f"pool capacity must be at least 0, not {capacity}")
