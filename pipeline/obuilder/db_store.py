"""`DbStore`: any `Store` plus a table of its results, for deleting a result with everything
built on it and for pruning the least recently used results (OBuilder's `Db_store`).

The table is `db.sqlite` in the store's state directory (`Store.state_dir`): one row per
committed result with its creation and last-use times, its parent (the base it was built on) and
its number of children. Backends know nothing of it; the builder talks to a `DbStore` wrapping
one.

Several processes may share the table, as they share the store: a writer waits up to
`BUSY_TIMEOUT` seconds for another's transaction, and the store's step locks (`Store.lock`)
keep a build, a deletion and start-up cleaning of one result from crossing each other. The
table uses a rollback journal, never WAL (see `_SCHEMA`), and `db-reserve` beside it keeps room
for recording deletions on a full disk (see `RESERVE_BYTES`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pipeline.obuilder.locks import FileLock, if_free
from pipeline.obuilder.protocols import BuildError, DiskUsage, Store

_log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT = 600.0
"""Seconds a transaction waits for another process's to finish before failing. Transactions
here are single statements, so any wait is short unless a process is stopped holding one."""

RESERVE_BYTES = 2**20
"""The size of `db-reserve` in the store's state directory, space kept so that deleting results
can be recorded on a full disk (the table's journal needs some), released when that write finds
no room and made again at the next start-up with room for it."""

# `children` is kept by triggers, so no code path can forget it. A row is always removed after
# its children's rows (see `DbStore.delete`).
# A rollback journal, not WAL: WAL keeps its index in a memory-mapped `-shm` file, and a write to
# a mapped page that the filesystem cannot back (a full disk; on btrfs, any page, as it copies on
# write) kills the process with SIGBUS. A rollback journal fails with "database or disk is full".
# A database left in WAL mode is converted with the lock held exclusively, in which mode SQLite
# keeps the WAL index in memory, not in `-shm`.
# The tables are made in one transaction: each commit syncs the file and its journal several
# times, which on btrfs costs milliseconds.
_SCHEMA = """
PRAGMA locking_mode = EXCLUSIVE;
PRAGMA journal_mode = DELETE;
PRAGMA locking_mode = NORMAL;
BEGIN;
CREATE TABLE IF NOT EXISTS results (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    used     REAL NOT NULL,
    parent   TEXT,
    children INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_by_parent ON results (parent);
CREATE INDEX IF NOT EXISTS results_by_use ON results (children, used);
CREATE TRIGGER IF NOT EXISTS result_added AFTER INSERT ON results BEGIN
    UPDATE results SET children = children + 1 WHERE id = NEW.parent;
END;
CREATE TRIGGER IF NOT EXISTS result_removed AFTER DELETE ON results BEGIN
    UPDATE results SET children = children - 1 WHERE id = OLD.parent;
END;
COMMIT;
"""


def _add(db: sqlite3.Connection, id: str, parent: str | None, now: float) -> None:
    # A parent unknown to the table (say, built before the table existed) is not recorded, so
    # that every recorded parent is a row whose `children` counts this one.
    db.execute("INSERT INTO results (id, created, used, parent) "
               "VALUES (?, ?, ?, (SELECT id FROM results WHERE id = ?))",
               (id, now, now, parent))
    if parent is not None:
        # Building on a result is a use of it: recorded in the same transaction, which is
        # one commit (and its syncs) per step.
        _set_used(db, [parent], now)


def _set_used(db: sqlite3.Connection, ids: Iterable[str], now: float) -> None:
    db.executemany("UPDATE results SET used = ? WHERE id = ?", [(now, id) for id in ids])


def _remove(db: sqlite3.Connection, ids: list[str]) -> None:
    db.executemany("DELETE FROM results WHERE id = ?", [(id,) for id in ids])


def _is_recorded(db: sqlite3.Connection, id: str) -> bool:
    return db.execute("SELECT 1 FROM results WHERE id = ?", (id,)).fetchone() is not None


def _ids(db: sqlite3.Connection) -> set[str]:
    return {id for (id,) in db.execute("SELECT id FROM results")}


def _descendants(db: sqlite3.Connection, id: str) -> list[str]:
    """`id`'s descendants, children before their parents (deepest first)."""
    rows = db.execute("""
        WITH RECURSIVE tree (id, depth) AS (
            SELECT id, 1 FROM results WHERE parent = ?
            UNION ALL
            SELECT results.id, tree.depth + 1 FROM results JOIN tree ON results.parent = tree.id
        )
        SELECT id FROM tree ORDER BY depth DESC, id""", (id,))
    return [id for (id,) in rows]


def _least_recently_used(db: sqlite3.Connection, cutoff: float, busy: list[str]) -> str | None:
    """The least recently used result with no children, last used before `cutoff`, not in
    `busy`."""
    placeholders = ", ".join("?" * len(busy))
    row = db.execute(f"SELECT id FROM results WHERE children = 0 AND used < ? "
                     f"AND id NOT IN ({placeholders}) ORDER BY used, id LIMIT 1",
                     (cutoff, *busy)).fetchone()
    return None if row is None else row[0]


class DbStore:
    """A `Store` that records every result of the store it wraps, and can prune them.

    Create it, then `await clean()` before building anything (a `Builder` does so before its
    first step), so that what a crash left is gone. `delete`, `prune` and `clean` are the only
    ways results should be removed, or the table falls out of step until the next `clean`.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        """Open `db.sqlite` in the store's state directory, creating it if needed; `clock`
        gives the time recorded as created/used (seconds since the epoch). Raises sqlite3.Error
        if the database is unusable (not a database, unwritable)."""
        self.store = store
        self.root = store.root
        self.state_dir = store.state_dir
        self._clock = clock
        # Calls run in worker threads (`_sql`), one at a time under `_lock`.
        self._db = sqlite3.connect(self.state_dir / "db.sqlite", check_same_thread=False,
                                   timeout=BUSY_TIMEOUT)
        self._db.executescript(_SCHEMA)
        self._reserve = self.state_dir / "db-reserve"
        self._lock = threading.Lock()
        # Bases of builds running in this process now (with how many builds use each), and
        # results being deleted by it now: prune leaves the former alone; a build on one of the
        # latter is refused. (Other processes' are known through the store's step locks.)
        self._in_progress: Counter[str] = Counter()
        self._deleting: set[str] = set()

    async def _sql(self, query: Callable[..., T], *args: object) -> T:
        """Run `query(db, *args)` in one transaction, in a worker thread (SQLite blocks)."""

        def transaction() -> T:
            with self._lock, self._db:
                return query(self._db, *args)

        return await asyncio.to_thread(transaction)

    async def clean(self) -> None:
        """Start-up work: make the reserve if missing (see `RESERVE_BYTES`), remove the wrapped
        store's temporary state, then reconcile the table with the results on disk: results
        that are gone are forgotten, with everything built on them (a store may keep only
        differences from a base, as overlayfs does, so they cannot be trusted without it);
        results the table does not know (committed just before a crash, before being recorded)
        are deleted, unless their step is locked (a live process has just committed one and is
        recording it). Raises what the store raises if a removal fails.
        """
        await asyncio.to_thread(self._keep_reserve)
        await self.store.clean()
        recorded = await self._sql(_ids)
        present = set(await self.store.results())
        for id in sorted(recorded - present):
            _log.warning("result %s is gone: forgetting it and deleting what was built on it", id)
            await self.delete(id)
        for id in sorted(present - recorded):
            with if_free(self.store.lock(id)) as free:
                if free and not await self._sql(_is_recorded, id):
                    _log.warning("deleting result %s, not in the database", id)
                    await self.store.delete(id)

    async def build(
        self, base: str | None, id: str, fn: Callable[[Path], Awaitable[None]]
    ) -> None:
        """See `Store.build` (the caller holds `lock(id)` until this returns); on success `id`
        is recorded as a child of `base`, and `base` is marked used. Until then `base`'s lock
        is held shared, so no process prunes or deletes `base`.

        Raises BuildError if `base` is being deleted or pruned (by another process: if it was
        deleted before the build could start); otherwise whatever the store or `fn` raises,
        recording nothing.
        """
        if base is None:
            await self.store.build(base, id, fn)
            await self._sql(_add, id, base, self._clock())
            return
        if base in self._deleting:
            raise BuildError(f"cannot build {id}: its base {base} is being deleted")
        self._in_progress[base] += 1
        try:
            async with self.store.lock(base, shared=True):
                await self.store.build(base, id, fn)
                # Still holding `base`: once recorded, it has a child, which prune never takes.
                await self._sql(_add, id, base, self._clock())
        finally:
            self._in_progress[base] -= 1
            if not self._in_progress[base]:
                del self._in_progress[base]

    async def mark_used(self, ids: Iterable[str]) -> None:
        """See `Store.mark_used`: records the time in the table, for `prune`, in one
        transaction. Nothing happens for an id the table does not know."""
        await self._sql(_set_used, list(ids), self._clock())

    @property
    def kind(self) -> str:
        """See `Store.kind`: the wrapped store's."""
        return self.store.kind

    async def result(self, id: str) -> Path | None:
        """See `Store.result`; this does not count as a use (see `mark_used`)."""
        return await self.store.result(id)

    async def has_result(self, id: str) -> bool:
        """See `Store.has_result`; this does not count as a use (see `mark_used`)."""
        return await self.store.has_result(id)

    async def results(self) -> list[str]:
        """See `Store.results`: the wrapped store's, whether the table knows them or not."""
        return await self.store.results()

    async def delete(self, id: str) -> list[str]:
        """Remove result `id` and every result built on it, children before parents; returns
        the ids removed (the deepest first, `id` last), or [] if there is no such result. An
        id unknown to the table is still removed from the store. Waits for builds (in any
        process) on a result to be removed to finish first. Raises what the store raises if a
        removal fails; the results removed before that stay removed."""
        descendants = await self._sql(_descendants, id)
        if not descendants and not await self.store.has_result(id):
            await self._forget_deleted(id)
            return []
        doomed = [*descendants, id]
        for victim in doomed:
            lock = self.store.lock(victim)
            await lock.acquire()
            await self._delete_one(victim, lock)
        return doomed

    async def _delete_one(self, id: str, lock: FileLock) -> None:
        """Remove result `id`, whose step lock the caller has taken (released here)."""
        self._deleting.add(id)
        try:
            await self.store.delete(id)
            await self._forget_deleted(id)
        finally:
            self._deleting.discard(id)
            lock.release()

    async def prune(self, before: datetime, limit: int | None = None) -> list[str]:
        """Remove up to `limit` (default: no limit) results last used before `before`, least
        recently used first, among results with no children; a parent whose children are all
        removed becomes a candidate in turn. Never removes the base of a running build (of any
        process), nor a result another process holds. Returns the ids removed, in order. A
        naive `before` is local time. Raises what the store raises if a removal fails; the
        results removed before that stay removed."""
        cutoff = before.timestamp()
        pruned: list[str] = []
        busy: set[str] = set()
        while limit is None or len(pruned) < limit:
            victim = await self._sql(_least_recently_used, cutoff,
                                     sorted(busy.union(self._in_progress)))
            if victim is None:
                break
            # A build may have started on it while the query ran; `_delete_one` then marks it
            # before yielding, so no build can start on it after this check.
            lock = self.store.lock(victim)
            if victim in self._in_progress or not lock.try_acquire():
                busy.add(victim)
                continue
            await self._delete_one(victim, lock)
            pruned.append(victim)
        return pruned

    async def _forget_deleted(self, id: str) -> None:
        """Remove the row of `id`, whose result is gone. On a full disk the write may need
        space that the deletion did not free (a small result) or has not given back yet (btrfs
        does a moment later): then the reserve is released, `df` waits for freed space to count
        when the store looks full (see `BtrfsStore.df`), and the write is tried again."""
        try:
            await self._sql(_remove, [id])
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_FULL:
                raise
            self._reserve.unlink(missing_ok=True)
            await self.store.df()
            await self._sql(_remove, [id])

    def _keep_reserve(self) -> None:
        """Make the reserve (see `RESERVE_BYTES`) if it is missing and there is room for it."""
        if self._reserve.exists():
            return
        fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # A full store: made at a later start-up, once there is room.
            self._reserve.unlink()
        finally:
            os.close(fd)

    def log_file(self, id: str) -> Path:
        """See `Store.log_file`."""
        return self.store.log_file(id)

    def cache(self, name: str, uid: int, gid: int) -> AbstractAsyncContextManager[Path]:
        """See `Store.cache`."""
        return self.store.cache(name, uid, gid)

    async def delete_cache(self, name: str) -> None:
        """See `Store.delete_cache`."""
        await self.store.delete_cache(name)

    async def df(self) -> DiskUsage:
        """See `Store.df`."""
        return await self.store.df()

    def lock(self, id: str, *, shared: bool = False) -> FileLock:
        """See `Store.lock`."""
        return self.store.lock(id, shared=shared)

    def close(self) -> None:
        """See `Store.close`: closes the table, then the wrapped store."""
        self._db.close()
        self.store.close()
