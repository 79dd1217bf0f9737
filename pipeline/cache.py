"""Cached primitives (OCurrent's `Current_cache`): builders and publishers.

A **builder** maps a key to a value by running a job: `build(job, key) -> value`. Its outcome is
stored under the key's digest and reused until the user asks to rebuild or `valid_for` expires.
Errors are sticky: a failed key is not retried until rebuild, expiry or a different key.

A **publisher** makes the world hold a value under a key: `publish(job, key, value)`. It runs when
the digest of the value differs from the one last published under the key; the value is not part
of the key.

Outcomes live in a SQLite database in the state directory and survive restarts. Nodes asking for
the same operation and key share one instance and so one job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.clock import Timer
from pipeline.jobs import Job, JobCancelled, JobState
from pipeline.level import Level
from pipeline.nodes import Node, error_message
from pipeline.output import Active, Failed, Ok, Output
from pipeline.pool import Pool
from pipeline.term import Primitive, Term, as_term

if TYPE_CHECKING:
    from pipeline.engine import Engine

K = TypeVar("K")
V = TypeVar("V")


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__qualname__, **fields}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot compute a digest of a {type(value).__name__}; "
                    "give the operation a key_digest function")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, default=_canonical, separators=(",", ":"))


def digest(value: Any) -> str:
    """SHA-256 (hex) of a canonical JSON form of `value`: equal values have equal digests.

    Handles JSON types, tuples, dataclasses, paths, bytes, sets and enums.
    """
    return hashlib.sha256(_CANONICAL_JSON.encode(value).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Options:
    """How a cached operation runs: see `builder` for the meaning of each field."""

    auto_cancel: bool = False
    latched: bool = False
    valid_for: timedelta | None = None
    pool: Pool | None = None
    level: Level = Level.AVERAGE


class Operation(Generic[K, V]):
    """What builders and publishers share: an id, options, and how keys and values are stored."""

    kind = "operation"

    def __init__(
        self,
        id: str,
        options: Options,
        *,
        pp: Callable[[K], str] | None = None,
        key_digest: Callable[[K], str] | None = None,
        encode: Callable[[V], str] = json.dumps,
        decode: Callable[[str], V] = json.loads,
    ) -> None:
        self.id = id
        self.options = options
        self._pp = pp
        self._key_digest = key_digest or digest
        self.encode = encode
        self.decode = decode

    def key_digest(self, key: K) -> str:
        """The digest under which the outcome for `key` is stored."""
        return self._key_digest(key)

    def pp(self, key: K) -> str:
        """A short description of `key` for people."""
        return self._pp(key) if self._pp is not None else repr(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


class BuilderOp(Operation[K, V]):
    """A cached builder. Call it with a key (a term or a plain value) to get a term of the value."""

    kind = "builder"

    def __init__(
        self, id: str, build: Callable[[Job, K], Awaitable[V]], options: Options, **kw: Any
    ) -> None:
        super().__init__(id, options, **kw)
        self.build = build

    def __call__(self, key: Term[K] | K, *, label: str | None = None) -> Term[V]:
        """The value built for `key`."""
        return Primitive(self, as_term(key), None, label=label or self.id, options=self.options)


class PublisherOp(Operation[K, Any]):
    """A cached publisher. Call it with a key and a value: the term is ok once published."""

    kind = "publisher"

    def __init__(
        self, id: str, publish: Callable[[Job, K, Any], Awaitable[None]], options: Options,
        **kw: Any,
    ) -> None:
        super().__init__(id, options, **kw)
        self.publish = publish

    def __call__(
        self, key: Term[K] | K, value: Term[Any] | Any, *, label: str | None = None
    ) -> Term[None]:
        """Publish `value` under `key`."""
        return Primitive(
            self, as_term(key), as_term(value), label=label or self.id, options=self.options
        )


def builder(
    id: str | None = None,
    *,
    auto_cancel: bool = False,
    latched: bool = False,
    valid_for: timedelta | None = None,
    pool: Pool | None = None,
    level: Level = Level.AVERAGE,
    pp: Callable[[Any], str] | None = None,
    key_digest: Callable[[Any], str] | None = None,
    encode: Callable[[Any], str] = json.dumps,
    decode: Callable[[str], Any] = json.loads,
) -> Callable[[Callable[[Job, K], Awaitable[V]]], BuilderOp[K, V]]:
    """Declare a cached builder: `async def f(job, key) -> value`.

    - `id`: the operation's name (default: the function's), the cache namespace and job label;
    - `auto_cancel`: cancel the running job when no node wants its key any more;
    - `latched`: while re-running, keep showing the previous value;
    - `valid_for`: re-run once an outcome is older than this;
    - `pool`: limits how many jobs run at once; `level`: the job's risk level;
    - `pp`, `key_digest`, `encode`/`decode`: how keys are shown and hashed, and values stored
      (JSON by default).
    """
    options = Options(auto_cancel, latched, valid_for, pool, level)

    def declare(f: Callable[[Job, K], Awaitable[V]]) -> BuilderOp[K, V]:
        return BuilderOp(id or f.__name__, f, options, pp=pp, key_digest=key_digest,
                         encode=encode, decode=decode)

    return declare


def publisher(
    id: str | None = None,
    *,
    auto_cancel: bool = False,
    latched: bool = False,
    valid_for: timedelta | None = None,
    pool: Pool | None = None,
    level: Level = Level.AVERAGE,
    pp: Callable[[Any], str] | None = None,
    key_digest: Callable[[Any], str] | None = None,
    value_digest: Callable[[Any], str] | None = None,
) -> Callable[[Callable[[Job, K, Any], Awaitable[None]]], PublisherOp[K]]:
    """Declare a cached publisher: `async def f(job, key, value) -> None`.

    Options as for `builder`; `auto_cancel` here also cancels a running job whose value is no
    longer the wanted one. `value_digest` compares values (default: `digest`).
    """
    options = Options(auto_cancel, latched, valid_for, pool, level)

    def declare(f: Callable[[Job, K, Any], Awaitable[None]]) -> PublisherOp[K]:
        op = PublisherOp(id or f.__name__, f, options, pp=pp, key_digest=key_digest)
        op.value_digest = value_digest or digest  # type: ignore[attr-defined]
        return op

    return declare


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A finished job's result as stored: `value` when `ok`, else `error`.

    `sticky` is false for jobs cancelled because nobody wanted them any more (or at shutdown):
    those are run again when wanted. `value_digest` is what a publisher published.
    """

    job_id: str
    ok: bool
    value: Any
    error: str | None
    finished: datetime
    sticky: bool = True
    value_digest: str | None = None
    rebuild: bool = False


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
    finished TEXT NOT NULL
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

