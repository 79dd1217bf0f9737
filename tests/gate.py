"""`Gate`: holds build steps that must overlap in time, without waiting for time to pass.

A gate is a small HTTP server on the host that a step with `(network host)` calls with busybox's
`wget` (`gated`). It counts the calls (so a test knows how many times a step really ran), holds
its answer until the test opens it, and notices when a caller hangs up (so a test knows the
sandboxed process was killed). The `gate` fixture starts one per test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from obuilder_fixtures import HANG_GUARD


class Gate:
    """An HTTP server counting calls per path and holding every answer until `open()`."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.hung_up: Counter[str] = Counter()
        self.port = 0
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def call(self, name: str) -> str:
        """A shell command calling the gate (the step then needs `(network host)`)."""
        return f"wget -q -O- {self.url(name)}"

    def open(self) -> None:
        self._opened.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(HANG_GUARD):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        name = request.split()[1].decode().lstrip("/")
        self.calls[name] += 1
        self._changed.set()
        # The caller sends nothing more: the read ends only when it hangs up (it was killed).
        hang_up = asyncio.ensure_future(reader.read())
        opened = asyncio.ensure_future(self._opened.wait())
        await asyncio.wait([hang_up, opened], return_when=asyncio.FIRST_COMPLETED)
        if hang_up.done():
            opened.cancel()
            self.hung_up[name] += 1
            self._changed.set()
        else:
            hang_up.cancel()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\npassed\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.close()
        # Awaited so that a connection reset by a killed caller is not reported as unretrieved.
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    gate = Gate()
    server = await asyncio.start_server(gate.handle, "127.0.0.1", 0)
    gate.port = server.sockets[0].getsockname()[1]
    yield gate
    server.close()


def gated(gate: Gate, name: str, then: str = "true") -> str:
    return (f'(run (network host) (shell "echo {name} starts; {gate.call(name)}; {then}"))')
