"""Full stores: when a store counts as full, and the one error every full-disk failure becomes.

A store is *full* when its filesystem has less free space than `min_free`: the larger of
`MIN_FREE_SHARE` (1 %) of its size and `MIN_FREE_BYTES` (100 MiB). Then `healthcheck` fails and
builds refuse to start. A build that runs out of space anyway (ENOSPC or EDQUOT from a write, a
store tool saying "No space left on device", SQLite's "database or disk is full") fails with
`StoreFull`, whose message names the store, its free space and the commands that free some.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from pipeline.obuilder.protocols import DiskUsage, Store, StoreFull
from pipeline.obuilder.stores import spec_of

MIN_FREE_BYTES = 100 * 2**20
"""A store with less free space than this is full, however large its filesystem."""

MIN_FREE_SHARE = 0.01
"""A store with less free space than this share of its filesystem is full, however large."""

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def min_free(usage: DiskUsage) -> int:
    """The free space (bytes) below which a store of this size is full."""
    return max(int(usage.total * MIN_FREE_SHARE), MIN_FREE_BYTES)


def store_spec(store: Store) -> str:
    """The `KIND:PATH` naming `store` on the command line."""
    return spec_of(store)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, says the disk is
    full: an OSError with ENOSPC or EDQUOT (store tools' failures carry one, see `run`) or
    SQLite's SQLITE_FULL. A `StoreFull` already says so in its own words: False."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, StoreFull):
            return False
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        # Errors raised by the sqlite3 module itself, not by SQLite, have no code.
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(current, sqlite3.Error) and code is not None and (
                code & 0xFF == sqlite3.SQLITE_FULL):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@asynccontextmanager
async def reporting_full(store: Callable[[], Store]) -> AsyncIterator[None]:
    """Turn a full-disk failure in the block (see `is_disk_full`) into `full_error` of the
    store that `store()` gives (called only then)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise await full_error(store()) from exc


async def full_error(store: Store) -> StoreFull:
    """The error saying that `store` is full (or has just run out of space), with its free
    space now and what to run to free some."""
    return _full_error(store, await store.df())


async def space_problem(store: Store) -> StoreFull | None:
    """`full_error(store)` if `store` is full, else None."""
    usage = await store.df()
    return _full_error(store, usage) if usage.free < min_free(usage) else None


def _full_error(store: Store, usage: DiskUsage) -> StoreFull:
    import shlex  # here: only a full store needs it

    spec = shlex.quote(store_spec(store))
    free, total, needed = (f"{n // 2**20} MiB" for n in (usage.free, usage.total,
                                                         min_free(usage)))
    if usage.free < min_free(usage):
        state = f"is full ({free} free of {total}, less than the {needed} a build needs)"
    else:
        # The step that took the space was discarded, which gave it back.
        state = f"ran out of space (now {free} free of {total})"
    return StoreFull(f"store {spec} {state}: free space with 'pipeline obuilder prune --store "
                     f"{spec} --before TIME' (deletes the results last used before TIME, "
                     f"ISO 8601) or 'pipeline obuilder delete ID --store {spec}'")
