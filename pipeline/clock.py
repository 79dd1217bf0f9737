"""Clocks: the time source for job timestamps and `schedule(valid_for=...)` expiry.

The engine takes any `Clock`; tests use `FakeClock` to move time forward without waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Timer(Protocol):
    """A pending call that can be cancelled."""

    def cancel(self) -> None:
        """Do not make the call."""


class Clock(Protocol):
    """The current time and timers."""

    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""

    def call_at(self, when: datetime, callback: Callable[[], None]) -> Timer:
        """Call `callback` on the event loop once `now() >= when`."""


class SystemClock:
    """The real time, with timers on the running event loop."""

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    def call_at(self, when: datetime, callback: Callable[[], None]) -> Timer:
        """Call `callback` once `when` has passed."""
        delay = max(0.0, (when - self.now()).total_seconds())
        return asyncio.get_running_loop().call_later(delay, callback)


class _FakeTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that only moves when told to: `advance(timedelta)` runs the timers that fall due."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._timers: list[tuple[datetime, int, _FakeTimer]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    def call_at(self, when: datetime, callback: Callable[[], None]) -> Timer:
        """Call `callback` when `advance` reaches `when`."""
        timer = _FakeTimer(callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def advance(self, delta: timedelta) -> None:
        """Move time forward by `delta`, calling every timer that falls due, in order.

        Raises RuntimeError if timers keep re-arming themselves within the interval: a loop
        that would otherwise never end.
        """
        target = self._now + delta
        calls = 0
        while self._timers and self._timers[0][0] <= target:
            calls += 1
            if calls > 100_000:
                raise RuntimeError("FakeClock.advance: timers keep re-arming within the interval")
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not timer.cancelled:
                timer.callback()
        self._now = target
