"""Locks shared by every process using one store: advisory `flock(2)` locks on small files.

A lock is a file named after what it protects (`DIR/NAME`), created when first taken. The
kernel drops a process's locks when it dies, however it dies, so a lock that can be taken
belongs to nobody: that is how start-up cleaning tells a crashed process's leftovers from a
live process's work.

Whoever holds a lock exclusively removes its file on release, so that lock files do not pile
up (one per step ever built). A process that opened the file before it was removed may then be
granted a lock on the removed file; `FileLock` checks, once granted, that the file it locked is
still the one at the path, and tries again if not (the usual pattern for removable lock files).

Waiting polls (with a growing pause, up to `POLL_MAX` seconds) instead of blocking a thread in
`flock`, so that cancelling a waiter takes effect at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

POLL_MIN = 0.005
POLL_MAX = 0.2
"""Longest pause (seconds) between two attempts to take a busy lock."""


def _pauses() -> Iterator[float]:
    """The pauses between attempts to take a busy lock: doubling from POLL_MIN to POLL_MAX."""
    pause = POLL_MIN
    while True:
        yield pause
        pause = min(pause * 2, POLL_MAX)


class FileLock:
    """One lock on `DIR/NAME`, exclusive or shared, taken by this object's own open file.

    Two `FileLock`s exclude each other even within one process (each has its own open file).
    """

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it in a conflicting mode; never waits. Returns whether
        it was taken. Raises OSError if the lock file cannot be created."""
        assert self._fd is None, f"{self.path} is already held"
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev,
                                                                            mine.st_ino):
                self._fd = fd
                return True
            # Granted on a file its last holder removed: try the one at the path now.
            os.close(fd)

    def acquire_blocking(self) -> None:
        """Take the lock, waiting as long as it takes and blocking the thread: for short
        waits where no event loop runs (at exit)."""
        pauses = _pauses()
        while not self.try_acquire():
            time.sleep(next(pauses))

    async def acquire(self) -> None:
        """Take the lock, waiting as long as it takes. Cancellation stops the wait."""
        pauses = _pauses()
        while not self.try_acquire():
            await asyncio.sleep(next(pauses))

    def release(self) -> None:
        """Give the lock up (removing its file if held exclusively); nothing if not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.shared:
                # Still ours: nobody else can hold it, so nobody else can be removing it.
                with suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)

    async def __aenter__(self) -> FileLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def if_free(lock: FileLock) -> Iterator[bool]:
    """Hold `lock` for the block if nobody holds it now (yielding True), else yield False:
    for cleaning what a crashed holder left, never waiting for a live one."""
    free = lock.try_acquire()
    try:
        yield free
    finally:
        lock.release()


class LockDir:
    """A directory of named locks, e.g. one per step id: `async with locks.lock(id): ...`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def lock(self, name: str, *, shared: bool = False) -> FileLock:
        """The (not yet taken) lock called `name`, a plain file name."""
        return FileLock(self.directory / name, shared=shared)

    def is_free(self, name: str) -> bool:
        """Whether nobody holds the lock `name` (in any mode) at the time of asking."""
        with if_free(self.lock(name)) as free:
            return free


class Owner:
    """This process's claim on what it makes in a shared directory (cache copies, sandbox
    bundles, containers): a token to start their names with (`TOKEN-...`), and an exclusive lock
    on `DIR/TOKEN` held until `release` or death. A thing named so belongs to a live process
    exactly while `is_live_owner` says so.
    """

    def __init__(self, directory: Path) -> None:
        """Take a new token and its lock. Raises OSError if `directory` cannot be written."""
        while True:
            self.token = f"p{os.getpid()}x{os.urandom(4).hex()}"
            self._lock = FileLock(directory / self.token)
            if self._lock.try_acquire():
                break

    def release(self) -> None:
        """Give the claim up: what was made with the token may now be cleaned by anyone."""
        self._lock.release()


def is_live_owner(directory: Path, name: str) -> bool:
    """Whether the thing named `name` (`TOKEN-...`, or a bare `TOKEN`) was made by an `Owner`
    of `directory` that is still live. A dead owner's file is removed on the way (asking takes
    and releases its lock)."""
    token = name.split("-", 1)[0]
    return (directory / token).exists() and not LockDir(directory).is_free(token)
