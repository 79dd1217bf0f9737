"""The cache's records (OCurrent's `Current_cache.Db`): one SQLite database of finished runs.

Every finished job of a builder or publisher is an `Entry`: its operation, the digest of its key,
its outcome and its times. The cache writes them (`record`, `note_unfinished`, `mark_rebuild`);
everyone else reads them through the typed queries of `Database` (`query`, `ops`, `entry`,
`latest`, `history`), never with SQL of their own. Writes wait in memory until `commit`, which
makes them in one transaction (a big pipeline's first round starts thousands of jobs); a read
first hands the waiting writes to SQLite, so it sees what the cache wrote before it is committed.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    key_pp TEXT NOT NULL,
    value_digest TEXT,
    ok INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    sticky INTEGER NOT NULL,
    rebuild INTEGER NOT NULL DEFAULT 0,
    started TEXT,
    finished TEXT NOT NULL,
    queued TEXT,
    skipped TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (op, key, finished);
CREATE TABLE IF NOT EXISTS unfinished (
    job_id TEXT PRIMARY KEY,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    key_pp TEXT NOT NULL,
    started TEXT
);
"""

_JOBS_COLUMNS = frozenset(("job_id", "op", "key", "key_pp", "value_digest", "ok", "outcome",
                           "sticky", "rebuild", "started", "finished"))

# Columns added since the first schema, with their types: a file without them gains them
# when opened (SQLite adds a nullable column without rewriting the table).
_ADDED_COLUMNS = {"queued": "TEXT", "skipped": "TEXT"}

# The columns `_entry` reads, in its order.
_ENTRY_COLUMNS = ("SELECT job_id, op, key, key_pp, ok, outcome, started, finished, sticky, rebuild,"
                  " value_digest, queued, skipped FROM jobs")
_NEWEST_FIRST = " ORDER BY finished DESC, rowid DESC"

FILE_NAME = "db.sqlite"
"""The records' file in a state directory."""

INTERRUPTED = "interrupted (the process stopped)"
"""The error recorded for a job whose process died while it was not finished."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored run of an operation on a key.

    `key_digest` is the digest the operation computed for the key and `key_pp` its description
    for people. When `ok`, `value` is the encoded value (empty for a publisher) and `error` None;
    otherwise `error` says why. `sticky` is false for runs that go again when wanted (cancelled
    because nobody wanted them, or interrupted); `rebuild` is set when someone asked to run the
    key again; `value_digest` is what a publisher published. `queued` is when the job was
    made (it then waits for its pool, or for confirmation, until `started`); `skipped` is the
    reason a job that succeeded gave for having had nothing to do (see `Job.skip`).
    """

    job_id: str
    op: str
    key_digest: str
    key_pp: str
    ok: bool
    value: str | None
    error: str | None
    started: datetime | None
    finished: datetime
    sticky: bool = True
    rebuild: bool = False
    value_digest: str | None = None
    queued: datetime | None = None
    skipped: str | None = None

    @property
    def state(self) -> str:
        """How the run ended, as people are shown it: "ok", "skipped" or "failed"."""
        if not self.ok:
            return "failed"
        return "skipped" if self.skipped is not None else "ok"


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


def _entry(row: tuple[Any, ...]) -> Entry:
    (job_id, op, key, key_pp, ok, outcome, started, finished, sticky, rebuild, value_digest,
     queued, skipped) = row
    return Entry(
        job_id=job_id, op=op, key_digest=key, key_pp=key_pp, ok=bool(ok),
        value=outcome if ok else None, error=None if ok else outcome, started=_time(started),
        finished=datetime.fromisoformat(finished), sticky=bool(sticky), rebuild=bool(rebuild),
        value_digest=value_digest, queued=_time(queued), skipped=skipped)


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """Raise sqlite3.DatabaseError, saying why, unless `db` is empty or a pipeline's outcomes."""
    try:
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise sqlite3.DatabaseError(f"{path}: not a pipeline state database ({exc})") from None
    if not tables:
        return
    if "jobs" not in tables:
        raise sqlite3.DatabaseError(
            f"{path}: not a pipeline state database (it has tables {', '.join(sorted(tables))} "
            "and no table jobs)")
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if missing := _JOBS_COLUMNS - columns:
        raise sqlite3.DatabaseError(
            f"{path}: not a pipeline state database (its table jobs lacks the columns "
            f"{', '.join(sorted(missing))})")


