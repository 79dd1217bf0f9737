"""The live side of cached operations: one `Instance` per (operation, key) in use, the nodes that
use them (`PrimitiveNode`), and the `Cache` holding both for an engine.

Nodes asking for the same operation and key share one instance and so one job. The cache needs
only what `Host` describes from the engine that runs it, so it can be run without one.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline.cache.declarations import Operation, PublisherOp
from pipeline.cache.storage import INTERRUPTED, Database, Entry
from pipeline.clock import Clock, Timer
from pipeline.jobs import Job, JobCancelled, JobRegistry, JobState
from pipeline.nodes import NODE_CLASSES, Node, error_message
from pipeline.output import Active, Failed, NodeState, Ok, Output
from pipeline.pool import Pool
from pipeline.term import Primitive


class Host(Protocol):
    """What the cache needs from the engine that runs it."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that jobs run on."""
        ...

    @property
    def clock(self) -> Clock:
        """The time, for expiry and finish times."""
        ...

    @property
    def jobs(self) -> JobRegistry:
        """Where jobs are created and their logs found."""
        ...

    def schedule(self, node: Node) -> None:
        """Evaluate `node` again (an instance's outcome or job changed)."""
        ...

    def check_idle(self) -> None:
        """Look again whether anything is left to do (a job changed state)."""
        ...


