"""The cache's records (`pipeline.cache.storage.Database`) on their own: a real SQLite file, no
engine."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.cache.storage import INTERRUPTED, Database, Entry

DAY = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def entry(job_id: str, op: str = "build", key: str = "k1", *, ok: bool = True,
          finished: datetime = DAY, **fields: object) -> Entry:
    """A run of `op` on the key digest `key`, finished at `finished`."""
    return Entry(job_id=job_id, op=op, key_digest=key, key_pp=f"pp {key}", ok=ok,
                 value=f'"{job_id}"' if ok else None, error=None if ok else f"{job_id} failed",
                 started=finished - timedelta(seconds=5), finished=finished,
                 **fields)  # type: ignore[arg-type]


def never_interrupted(job_id: str) -> datetime:
    raise AssertionError(f"{job_id} was not left unfinished")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "db.sqlite")
    database.open(never_interrupted)
    yield database
    database.close()


def test_an_entry_comes_back_as_it_was_recorded(db: Database) -> None:
    recorded = entry("2026-11-27/120000-build-aaaaaa", value_digest="v", sticky=False)
    db.record(recorded)
    assert db.entry(recorded.job_id) == recorded
    assert db.entry("2026-11-27/120000-build-ffffff") is None
    failed = entry("2026-11-27/120001-build-bbbbbb", ok=False)
    db.record(failed)
    assert db.entry(failed.job_id) == failed
    assert (failed.value, failed.error) == (None, f"{failed.job_id} failed")


def test_when_queued_and_why_skipped_come_back_too(db: Database) -> None:
    skipped = entry("2026-11-27/120002-build-cccccc", queued=DAY - timedelta(seconds=60),
                    skipped="odoc is not available")
    db.record(skipped)
    back = db.entry(skipped.job_id)
    assert back is not None
    assert (back.queued, back.skipped) == (DAY - timedelta(seconds=60), "odoc is not available")


def test_a_file_of_the_first_schema_gains_the_new_columns_and_keeps_its_rows(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, op TEXT NOT NULL, key TEXT NOT"
                    " NULL, key_pp TEXT NOT NULL, value_digest TEXT, ok INTEGER NOT NULL,"
                    " outcome TEXT NOT NULL, sticky INTEGER NOT NULL, rebuild INTEGER NOT NULL"
                    " DEFAULT 0, started TEXT, finished TEXT NOT NULL)")
        old.execute("INSERT INTO jobs VALUES ('2026-11-27/110000-build-aaaaaa', 'build', 'k1',"
                    " 'pp k1', NULL, 1, '\"v\"', 1, 0, NULL, ?)", (DAY.isoformat(),))
    database = Database(path)
    database.open(never_interrupted)
    try:
        old_entry = database.entry("2026-11-27/110000-build-aaaaaa")
        assert old_entry is not None
        assert (old_entry.value, old_entry.queued, old_entry.skipped) == ('"v"', None, None)
        new = entry("2026-11-27/120000-build-bbbbbb", queued=DAY, skipped="nothing to do")
        database.record(new)
        assert database.entry(new.job_id) == new
    finally:
        database.close()


def test_latest_and_history_of_a_key_newest_first(db: Database) -> None:
    older = entry("a", finished=DAY)
    newer = entry("b", finished=DAY + timedelta(hours=1), ok=False)
    same_key_other_op = entry("c", op="lint", finished=DAY + timedelta(hours=2))
    other_key = entry("d", key="k2", finished=DAY + timedelta(hours=3))
    for recorded in (older, newer, same_key_other_op, other_key):
        db.record(recorded)
    assert db.latest("build", "k1") == newer
    assert db.history("build", "k1") == [newer, older]
    assert db.latest("build", "k3") is None
    assert db.history("build", "k3") == []


def test_query_filters_by_operation_outcome_day_and_limit(db: Database) -> None:
    runs = [entry("a", finished=DAY - timedelta(days=1)),
            entry("b", op="lint", finished=DAY, ok=False),
            entry("c", finished=DAY + timedelta(hours=1), ok=False),
            entry("d", op="lint", finished=DAY + timedelta(days=1))]
    for recorded in runs:
        db.record(recorded)
    a, b, c, d = runs
    assert db.query() == [d, c, b, a]
    assert db.query(op="build") == [c, a]
    assert db.query(ok=False) == [c, b]
    assert db.query(ok=True) == [d, a]
    assert db.query(since=date(2026, 11, 27)) == [d, c, b]
    assert db.query(op="lint", ok=True, since=date(2026, 11, 27)) == [d]
    assert db.query(limit=2) == [d, c]
    assert db.ops() == ["build", "lint"]


def test_mark_rebuild_marks_the_latest_entry_of_the_key_only(db: Database) -> None:
    db.record(entry("a", finished=DAY))
    db.record(entry("b", finished=DAY + timedelta(hours=1)))
    db.mark_rebuild("build", "k1")
    latest = db.latest("build", "k1")
    assert latest is not None and latest.rebuild
    earlier = db.entry("a")
    assert earlier is not None and not earlier.rebuild


def test_jobs_left_unfinished_are_recorded_as_interrupted_at_the_next_open(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = Database(path)
    first.open(never_interrupted)
    first.note_unfinished("gone", "build", "k1", "pp k1", DAY)
    first.note_unfinished("done", "build", "k2", "pp k2", DAY)
    first.record(entry("done", key="k2"))
    first.close()

    asked: list[str] = []

    def finish(job_id: str) -> datetime:
        asked.append(job_id)
        return DAY + timedelta(minutes=1)

    second = Database(path)
    second.open(finish)
    try:
        assert asked == ["gone"]
        interrupted = second.latest("build", "k1")
        assert interrupted == Entry(
            job_id="gone", op="build", key_digest="k1", key_pp="pp k1", ok=False, value=None,
            error=INTERRUPTED, started=DAY, finished=DAY + timedelta(minutes=1), sticky=False)
    finally:
        second.close()
    # Recorded once: a third start finds nothing left unfinished.
    third = Database(path)
    third.open(never_interrupted)
    third.close()


def test_a_database_of_someone_else_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE songs (title TEXT)")
    before = path.read_bytes()
    with pytest.raises(sqlite3.DatabaseError, match="it has tables songs and no table jobs"):
        Database(path).open(never_interrupted)
    assert path.read_bytes() == before


def test_queries_need_an_open_database(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        Database(tmp_path / "db.sqlite").query()
