"""Watched inputs: a `Monitor` reads a value from the world and says when to read it again.

A monitor is reference-counted by the engine: the first node that uses it installs the watch, `read`
runs only once the watch is installed (so no change between the read and the watch is missed),
refresh requests that arrive while a read is in progress are coalesced into one more read, and the
last release removes the watch.

A watch that cannot be installed (`watch` raises) fails the input with "cannot watch: ..." and
nothing is read: a value read without a watch would never be updated. The watch is tried again
after `WATCH_RETRY_FIRST_S`, then at doubling intervals up to `WATCH_RETRY_MAX_S`; only a watch
that succeeds, and the read after it, clear the failure. Between tries the monitor is idle, so
`pipeline run --once` ends with the failure rather than waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from pipeline.nodes import error_message
from pipeline.output import Active, Failed, NodeState, Ok, Output
from pipeline.term import Term, Watch

T = TypeVar("T")

Unwatch = Callable[[], Awaitable[None] | None]

WATCH_RETRY_FIRST_S = 1.0
"""Seconds from a failed watch to the next try; the interval doubles at each failure."""
WATCH_RETRY_MAX_S = 60.0
"""The longest interval between tries of a failing watch."""


class Monitor(Generic[T]):
    """Base class for a watched input.

    Subclasses implement `read` and, usually, `watch`. Monitors with equal `key` share one watch
    in an engine. Use `monitor.term` in a pipeline.
    """

    label: str = "monitor"

    @property
    def key(self) -> Hashable:
        """Identity of the watched thing: monitors with equal keys share one watch."""
        return (type(self), id(self))

    async def watch(self, refresh: Callable[[], None]) -> Unwatch | None:
        """Install the watch; call `refresh()` (from any thread) when the value may have changed.

        Returns a function that removes the watch, or None if there is nothing to remove.
        """
        return None

    async def read(self) -> T:
        """Read the current value; an exception makes the input an error until the next read."""
        raise NotImplementedError

    @property
    def term(self) -> Term[T]:
        """A term whose value is the monitored value."""
        return Watch(self)


class Watcher:
    """One installed watch of a monitor, shared by every node that uses the monitor.

    Notifies `listeners` with each new output. Created and released by the engine.
    """

    def __init__(self, monitor: Monitor[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.monitor = monitor
        self.output: Output = Active(NodeState.RUNNING)
        self.refcount = 0
        self.reads = 0
        self.listeners: set[Callable[[], None]] = set()
        self._loop = loop
        self._wanted = asyncio.Event()
        self._busy = True
        # False until the watch is installed: refreshes before that wait for it (and keep the
        # monitor idle), since the read that follows a successful watch covers them.
        self._watching = False
        self._task: asyncio.Task[None] | None = None
        self._on_idle_change: Callable[[], None] = lambda: None

    @property
    def busy(self) -> bool:
        """Whether a read is pending or in progress."""
        return self._busy

    def start(self, on_idle_change: Callable[[], None]) -> None:
        """Install the watch and read in a background task."""
        self._on_idle_change = on_idle_change
        self._task = self._loop.create_task(self._run(), name=f"monitor {self.monitor.label}")

    def refresh(self) -> None:
        """Ask for another read; safe to call from any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._request()
        else:
            self._loop.call_soon_threadsafe(self._request)

    def _request(self) -> None:
        self._wanted.set()
        if self._watching:
            self._set_busy(True)

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self._on_idle_change()

    async def stop(self) -> None:
        """Remove the watch."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _publish(self, output: Output) -> None:
        if output != self.output:
            self.output = output
            for listener in tuple(self.listeners):
                listener()

    async def _run(self) -> None:
        unwatch = None
        try:
            unwatch = await self._install_watch()
            self._watching = True
            self._wanted.set()
            while True:
                await self._wanted.wait()
                self._wanted.clear()
                self._busy = True
                try:
                    value = await self.monitor.read()
                except Exception as exc:
                    output: Output = Failed(error_message(exc, with_type=False))
                else:
                    output = Ok(value)
                self.reads += 1
                self._publish(output)
                if not self._wanted.is_set():
                    self._set_busy(False)
        finally:
            self._busy = False
            if unwatch is not None:
                result = unwatch()
                if asyncio.iscoroutine(result):
                    await result

    async def _install_watch(self) -> Unwatch | None:
        """The monitor's watch, tried until it is installed; failed and idle between tries."""
        delay = WATCH_RETRY_FIRST_S
        while True:
            try:
                return await self.monitor.watch(self.refresh)
            except Exception as exc:
                self._publish(Failed(f"cannot watch: {error_message(exc, with_type=False)}"))
            self._set_busy(False)
            await asyncio.sleep(delay)
            delay = min(2 * delay, WATCH_RETRY_MAX_S)
            self._set_busy(True)