class Instance:
    """The live state of one (operation, key): its stored outcome, its running job, its users,
    and the configuration its next run gets (its latest user's)."""

    def __init__(self, cache: Cache, op: Operation[Any, Any], key: Any, key_digest: str,
                 config: Any) -> None:
        self.cache = cache
        self.op = op
        self.key = key
        self.key_digest = key_digest
        self.config = config
        self.outcome: Entry | None = cache.db.latest(op.id, key_digest)
        self.value: Any = self._decode(self.outcome)
        """The outcome's value, decoded (None for a publisher or a failure)."""
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
        self.key_pp = ""
        """The key's description for people (`Operation.pp`), made when a job starts."""

    def _decode(self, entry: Entry | None) -> Any:
        if entry is None or not entry.ok or self.is_publisher:
            return None  # a publisher stores no value
        assert entry.value is not None
        return self.op.decode(entry.value)  # type: ignore[attr-defined]

    @property
    def is_publisher(self) -> bool:
        """Whether this is a publisher's instance."""
        return isinstance(self.op, PublisherOp)

    def notify(self, *, besides: PrimitiveNode | None = None) -> None:
        """Re-evaluate every node using this instance (but `besides`, being evaluated now)."""
        for node in tuple(self.users):
            if node is not besides:
                self.cache.host.schedule(node)

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

    def _expired(self, outcome: Entry) -> bool:
        valid_for = self.op.options.valid_for
        now = self.cache.host.clock.now()
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
        """Start a job if one is needed and wanted; otherwise arrange for expiry. The users are
        not told: the caller notifies them."""
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
            self._timer = self.cache.host.clock.call_at(when, self._on_expiry)

    def _on_expiry(self) -> None:
        self._timer = None
        self.update()
        self.notify()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        # What may raise (the key's description is user code, making a job may fail) comes
        # before anything changes: a failed start leaves the instance as it was, not busy for ever.
        self.key_pp = self.op.pp(self.key)
        options = self.op.options
        # The declaration's pool and level are the defaults of the run's `job.start`; a key
        # never built goes before rebuilds in its pool.
        job = self.cache.host.jobs.create(self.op.id, level=options.level, pool=options.pool,
                                          high_priority=self.outcome is None)
        self._cancel_timer()
        self.job = job
        self.cache.working.add(job)
        self._sticky_cancel = True
        self._running_digest = self.desired[1] if self.desired is not None else None
        value = self.desired[0] if self.desired is not None else None
        job.on_state_change(self._on_job_state)
        self.cache.by_job[job.id] = self
        self.job_ids.append(job.id)
        self.cache.note_unfinished(self, job)
        self._task = self.cache.host.loop.create_task(self._run(job, value, self.config),
                                                      name=f"job {job.id}")

    def _on_job_state(self, job: Job) -> None:
        if job.state is JobState.RUNNING:
            self.cache.note_unfinished(self, job)  # again, now with its start time
        if job.pool is not None:
            # Known only now: the run chooses its pool when it starts.
            self.cache.note_pool(job.pool)
        if job.state in _WORKING:
            self.cache.working.add(job)
        else:
            self.cache.working.discard(job)
        # The engine checked idleness when the job changed state, before `working` was updated;
        # an instance nobody uses any more schedules no node that would check it again.
        self.cache.host.check_idle()
        self.notify()

    def cancel(self, reason: str, *, sticky: bool = True) -> None:
        """Cancel the running job; a non-sticky cancellation is retried when wanted again."""
        if self.job is not None:
            self._sticky_cancel = sticky
            self.job.cancel(reason)

    async def _run(self, job: Job, value: Any, config: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        error: str | None = None
        encoded = ""
        result: Any = None
        try:
            # Inside the try: a log that cannot be written fails the job like any other error.
            job.log(f"{self.op.id}: {self.key_pp}")
            # Before the start, which an operation that starts its own job awaits inside its
            # function: a cancellation while it waits for confirmation or a slot ends the run.
            job.on_cancel(lambda _reason: task.cancel())
            if not self.op.starts_job:
                await job.start()
            if isinstance(self.op, PublisherOp):
                await self.op.run(job, self.key, value, config)
            else:
                result = await self.op.run(job, self.key, config)  # type: ignore[attr-defined]
                encoded = self.op.encode(result)  # type: ignore[attr-defined]
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
        self.outcome = Entry(
            job_id=job.id, op=self.op.id, key_digest=self.key_digest, key_pp=self.key_pp,
            ok=error is None, value=encoded if error is None else None, error=error,
            started=job.started, finished=job.finished or self.cache.host.clock.now(),
            sticky=sticky, value_digest=self._running_digest, queued=job.created,
            skipped=job.skipped if error is None else None,
        )
        self.value = result if error is None else None
        self.ran_here = True
        self.rebuild_requested = False
        self.cache.record(self.outcome)
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
                return self._ok()
            return Active(_ACTIVE_STATE.get(job.state, NodeState.READY), node.uid)
        if outcome is None or (self.is_publisher and self.needs_run()):
            return Active(NodeState.READY, node.uid)
        if not outcome.ok:
            return Failed(outcome.error or "failed", node.uid)
        return self._ok()

    def _latched_publisher(self, outcome: Entry | None) -> bool:
        return (self.is_publisher and self.op.options.latched and outcome is not None
                and outcome.ok)

    def _ok(self) -> Output:
        return Ok(None) if self.is_publisher else Ok(self.value)


_ACTIVE_STATE: dict[JobState, NodeState] = {
    JobState.CREATED: NodeState.READY,
    JobState.READY: NodeState.READY,
    JobState.WAITING_FOR_CONFIRMATION: NodeState.WAITING_FOR_CONFIRMATION,
    JobState.RUNNING: NodeState.RUNNING,
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
                instance = self.engine.cache.instance(op, key_out.value, self.term.config)
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
        instance.config = self.term.config
        running = instance.job
        instance.update()
        if instance.job is not running:
            # A job started: the instance's other users show it too, as this node does below.
            instance.notify(besides=self)
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
    def refreshing(self) -> NodeState | None:
        instance = self.instance
        if instance is None or instance.job is None or not isinstance(self.output, Ok):
            return None
        return _ACTIVE_STATE.get(instance.job.state, NodeState.READY)


NODE_CLASSES[Primitive] = PrimitiveNode


class Cache:
    """All cached operations of an engine (`host`): the live instances and their records (`db`,
    which must be the one the host's jobs were given)."""

    def __init__(self, host: Host, db: Database) -> None:
        self.host = host
        self.db = db
        self.by_job: dict[str, Instance] = {}
        self._instances: dict[tuple[str, str], Instance] = {}
        self._pools: dict[str, Pool] = {}
        self.working: set[Job] = set()
        self.closing = False
        self._commit_pending = False

    def open(self) -> None:
        """Open the records, recording the jobs an earlier process left unfinished as failed
        (`pipeline.cache.storage.INTERRUPTED`), each in its log too.

        Raises sqlite3.DatabaseError, saying why, if the file is not a pipeline's database.
        """
        self.db.open(self._finish_interrupted)

    def _finish_interrupted(self, job_id: str) -> datetime:
        """End the log of a job whose process died; when it finished: when its log was last
        written, which is about when the process died (now if it had written none)."""
        log = self.host.jobs.log_path(job_id)
        now = self.host.clock.now()
        try:
            finished = datetime.fromtimestamp(log.stat().st_mtime, UTC)
        except OSError:
            finished = now
        # A job that died before writing anything gets a log saying so.
        with contextlib.suppress(OSError):
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as file:
                # On a line of its own: the log may end in the middle of one.
                file.write(f"\n{now:%Y-%m-%d %H:%M.%S}: Job failed: {INTERRUPTED}\n")
        return finished

    def close(self) -> None:
        """Save and close the records."""
        self.db.close()

    def instance(self, op: Operation[Any, Any], key: Any, config: Any = None) -> Instance:
        """The shared instance for (op, key) under `config` (which counts only if the operation's
        key digest reads it)."""
        key_digest = op.key_digest(key, config)
        instance = self._instances.get((op.id, key_digest))
        if instance is None:
            instance = Instance(self, op, key, key_digest, config)
            self._instances[(op.id, key_digest)] = instance
        return instance

    def forget(self, instance: Instance) -> None:
        """Drop an instance that nobody uses and that runs nothing."""
        if not instance.users and instance.job is None:
            self._instances.pop((instance.op.id, instance.key_digest), None)
            for job_id in instance.job_ids:
                self.by_job.pop(job_id, None)

    def note_pool(self, pool: Pool) -> None:
        """Remember a pool a job waited for or ran in, for `pools`."""
        self._pools.setdefault(pool.name, pool)

    def pools(self) -> list[Pool]:
        """The pools the jobs of this cache have used so far."""
        return list(self._pools.values())

    def busy(self) -> bool:
        """Whether any job is queued or running (waiting for confirmation does not count)."""
        return bool(self.working)

    def record(self, entry: Entry) -> None:
        """Store a finished run (committed at the end of this loop iteration)."""
        self.db.record(entry)
        self._commit_soon()

    def note_unfinished(self, instance: Instance, job: Job) -> None:
        """Note that `job` is not finished, so that a process that dies before it is can be told
        at the next start (see `open`)."""
        self.db.note_unfinished(job.id, instance.op.id, instance.key_digest,
                                instance.key_pp, job.started)
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit at the end of this loop iteration, once for all the writes made in it.

        The commit is queued on the loop before the task of any job made after the write: a
        job's note in `unfinished` is on disk before the job runs its first step, so a process
        killed while the job does anything is told of it at the next start.
        """
        if not self._commit_pending:
            self._commit_pending = True
            self.host.loop.call_soon(self._commit)

    def _commit(self) -> None:
        self._commit_pending = False
        self.db.commit()

    def find(self, job_id: str) -> Instance | None:
        """The live instance that ran `job_id`."""
        return self.by_job.get(job_id)

    def live(self, op_id: str, key_digest: str) -> Instance | None:
        """The instance of (`op_id`, `key_digest`) if the key is in use (or runs a job)."""
        return self._instances.get((op_id, key_digest))

    def rebuild(self, job_id: str) -> bool:
        """Run the key of `job_id` again: now if it is in use, else the next time it is wanted.

        Returns False if no stored job has that id.
        """
        instance = self.find(job_id)
        if instance is None:
            # An earlier job, or one stored by an earlier process: act on its key.
            entry = self.db.entry(job_id)
            if entry is None:
                return False
            instance = self.live(entry.op, entry.key_digest)
            if instance is None:
                # Marks the outcome the key's next user will load.
                self.db.mark_rebuild(entry.op, entry.key_digest)
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

    async def shutdown(self, reason: str) -> None:
        """Cancel every running job without recording sticky failures; wait for them.

        No job starts after this.
        """
        self.closing = True
        running = [i for i in list(self._instances.values()) if i.job is not None]
        await asyncio.gather(*(i.stop(reason) for i in running))
        self._commit()
