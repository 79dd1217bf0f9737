"""The scheduler's own state, kept in SQLite so that a restart keeps it: the pools seen, the
workers seen (their pool, capacity, last address and when they were last seen), which of them an
administrator paused or is draining, and the cache-hint table (pool, hint) -> {worker name: last
time it built that hint}.

Workers are named by their Dask name, not their address: a worker that restarts gets a new port
but keeps its name (and its store, hence its cached steps)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    address TEXT NOT NULL,
    last_seen REAL NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS hints (
    pool TEXT NOT NULL,
    hint TEXT NOT NULL,
    worker TEXT NOT NULL,
    last_built REAL NOT NULL,
    PRIMARY KEY (pool, hint, worker)
);
"""

DB_NAME = "scheduler.sqlite"
"""The database's file name in the scheduler's state directory."""


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as the state remembers it (connected or not)."""

    name: str
    pool: str
    capacity: int
    address: str
    last_seen: float
    paused: bool
    draining: bool


class SchedulerState:
    """The scheduler's tables in `state_dir/scheduler.sqlite` (made if missing).

    Every change is committed at once: the scheduler may be killed at any point, and what it
    learnt before must survive that."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
        # WAL with NORMAL sync: one build's end is one small write, on the scheduler's loop.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def pools(self) -> list[str]:
        """The names of every pool seen, sorted."""
        return [name for (name,) in self._db.execute("SELECT name FROM pools ORDER BY name")]

    def worker_seen(self, name: str, pool: str, capacity: int, address: str) -> WorkerRecord:
        """Record that worker `name` is connected at `address`, offering `capacity` slots of
        `pool`; its record (keeping whether it is paused or draining)."""
        now = time.time()
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO pools VALUES (?, ?)", (pool, now))
            self._db.execute(
                "INSERT INTO workers (name, pool, capacity, address, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET pool = excluded.pool, "
                "capacity = excluded.capacity, address = excluded.address, "
                "last_seen = excluded.last_seen",
                (name, pool, capacity, address, now))
        record = self.worker(name)
        assert record is not None
        return record

    def worker_left(self, name: str) -> None:
        """Record that worker `name` disconnected now; a drained worker is no longer draining
        (if it comes back, it takes work again)."""
        self._db.execute("UPDATE workers SET last_seen = ?, draining = 0 WHERE name = ?",
                         (time.time(), name))

    def worker(self, name: str) -> WorkerRecord | None:
        """The record of worker `name`, if it was ever seen."""
        row = self._db.execute(
            "SELECT name, pool, capacity, address, last_seen, paused, draining FROM workers "
            "WHERE name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def workers(self) -> list[WorkerRecord]:
        """Every worker ever seen (and not forgotten), by name."""
        rows = self._db.execute(
            "SELECT name, pool, capacity, address, last_seen, paused, draining FROM workers "
            "ORDER BY name")
        return [_record(row) for row in rows]

    def set_paused(self, name: str, paused: bool) -> None:
        """Mark worker `name` paused (it takes no new build) or not."""
        self._db.execute("UPDATE workers SET paused = ? WHERE name = ?", (int(paused), name))

    def set_draining(self, name: str, draining: bool) -> None:
        """Mark worker `name` draining (it takes no new build and leaves once idle) or not."""
        self._db.execute("UPDATE workers SET draining = ? WHERE name = ?", (int(draining), name))

    def forget(self, name: str) -> None:
        """Remove worker `name`'s record and its entries in the hint table."""
        with self._db:
            self._db.execute("DELETE FROM workers WHERE name = ?", (name,))
            self._db.execute("DELETE FROM hints WHERE worker = ?", (name,))

    def hinted_workers(self, pool: str, hint: str) -> dict[str, float]:
        """{worker name: when it last built `hint`} for the builds of `pool`."""
        rows = self._db.execute("SELECT worker, last_built FROM hints WHERE pool = ? AND hint = ?",
                                (pool, hint))
        return dict(rows.fetchall())

    def built(self, pool: str, hint: str, worker: str) -> None:
        """Record that `worker` (a name) has just built `hint` in `pool`."""
        self._db.execute(
            "INSERT INTO hints VALUES (?, ?, ?, ?) ON CONFLICT (pool, hint, worker) "
            "DO UPDATE SET last_built = excluded.last_built", (pool, hint, worker, time.time()))


def _record(row: tuple[str, str, int, str, float, int, int]) -> WorkerRecord:
    name, pool, capacity, address, last_seen, paused, draining = row
    return WorkerRecord(name, pool, capacity, address, last_seen, bool(paused), bool(draining))