INTERRUPTED = "interrupted (the process stopped)"
"""The error recorded for a job whose process died while it was not finished."""


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


class Instance:
    """The live state of one (operation, key): its stored outcome, its running job, its users."""

    def __init__(self, cache: Cache, op: Operation[Any, Any], key: Any, key_digest: str) -> None:
        self.cache = cache
        self.op = op
        self.key = key
        self.key_digest = key_digest
        self.outcome: Outcome | None = cache.load(op, key_digest)
        self.ran_here = False
        self.job: Job | None = None
        self.users: set[PrimitiveNode] = set()
        self.rebuild_requested = False
        self.desired: tuple[Any, str] | None = None
        self._running_digest: str | None = None
        self._sticky_cancel = True
        self._task: asyncio.Task[None] | None = None
        self._timer: Timer | None = None
        self.job_ids: list[str] = []
        """The jobs this instance ran, each findable through `Cache.find` while it lives."""

    @property
    def is_publisher(self) -> bool:
        """Whether this is a publisher's instance."""
        return isinstance(self.op, PublisherOp)

    def notify(self) -> None:
        """Re-evaluate every node using this instance."""
        for node in tuple(self.users):
            self.cache.engine.schedule(node)

    def add_user(self, node: PrimitiveNode) -> None:
        """`node` now wants this key."""
        self.users.add(node)

    def remove_user(self, node: PrimitiveNode) -> None:
        """`node` no longer wants this key; the last user leaving may cancel the job."""
        self.users.discard(node)
        if not self.users:
            if self.job is not None and self.op.options.auto_cancel:
                self.cancel("Auto-cancelling job because it is no longer needed", sticky=False)
            self._cancel_timer()
            self.cache.forget(self)

    def set_desired(self, value: Any) -> None:
        """A publisher's wanted value."""
        value_digest = self.op.value_digest(value)  # type: ignore[attr-defined]
        if self.desired is None or self.desired[1] != value_digest:
            self.desired = (value, value_digest)

    def _expired(self, outcome: Outcome) -> bool:
        valid_for = self.op.options.valid_for
        now = self.cache.engine.clock.now()
        return valid_for is not None and outcome.finished + valid_for <= now

    def needs_run(self) -> bool:
        """Whether the stored outcome (if any) cannot be used."""
        outcome = self.outcome
        if self.is_publisher and self.desired is None:
            return False
        if outcome is None or self.rebuild_requested or outcome.rebuild or not outcome.sticky:
            return True
        wanted = self.desired
        if self.is_publisher and wanted is not None and outcome.value_digest != wanted[1]:
            return True
        return self._expired(outcome)

    def update(self) -> None:
        """Start a job if one is needed and wanted; otherwise arrange for expiry."""
        if self.job is not None:
            if (self.is_publisher and self.op.options.auto_cancel and self.desired is not None
                    and self._running_digest != self.desired[1]):
                self.cancel("Auto-cancelling job because the value changed", sticky=False)
            return
        if not self.users or self.cache.closing:
            return
        if self.needs_run():
            self._start()
        elif self._timer is None and self.outcome is not None and self.op.options.valid_for:
            when = self.outcome.finished + self.op.options.valid_for
            self._timer = self.cache.engine.clock.call_at(when, self._on_expiry)

    def _on_expiry(self) -> None:
        self._timer = None
        self.update()
        self.notify()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        self._cancel_timer()
        options = self.op.options
        job = self.cache.engine.jobs.create(self.op.id, level=options.level, pool=options.pool)
        self.job = job
        self.cache.working.add(job)
        self._sticky_cancel = True
        self._running_digest = self.desired[1] if self.desired is not None else None
        value = self.desired[0] if self.desired is not None else None
        job.on_state_change(self._on_job_state)
        self.cache.by_job[job.id] = self
        self.job_ids.append(job.id)
        self.cache.unfinished(self, job)
        self._task = self.cache.engine.loop.create_task(self._run(job, value),
                                                        name=f"job {job.id}")
        self.notify()

    def _on_job_state(self, job: Job) -> None:
        if job.state is JobState.RUNNING:
            self.cache.unfinished(self, job)  # again, now with its start time
        if job.state in _WORKING:
            self.cache.working.add(job)
        else:
            self.cache.working.discard(job)
        # The engine checked idleness when the job changed state, before `working` was updated;
        # an instance nobody uses any more schedules no node that would check it again.
        self.cache.engine.check_idle()
        self.notify()

    def cancel(self, reason: str, *, sticky: bool = True) -> None:
        """Cancel the running job; a non-sticky cancellation is retried when wanted again."""
        if self.job is not None:
            self._sticky_cancel = sticky
            self.job.cancel(reason)

    async def _run(self, job: Job, value: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        high_priority = self.outcome is None
        job.log(f"{self.op.id}: {self.op.pp(self.key)}")
        error: str | None = None
        encoded = ""
        result: Any = None
        try:
            await job.start(high_priority=high_priority)
            job.on_cancel(lambda _reason: task.cancel())
            if isinstance(self.op, PublisherOp):
                await self.op.publish(job, self.key, value)
            else:
                result = await self.op.build(job, self.key)  # type: ignore[attr-defined]
                encoded = self.op.encode(result)
        except JobCancelled as exc:
            error = exc.reason
        except asyncio.CancelledError:
            error = job.cancelled_reason or "Cancelled"
        except Exception as exc:
            error = error_message(exc)
        if job.cancelled_reason is not None and error is None:
            error = job.cancelled_reason
        job.finish(error)
        sticky = error is None or job.cancelled_reason is None or self._sticky_cancel
        self.outcome = Outcome(
            job_id=job.id, ok=error is None, value=result, error=error,
            finished=job.finished or self.cache.engine.clock.now(), sticky=sticky,
            value_digest=self._running_digest,
        )
        self.ran_here = True
        self.rebuild_requested = False
        self.cache.record(self, job, encoded)
        self.job = None
        self._task = None
        if not self.users:
            self.cache.forget(self)
        self.update()
        self.notify()

    async def stop(self, reason: str) -> None:
        """Cancel the running job without recording a sticky failure, and wait for it."""
        task = self._task
        self.cancel(reason, sticky=False)
        if task is not None:
            await asyncio.wait([task])

    def output_for(self, node: PrimitiveNode) -> Output:
        """What `node` shows: the value, the error, or the job's progress."""
        outcome, job = self.outcome, self.job
        if job is not None:
            if ((self.op.options.latched and outcome is not None and outcome.ok
                    and not self.is_publisher) or self._latched_publisher(outcome)):
                return self._ok(outcome)  # type: ignore[arg-type]
            return Active(_ACTIVE_STATE.get(job.state, "ready"), node.uid)
        if outcome is None or (self.is_publisher and self.needs_run()):
            return Active("ready", node.uid)
        if not outcome.ok:
            return Failed(outcome.error or "failed", node.uid)
        return self._ok(outcome)

    def _latched_publisher(self, outcome: Outcome | None) -> bool:
        return (self.is_publisher and self.op.options.latched and outcome is not None
                and outcome.ok)

    def _ok(self, outcome: Outcome) -> Output:
        return Ok(None) if self.is_publisher else Ok(outcome.value)


_ACTIVE_STATE: dict[JobState, Any] = {
    JobState.CREATED: "ready",
    JobState.READY: "ready",
    JobState.WAITING_FOR_CONFIRMATION: "waiting-for-confirmation",
    JobState.RUNNING: "running",
}


_WORKING = frozenset((JobState.CREATED, JobState.READY, JobState.RUNNING))


class PrimitiveNode(Node):
    """A node running a cached operation on its key (and value, for a publisher)."""

    __slots__ = ("instance", "key")
    term: Primitive[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.instance: Instance | None = None
        self.key: Any = None

    def _switch(self, instance: Instance | None) -> None:
        if instance is self.instance:
            return
        old, self.instance = self.instance, instance
        if instance is not None:
            instance.add_user(self)
        if old is not None:
            old.remove_user(self)

    def evaluate(self) -> None:
        key_out = self.inputs[0].output
        if not isinstance(key_out, Ok):
            self._switch(None)
            self.engine.set_output(self, key_out)
            return
        op: Operation[Any, Any] = self.term.op
        try:
            # Job progress re-evaluates the node with the same key: skip hashing it again.
            if self.instance is not None and key_out.value is self.key:
                instance = self.instance
            else:
                instance = self.engine.cache.instance(op, key_out.value)
                self.key = key_out.value
            if isinstance(op, PublisherOp):
                value_out = self.inputs[1].output
                if not isinstance(value_out, Ok):
                    self._switch(None)
                    self.engine.set_output(self, value_out)
                    return
                instance.set_desired(value_out.value)
        except Exception as exc:
            self._switch(None)
            self.fail(error_message(exc))
            return
        self._switch(instance)
        instance.update()
        self.engine.set_output(self, instance.output_for(self))

    def destroy(self) -> None:
        self._switch(None)

    @property
    def job_id(self) -> str | None:
        instance = self.instance
        if instance is None:
            return None
        if instance.job is not None:
            return instance.job.id
        return instance.outcome.job_id if instance.outcome is not None else None

    @property
    def cached(self) -> bool:
        """Whether the value shown was stored by an earlier run rather than made by this process."""
        return self.instance is not None and self.instance.job is None and \
            self.instance.outcome is not None and not self.instance.ran_here

    @property
    def refreshing(self) -> str | None:
        instance = self.instance
        if instance is None or instance.job is None or not isinstance(self.output, Ok):
            return None
        return _ACTIVE_STATE.get(instance.job.state, "ready")


class Cache:
    """All cached operations of an engine: the live instances and the outcome database."""

    def __init__(self, engine: Engine, db_path: Path) -> None:
        self.engine = engine
        self.db_path = db_path
        self.by_job: dict[str, Instance] = {}
        self._instances: dict[tuple[str, str], Instance] = {}
        self._pools: dict[str, Pool] = {}
        self.working: set[Job] = set()
        self.closing = False
        self._db: sqlite3.Connection | None = None
        self._commit_pending = False
        self._stored: set[tuple[str, str]] = set()

    def open(self) -> None:
        """Open (creating if needed) the outcome database, and record the jobs an earlier process
        left unfinished as failed with `INTERRUPTED`.

        Raises sqlite3.DatabaseError, saying why, if the file is not a database or holds another
        schema; the file is then left as it is.
        """
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path)
        try:
            # Checked before anything is written: someone else's database must stay untouched.
            _check_schema(db, self.db_path)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._interrupted(db)
            db.commit()
        except BaseException:
            db.close()
            raise
        self._db = db
        # Most keys of a big pipeline's first run were never stored: knowing which were saves a
        # query per key.
        self._stored = set(db.execute("SELECT DISTINCT op, key FROM jobs"))

    def _interrupted(self, db: sqlite3.Connection) -> None:
        """Record every job left in `unfinished` (its process died) as an interrupted failure.

        Not sticky, so that its key runs again when wanted; finished when its log was last
        written, which is about when the process died.
        """
        rows = db.execute("SELECT job_id, op, key, key_pp, started FROM unfinished").fetchall()
        for job_id, op, key, key_pp, started in rows:
            log = self.engine.jobs.log_path(job_id)
            now = self.engine.clock.now()
            try:
                finished = datetime.fromtimestamp(log.stat().st_mtime, UTC)
                with log.open("a") as file:
                    # On a line of its own: the log may end in the middle of one.
                    file.write(f"\n{now:%Y-%m-%d %H:%M.%S}: Job failed: {INTERRUPTED}\n")
            except OSError:
                finished = now
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, op, key, key_pp, ok, outcome, sticky, started,"
                " finished) VALUES (?, ?, ?, ?, 0, ?, 0, ?, ?)",
                (job_id, op, key, key_pp, INTERRUPTED, started, finished.isoformat()))
        db.execute("DELETE FROM unfinished")

    def close(self) -> None:
        """Save and close the database."""
        if self._db is not None:
            self._db.commit()
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        """The open database connection."""
        if self._db is None:
            raise RuntimeError("cache database is not open")
        return self._db

    def node_class(self, term: Term[Any]) -> type[Node]:
        """The node class for a primitive term."""
        if isinstance(term, Primitive):
            return PrimitiveNode
        raise TypeError(f"unknown kind of term: {type(term).__name__}")

    def instance(self, op: Operation[Any, Any], key: Any) -> Instance:
        """The shared instance for (op, key)."""
        key_digest = op.key_digest(key)
        instance = self._instances.get((op.id, key_digest))
        if instance is None:
            instance = Instance(self, op, key, key_digest)
            self._instances[(op.id, key_digest)] = instance
            if op.options.pool is not None:
                self._pools[op.options.pool.name] = op.options.pool
        return instance

    def forget(self, instance: Instance) -> None:
        """Drop an instance that nobody uses and that runs nothing."""
        if not instance.users and instance.job is None:
            self._instances.pop((instance.op.id, instance.key_digest), None)
            for job_id in instance.job_ids:
                self.by_job.pop(job_id, None)

    def pools(self) -> list[Pool]:
        """The pools used by the operations seen so far."""
        return list(self._pools.values())

    def busy(self) -> bool:
        """Whether any job is queued or running (waiting for confirmation does not count)."""
        return bool(self.working)

    def load(self, op: Operation[Any, Any], key_digest: str) -> Outcome | None:
        """The latest stored outcome for a key of `op`."""
        if (op.id, key_digest) not in self._stored:
            return None
        row = self.db.execute(
            "SELECT job_id, ok, outcome, sticky, value_digest, rebuild, finished FROM jobs"
            " WHERE op = ? AND key = ? ORDER BY finished DESC, rowid DESC LIMIT 1",
            (op.id, key_digest),
        ).fetchone()
        if row is None:
            return None
        job_id, ok, outcome, sticky, value_digest, rebuild, finished = row
        # A publisher stores no value.
        value = op.decode(outcome) if ok and not isinstance(op, PublisherOp) else None
        return Outcome(
            job_id=job_id, ok=bool(ok), value=value, error=None if ok else outcome,
            finished=datetime.fromisoformat(finished), sticky=bool(sticky),
            value_digest=value_digest, rebuild=bool(rebuild),
        )

    def record(self, instance: Instance, job: Job, encoded: str) -> None:
        """Store a finished job's outcome (committed at the end of this loop iteration)."""
        outcome = instance.outcome
        assert outcome is not None
        self.db.execute(
            "INSERT INTO jobs (job_id, op, key, key_pp, value_digest, ok, outcome, sticky,"
            " started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, instance.op.id, instance.key_digest, instance.op.pp(instance.key),
             outcome.value_digest, int(outcome.ok), encoded if outcome.ok else outcome.error,
             int(outcome.sticky), job.started.isoformat() if job.started else None,
             outcome.finished.isoformat()),
        )
        self.db.execute("DELETE FROM unfinished WHERE job_id = ?", (job.id,))
        self._stored.add((instance.op.id, instance.key_digest))
        self._commit_soon()

    def unfinished(self, instance: Instance, job: Job) -> None:
        """Note that `job` is not finished, so that a process that dies before it is can be told
        at the next start (see `open`)."""
        self.db.execute(
            "INSERT OR REPLACE INTO unfinished (job_id, op, key, key_pp, started)"
            " VALUES (?, ?, ?, ?, ?)",
            (job.id, instance.op.id, instance.key_digest, instance.op.pp(instance.key),
             job.started.isoformat() if job.started else None))
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit at the end of this loop iteration, once for all the writes made in it."""
        if not self._commit_pending:
            self._commit_pending = True
            self.engine.loop.call_soon(self._commit)

    def _commit(self) -> None:
        self._commit_pending = False
        if self._db is not None:
            self._db.commit()

    def find(self, job_id: str) -> Instance | None:
        """The live instance that ran `job_id`."""
        return self.by_job.get(job_id)

    def stored(self, job_id: str) -> bool:
        """Whether the database holds an outcome for `job_id`."""
        row = self.db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is not None

    def rebuild(self, job_id: str) -> bool:
        """Run the key of `job_id` again: now if it is in use, else the next time it is wanted.

        Returns False if no stored job has that id.
        """
        instance = self.find(job_id)
        if instance is None:
            # An earlier job, or one stored by an earlier process: act on its key.
            row = self.db.execute("SELECT op, key FROM jobs WHERE job_id = ?",
                                  (job_id,)).fetchone()
            if row is None:
                return False
            instance = self._instances.get(row)
            if instance is None:
                # Marks the outcome the key's next user will load.
                self.db.execute(
                    "UPDATE jobs SET rebuild = 1 WHERE rowid = (SELECT rowid FROM jobs"
                    " WHERE op = ? AND key = ? ORDER BY finished DESC, rowid DESC LIMIT 1)", row)
                self.db.commit()
                return True
        if instance.job is None:
            instance.rebuild_requested = True
            instance.update()
            instance.notify()
        return True

    def cancel(self, job_id: str) -> bool:
        """Cancel a running job (a sticky failure "Cancelled"); False if it is not running."""
        instance = self.find(job_id)
        if instance is None or instance.job is None or instance.job.id != job_id:
            return False
        instance.cancel("Cancelled")
        return True

    def history(self, op_id: str, key_digest: str) -> list[dict[str, Any]]:
        """Every stored run of a key, newest first."""
        rows = self.db.execute(
            "SELECT job_id, ok, outcome, started, finished FROM jobs WHERE op = ? AND key = ?"
            " ORDER BY finished DESC, rowid DESC", (op_id, key_digest)).fetchall()
        return [dict(zip(("job_id", "ok", "outcome", "started", "finished"), r, strict=True))
                for r in rows]

    async def shutdown(self, reason: str) -> None:
        """Cancel every running job without recording sticky failures; wait for them.

        No job starts after this.
        """
        self.closing = True
        running = [i for i in list(self._instances.values()) if i.job is not None]
        await asyncio.gather(*(i.stop(reason) for i in running))
        self._commit()