def _add_columns(db: sqlite3.Connection) -> None:
    """Give a file made by an earlier version the columns added since (see `_ADDED_COLUMNS`)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if not columns:
        return  # a new file: the schema makes the table whole
    for name, kind in _ADDED_COLUMNS.items():
        if name not in columns:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


class Database:
    """The records of one state directory's cache, in the SQLite file `path`.

    Writes are not made one by one: the cache calls `commit` once per loop iteration.
    """

    def __init__(self, path: Path) -> None:
        """Name the file; nothing is opened until `open`."""
        self.path = path
        self._db: sqlite3.Connection | None = None
        # The writes waiting for `commit` (or a read), in the order they are made in: the
        # unfinished jobs' rows by job id (a later note replaces an earlier one), then the
        # finished runs, which are no longer unfinished.
        self._unfinished: dict[str, tuple[str, str, str, str, str | None]] = {}
        self._records: list[tuple[Any, ...]] = []
        # Most keys of a big pipeline's first run were never stored: knowing which were saves a
        # query per key.
        self._stored: set[tuple[str, str]] = set()

    def open(self, finish_interrupted: Callable[[str], datetime]) -> None:
        """Open (creating if needed) the database, and record the jobs an earlier process left
        unfinished as failed with `INTERRUPTED`, finished at `finish_interrupted(job_id)`.

        Raises sqlite3.DatabaseError, saying why, if the file is not a database or holds another
        schema; the file is then left as it is.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        try:
            # Checked before anything is written: someone else's database must stay untouched.
            _check_schema(db, self.path)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _add_columns(db)
            db.executescript(_SCHEMA)
            self._record_interrupted(db, finish_interrupted)
            db.commit()
        except BaseException:
            db.close()
            raise
        self._db = db
        self._stored = set(db.execute("SELECT DISTINCT op, key FROM jobs"))

    @staticmethod
    def _record_interrupted(db: sqlite3.Connection,
                            finish_interrupted: Callable[[str], datetime]) -> None:
        """Record every job left in `unfinished` (its process died) as an interrupted failure:
        not sticky, so that its key runs again when wanted."""
        rows = db.execute("SELECT job_id, op, key, key_pp, started FROM unfinished").fetchall()
        for job_id, op, key, key_pp, started in rows:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, op, key, key_pp, ok, outcome, sticky, started,"
                " finished) VALUES (?, ?, ?, ?, 0, ?, 0, ?, ?)",
                (job_id, op, key, key_pp, INTERRUPTED, started,
                 finish_interrupted(job_id).isoformat()))
        db.execute("DELETE FROM unfinished")

    def close(self) -> None:
        """Commit and close; does nothing if not open."""
        if self._db is not None:
            self.commit()
            self._db.close()
            self._db = None

    def commit(self) -> None:
        """Save what was written, in one transaction; does nothing if not open."""
        if self._db is not None:
            self._flush()
            self._db.commit()

    def _flush(self) -> None:
        """Hand the writes waiting in memory to SQLite (uncommitted)."""
        db = self._connection
        if self._unfinished:
            db.executemany(
                "INSERT OR REPLACE INTO unfinished (job_id, op, key, key_pp, started)"
                " VALUES (?, ?, ?, ?, ?)", self._unfinished.values())
            self._unfinished = {}
        if self._records:
            db.executemany(
                "INSERT INTO jobs (job_id, op, key, key_pp, value_digest, ok, outcome, sticky,"
                " rebuild, started, finished, queued, skipped)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._records)
            db.executemany("DELETE FROM unfinished WHERE job_id = ?",
                           [(row[0],) for row in self._records])
            self._records = []

    def _check_open(self) -> None:
        if self._db is None:
            raise RuntimeError("cache database is not open")

    @property
    def _connection(self) -> sqlite3.Connection:
        self._check_open()
        assert self._db is not None
        return self._db

    @property
    def _reader(self) -> sqlite3.Connection:
        """The connection, once it has every write made so far (for a query)."""
        self._flush()
        return self._connection

    # What the cache writes

    def record(self, entry: Entry) -> None:
        """Store a finished run (which is no longer unfinished); made at the next `commit`."""
        self._check_open()
        # A job noted unfinished in this same batch need not be written at all.
        self._unfinished.pop(entry.job_id, None)
        self._records.append(
            (entry.job_id, entry.op, entry.key_digest, entry.key_pp, entry.value_digest,
             int(entry.ok), entry.value if entry.ok else entry.error, int(entry.sticky),
             int(entry.rebuild), entry.started.isoformat() if entry.started else None,
             entry.finished.isoformat(), entry.queued.isoformat() if entry.queued else None,
             entry.skipped))
        self._stored.add((entry.op, entry.key_digest))

    def note_unfinished(self, job_id: str, op: str, key_digest: str, key_pp: str,
                        started: datetime | None) -> None:
        """Note that `job_id` is not finished, so that a process that dies before it is can be
        told at the next `open`; made at the next `commit`."""
        self._check_open()
        self._unfinished[job_id] = (job_id, op, key_digest, key_pp,
                                    started.isoformat() if started else None)

    def mark_rebuild(self, op: str, key_digest: str) -> None:
        """Mark the latest entry of a key to be run again by its next user (committed now)."""
        self._flush()
        db = self._connection
        db.execute(
            "UPDATE jobs SET rebuild = 1 WHERE rowid = (SELECT rowid FROM jobs"
            " WHERE op = ? AND key = ?" + _NEWEST_FIRST + " LIMIT 1)", (op, key_digest))
        db.commit()

    # Queries

    def latest(self, op: str, key_digest: str) -> Entry | None:
        """The newest entry of a key of `op`, if any."""
        if (op, key_digest) not in self._stored:
            return None
        row = self._reader.execute(
            _ENTRY_COLUMNS + " WHERE op = ? AND key = ?" + _NEWEST_FIRST + " LIMIT 1",
            (op, key_digest)).fetchone()
        return _entry(row) if row is not None else None

    def history(self, op: str, key_digest: str) -> list[Entry]:
        """Every entry of a key of `op`, newest first."""
        if (op, key_digest) not in self._stored:
            return []
        return [_entry(row) for row in self._reader.execute(
            _ENTRY_COLUMNS + " WHERE op = ? AND key = ?" + _NEWEST_FIRST, (op, key_digest))]

    def entry(self, job_id: str) -> Entry | None:
        """The entry of the job `job_id`, if it finished and was stored."""
        row = self._reader.execute(_ENTRY_COLUMNS + " WHERE job_id = ?",
                                       (job_id,)).fetchone()
        return _entry(row) if row is not None else None

    def query(self, *, op: str | None = None, ok: bool | None = None, since: date | None = None,
              limit: int | None = None) -> list[Entry]:
        """Entries newest first: of operation `op`, that succeeded (`ok`) or failed
        (`ok=False`), finished on the day `since` (UTC) or later, at most `limit` of them; a
        filter left None does not filter."""
        clauses: list[str] = []
        params: list[Any] = []
        if op is not None:
            clauses.append("op = ?")
            params.append(op)
        if ok is not None:
            clauses.append("ok = ?")
            params.append(int(ok))
        if since is not None:
            # Times are stored as ISO 8601 text in UTC, which sorts as the times do.
            clauses.append("finished >= ?")
            params.append(since.isoformat())
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        bound = ""
        if limit is not None:
            bound = " LIMIT ?"
            params.append(limit)
        return [_entry(row) for row in self._reader.execute(
            _ENTRY_COLUMNS + where + _NEWEST_FIRST + bound, params)]

    def ops(self) -> list[str]:
        """The operations with at least one entry, sorted."""
        return [op for (op,) in self._reader.execute(
            "SELECT DISTINCT op FROM jobs ORDER BY op")]
