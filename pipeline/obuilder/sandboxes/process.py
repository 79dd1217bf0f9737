"""What every sandbox does with the process running a command (`runc run`, `docker run`): copy
its output to the step's log, feed it its input, stop it when the step is cancelled, and say
how the command ended.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from pipeline.obuilder.protocols import BuildError, Log


def signal_name(number: int) -> str:
    """`SIGKILL` for 9, ..., `signal N` for a real-time signal (which has no name of its own)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_error(status: int) -> BuildError:
    """The error of a command that exited with `status` (not 0)."""
    # A command killed by signal N is reported as status 128 + N, as shells do.
    if 128 < status < 128 + signal.NSIG:
        return BuildError(f"command killed by {signal_name(status - 128)} "
                          f"(exit status {status})")
    return BuildError(f"command exited with status {status}")


async def to_the_end(work: Awaitable[None]) -> None:
    """Await `work` to completion even if the caller is cancelled meanwhile (re-raising the
    cancellation afterwards): a cleanup cut short would leave a container running."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            interrupted = True
    task.result()
    if interrupted:
        raise asyncio.CancelledError


async def supervise(proc: asyncio.subprocess.Process, *, log: Log, stdin: bytes | None,
                    cancelled: asyncio.Event | None,
                    stop: Callable[[], Awaitable[None]]) -> int:
    """Copy the output of `proc` (started with stdout a pipe, and stdin a pipe if `stdin` is
    given) to `log` as it arrives, feeding it `stdin`, until it exits; its exit status.

    Setting `cancelled`, or cancelling the caller, raises asyncio.CancelledError. Whatever
    happens, `stop()` (which must make `proc` exit: kill the container it runs, and remove
    what it leaves) runs to its end first, and so does the copy of the output.
    """
    finished = asyncio.ensure_future(_communicate(proc, log, stdin))
    cancel_wait = asyncio.ensure_future(cancelled.wait()) if cancelled is not None else None
    try:
        waiting = {finished} if cancel_wait is None else {finished, cancel_wait}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            raise asyncio.CancelledError
        return finished.result()
    finally:
        if cancel_wait is not None:
            cancel_wait.cancel()
        await to_the_end(_stopped(stop, finished))


async def _stopped(stop: Callable[[], Awaitable[None]], finished: asyncio.Future[int]) -> None:
    await stop()
    # With the process gone, so is every process of its container, so the output pipe reaches
    # its end: let the copy finish.
    await asyncio.gather(finished, return_exceptions=True)


async def _communicate(proc: asyncio.subprocess.Process, log: Log, stdin: bytes | None) -> int:
    """Feed `stdin`, copy the output to `log` as it arrives; the exit status of `proc`."""
    assert proc.stdout is not None
    feeder = None
    if stdin is not None:
        assert proc.stdin is not None
        feeder = asyncio.ensure_future(_feed(proc.stdin, stdin))
    try:
        while chunk := await proc.stdout.read(65536):
            log.write(chunk)
    finally:
        if feeder is not None:
            feeder.cancel()
    return await proc.wait()


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    try:
        pipe.write(data)
        await pipe.drain()
        pipe.close()
    except (BrokenPipeError, ConnectionResetError):
        # The command exited (or closed its stdin) without reading everything: its choice.
        pass
