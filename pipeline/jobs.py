"""Jobs: one run of a primitive, with its log file, risk level, pool slot and lifecycle.

A job's life is ``CREATED -> [WAITING_FOR_CONFIRMATION] -> [READY] -> RUNNING -> OK | FAILED``.
Whoever calls :meth:`Job.start` owns the job and must call :meth:`Job.finish` exactly once, also
when ``start()`` raised (a cancelled job is finished with the error ``"Cancelled"``). A job is
created with a pool and a risk level; whoever starts it may choose others for this run (as
OCurrent's ``Job.start ?pool ~level``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import random
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.level import Level
from pipeline.pool import Pool, PoolSlot

if TYPE_CHECKING:
    from pipeline.cache.storage import Database

_LABEL_MAX = 40
_OPEN_LOGS_MAX = 128
"""How many job logs a registry keeps open for writing at once: enough for every job of a busy CI
writing output at the same time, few enough that a process with 100,000 jobs stays far from its
limit of open files."""
_UNSAFE_LABEL_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
# [0-9] rather than \d: \d also matches non-ASCII digits, which no job id contains.
_JOB_ID = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}/[0-9]{6}-[A-Za-z0-9_.-]{1,40}-[0-9a-f]{6}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class JobState(enum.StrEnum):
    """Where a job is in its life; the values match the diagram's node states."""

    CREATED = "created"
    WAITING_FOR_CONFIRMATION = "waiting-for-confirmation"
    READY = "ready"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"


class _AsCreated(enum.Enum):
    AS_CREATED = enum.auto()


AS_CREATED = _AsCreated.AS_CREATED
"""For :meth:`Job.start`'s `pool`: keep the pool the job was created with (None means no pool)."""


class JobCancelled(Exception):
    """Raised by :meth:`Job.start` when the job is cancelled before it starts running.

    Deliberately not an :class:`asyncio.CancelledError`: the task awaiting ``start()`` was not
    cancelled and should go on to record the failure with ``job.finish(str(exc))``.
    """

    def __init__(self, reason: str) -> None:
        """Record why the job was cancelled; ``str(exc)`` is the reason."""
        super().__init__(reason)
        self.reason = reason


class Confirmation:
    """The confirmation threshold shared by all jobs (``--confirm LEVEL``).

    Jobs whose level is at or above the threshold wait for a person before they start; a threshold
    of None never asks.
    """

    def __init__(self, threshold: Level | None = None) -> None:
        """Start with `threshold` (None: no job needs confirmation)."""
        self._threshold = threshold
        # One wake-up event per job currently waiting; a threshold change sets them all so that
        # each job re-checks its own level.
        self._waiters: set[asyncio.Event] = set()

    @property
    def threshold(self) -> Level | None:
        """The current threshold, or None if no job needs confirmation."""
        return self._threshold

    def needs_confirmation(self, level: Level) -> bool:
        """Whether a job of `level` must wait for a person under the current threshold."""
        return self._threshold is not None and level >= self._threshold

    def set_threshold(self, threshold: Level | None) -> None:
        """Change the threshold and re-check every waiting job.

        Waiting jobs that no longer need confirmation go on at once. Jobs already past the check
        are not recalled by a stricter threshold.
        """
        self._threshold = threshold
        for waiter in self._waiters:
            waiter.set()


class Job:
    """One run of a primitive. Made by :meth:`JobRegistry.create`, not constructed directly.

    The log file is created by the first write (a job that writes nothing has none), and every
    write goes straight to it so that followers (the web UI's log stream) see output at once. It
    is not held open for the job's life: the registry keeps a bounded set of recently written
    logs open, so that the number of open files does not grow with the number of jobs.
    """

    def __init__(
        self,
        *,
        job_id: str,
        label: str,
        log_file: str,
        open_logs: _OpenLogs,
        created: datetime,
        level: Level,
        pool: Pool | None,
        high_priority: bool,
        confirmation: Confirmation,
        clock: Callable[[], datetime],
        state_dir: Path,
        records: Database | None,
    ) -> None:
        """A job whose log is `log_file`, written through `open_logs` (the registry's)."""
        self.id = job_id
        self.label = label
        self._log_file = log_file
        # Where primitives keep what outlives a job (e.g. git mirrors): the engine's state dir.
        self.state_dir = state_dir
        self.records = records
        """The records of earlier runs of the cache this job runs for (the engine's), for a job
        that reports on other jobs; None for jobs made outside an engine."""
        self.created = created
        self.level = level
        """The risk level checked against the confirmation threshold (final once started)."""
        self.pool = pool
        """The pool whose slot the job waits for, or None (final once started)."""
        self.high_priority = high_priority
        """Whether the job jumps its pool's normal queue (the cache's first build of a key)."""
        self._open_logs = open_logs
        self._log_created = False
        self._confirmation = confirmation
        self._clock = clock
        self._state = JobState.CREATED
        self._started: datetime | None = None
        self._finished: datetime | None = None
        self._error: str | None = None
        self._skipped: str | None = None
        self._cancelled_reason: str | None = None
        self._approved = False
        self._starting = False
        self._slot: PoolSlot | None = None
        self._acquiring: asyncio.Future[PoolSlot] | None = None
        # Set by approve(), cancel() and threshold changes: anything that may end a
        # confirmation wait. Both events are made when first waited for: most jobs of a big
        # pipeline never wait for confirmation, nor does anyone wait for them to finish.
        self._wakeup: asyncio.Event | None = None
        self._done = False
        self._done_event: asyncio.Event | None = None
        self._state_callbacks: list[Callable[[Job], None]] = []
        self._cancel_callbacks: list[Callable[[str], None]] = []

    @property
    def log_path(self) -> Path:
        """The job's log file."""
        # Kept as a string until asked for: making a Path per job is measurable when a big
        # pipeline starts thousands of jobs at once.
        return Path(self._log_file)

    @property
    def state(self) -> JobState:
        """The job's current state."""
        return self._state

    @property
    def started(self) -> datetime | None:
        """When the job began running (UTC), or None if it has not."""
        return self._started

    @property
    def finished(self) -> datetime | None:
        """When the job finished (UTC), or None if it has not."""
        return self._finished

    @property
    def error(self) -> str | None:
        """The failure message once the job has FAILED, else None."""
        return self._error

    @property
    def skipped(self) -> str | None:
        """Why the job had nothing to do, once :meth:`skip` has said so; else None."""
        return self._skipped

    def skip(self, reason: str) -> None:
        """Say that the job has nothing to do, and why (a missing tool, say): if it then
        succeeds, it is shown and recorded as skipped with `reason`, not as a success."""
        self._skipped = reason
        self.log(f"Skipped: {reason}")

    @property
    def cancelled_reason(self) -> str | None:
        """The reason given to :meth:`cancel`, or None if the job was not cancelled."""
        return self._cancelled_reason

    @property
    def is_cancelled(self) -> bool:
        """Whether :meth:`cancel` took effect (it does nothing on a finished job)."""
        return self._cancelled_reason is not None

    def log(self, message: str) -> None:
        """Append the line ``YYYY-MM-DD HH:MM.SS: message`` (UTC) to the job's log."""
        self.write(f"{self._clock():%Y-%m-%d %H:%M.%S}: {message}\n")

    def write(self, data: bytes | str) -> None:
        """Append raw output (e.g. a build's stdout) to the log; str is written as UTF-8.

        Raises RuntimeError once the job has finished, because its log is then closed, and
        OSError if the log cannot be written (a full disk, a log of the same name left by an
        earlier process).
        """
        if self._done:
            raise RuntimeError(f"job {self.id} has finished; its log is closed")
        # A character that cannot be encoded must not fail the job that is logging it.
        raw = data.encode("utf-8", errors="replace") if isinstance(data, str) else data
        self._open_logs.write(self._log_file, raw, create=not self._log_created)
        self._log_created = True

    def _log_regardless(self, message: str) -> None:
        """Log `message` unless the log cannot be written: for the lines of `cancel` and
        `finish`, which must do the rest of their work whatever the disk says."""
        with contextlib.suppress(OSError):
            self.log(message)

    async def start(
        self, *, pool: Pool | _AsCreated | None = AS_CREATED, level: Level | None = None
    ) -> None:
        """Take the job from CREATED to RUNNING, in `pool` at `level` (by default the pool and
        level it was created with; `pool=None` runs it in no pool).

        If its level needs confirmation it first waits in WAITING_FOR_CONFIRMATION until
        :meth:`approve` or a threshold change that no longer requires it. Then, if it has a pool, it
        waits in READY for a slot (a :attr:`high_priority` job jumps the normal queue); the slot
        is held until :meth:`finish`. Raises :class:`JobCancelled` if :meth:`cancel` is called
        before the job is running; the caller must still :meth:`finish` it. Raises RuntimeError if
        called twice.
        """
        if self._state is not JobState.CREATED or self._starting:
            raise RuntimeError(f"job {self.id} has already been started")
        if pool is not AS_CREATED:
            self.pool = pool
        if level is not None:
            self.level = level
        self._starting = True
        try:
            await self._await_confirmation()
            if self.pool is not None:
                self._slot = await self._acquire_slot(self.pool)
            self._started = self._clock()
            self.log("Job started")
            self._set_state(JobState.RUNNING)
        finally:
            self._starting = False

    def approve(self) -> None:
        """Start now: let the job run without waiting for confirmation.

        Approving a job before it reaches the confirmation check also counts.
        """
        self._approved = True
        if self._wakeup is not None:
            self._wakeup.set()

    def cancel(self, reason: str = "Cancelled") -> None:
        """Ask the job to stop, recording `reason`.

        A pending :meth:`start` raises :class:`JobCancelled`; every :meth:`on_cancel` callback is
        called with `reason` (a callback's exception is written to the job log so that the others
        still run). Does nothing if the job has finished or was already cancelled.
        """
        if self._done or self._cancelled_reason is not None:
            return
        self._cancelled_reason = reason
        self._log_regardless(f"Cancelling: {reason}")
        if self._wakeup is not None:
            self._wakeup.set()
        if self._acquiring is not None:
            self._acquiring.cancel()
        for callback in self._cancel_callbacks:
            try:
                callback(reason)
            except Exception as exc:
                # cancel() is called by whoever pressed the button, not by the callback's owner;
                # the job log is where the owner will look.
                self._log_regardless(f"Error in cancel callback {callback!r}: {exc!r}")

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` when the job is cancelled; at once if it already was."""
        if self._cancelled_reason is not None:
            callback(self._cancelled_reason)
        else:
            self._cancel_callbacks.append(callback)

    def on_state_change(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` after every change of :attr:`state`."""
        self._state_callbacks.append(callback)

    def finish(self, error: str | None = None) -> None:
        """Record the outcome: OK if `error` is None, else FAILED with `error`.

        Writes a final log line (if the log can be written), closes the log, releases the pool
        slot and wakes :meth:`wait_done`. Raises RuntimeError if the job has already finished, or
        if a :meth:`start` is still waiting (cancel it and let it raise first).
        """
        if self._done:
            raise RuntimeError(f"job {self.id} has already finished")
        if self._starting:
            raise RuntimeError(f"job {self.id} cannot finish while start() is waiting; cancel it")
        self._finished = self._clock()
        self._error = error
        self._log_regardless(f"Job failed: {error}" if error is not None
                             else f"Job skipped: {self._skipped}" if self._skipped is not None
                             else "Job succeeded")
        self._open_logs.close(self._log_file)
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        self._done = True
        if self._done_event is not None:
            self._done_event.set()
        self._set_state(JobState.OK if error is None else JobState.FAILED)

    async def wait_done(self) -> None:
        """Wait until :meth:`finish` has been called."""
        if self._done:
            return
        if self._done_event is None:
            self._done_event = asyncio.Event()
        await self._done_event.wait()

    def actions(self) -> set[str]:
        """The actions a user may take now: a subset of ``{"cancel", "start-now"}``."""
        if self._done or self._cancelled_reason is not None:
            return set()
        if self._state is JobState.WAITING_FOR_CONFIRMATION:
            return {"cancel", "start-now"}
        return {"cancel"}

    async def follow(self, start: int = 0) -> AsyncIterator[bytes]:
        """Stream this job's log from byte offset `start` until the job has finished (a log not
        written yet is waited for; a job that finished without one streams nothing)."""
        try:
            async for chunk in follow_log(self.log_path, done=lambda: self._done, start=start):
                yield chunk
        except FileNotFoundError:
            if self._log_created:
                raise

    def __repr__(self) -> str:
        """Show the id and state."""
        return f"<Job {self.id} {self._state}>"

    def _set_state(self, state: JobState) -> None:
        self._state = state
        for callback in list(self._state_callbacks):
            callback(self)

    def _must_wait_for_confirmation(self) -> bool:
        return (
            self._cancelled_reason is None
            and not self._approved
            and self._confirmation.needs_confirmation(self.level)
        )

    def _raise_if_cancelled(self) -> None:
        if self._cancelled_reason is not None:
            raise JobCancelled(self._cancelled_reason)

    async def _await_confirmation(self) -> None:
        self._raise_if_cancelled()
        if not self._must_wait_for_confirmation():
            return
        self._set_state(JobState.WAITING_FOR_CONFIRMATION)
        self.log(
            f"Waiting for confirmation: level {self.level} is at or above "
            f"the threshold {self._confirmation.threshold}"
        )
        wakeup = self._wakeup = asyncio.Event()
        self._confirmation._waiters.add(wakeup)
        try:
            while self._must_wait_for_confirmation():
                await wakeup.wait()
                wakeup.clear()
        finally:
            self._confirmation._waiters.discard(wakeup)
        self._raise_if_cancelled()

    async def _acquire_slot(self, pool: Pool) -> PoolSlot:
        self._set_state(JobState.READY)
        self.log(f"Waiting for a slot in pool {pool.name}")
        # A separate task, so that cancel() can withdraw the request without cancelling the
        # caller's task; Pool.acquire cleans up the queue when its task is cancelled.
        acquiring = asyncio.ensure_future(pool.acquire(high_priority=self.high_priority))
        self._acquiring = acquiring
        try:
            slot = await acquiring
        except asyncio.CancelledError:
            task = asyncio.current_task()
            caller_cancelled = task is not None and task.cancelling() > 0
            if self._cancelled_reason is not None and not caller_cancelled:
                raise JobCancelled(self._cancelled_reason) from None
            raise
        finally:
            self._acquiring = None
        if self._cancelled_reason is not None:
            # cancel() came after the pool granted the slot but before this task resumed.
            slot.release()
            raise JobCancelled(self._cancelled_reason)
        return slot


class JobRegistry:
    """Creates jobs and finds them again: live jobs of this process, log files of any process."""

    def __init__(
        self,
        jobs_dir: Path,
        confirmation: Confirmation,
        clock: Callable[[], datetime] = _utc_now,
        records: Database | None = None,
    ) -> None:
        """Keep logs under `jobs_dir` (e.g. ``var/job``); `clock` must return aware UTC times;
        `records` are the cache's records that every job is given (see :attr:`Job.records`)."""
        self._jobs_dir = Path(jobs_dir)
        self._confirmation = confirmation
        self._clock = clock
        self._open_logs = _OpenLogs(_OPEN_LOGS_MAX)
        # Job ids name their second: those issued in the latest second are enough to keep this
        # process's ids apart (logs are created later, at the first write, so the disk cannot).
        self._second = ""
        self._ids_this_second: set[str] = set()
        # Logs of an earlier process can only bear a second this registry has not outlived;
        # later seconds need no look at the disk.
        self._latest_second = f"{clock():%Y-%m-%d/%H%M%S}"
        self._check_disk = True
        self._records = records
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self.keep_finished = 1000
        """How many finished jobs `get` still returns (older ones are forgotten)."""
        self._change_callbacks: list[Callable[[Job], None]] = []

    @property
    def jobs_dir(self) -> Path:
        """The directory holding every job's log."""
        return self._jobs_dir

    @property
    def confirmation(self) -> Confirmation:
        """The confirmation threshold the registry's jobs check."""
        return self._confirmation

    def create(self, label: str, *, level: Level = Level.AVERAGE, pool: Pool | None = None,
               high_priority: bool = False) -> Job:
        """Create a job; `level` and `pool` are what :meth:`Job.start` uses unless told
        otherwise, `high_priority` jumps the pool's normal queue. Its log file is created by its
        first write.

        The id is ``YYYY-MM-DD/HHMMSS-label-xxxxxx``: creation time in UTC, `label` with characters
        outside ``[A-Za-z0-9_.-]`` replaced by ``-`` and cut to 40 characters, and 6 random hex
        digits, never the id of another job of this registry or of a log already in its
        directory. Raises ValueError for an empty label.
        """
        safe_label = _UNSAFE_LABEL_CHAR.sub("-", label)[:_LABEL_MAX]
        if not safe_label:
            raise ValueError("a job label must not be empty")
        created = self._clock()
        job_id, log_file = self._new_id(created, safe_label)
        job = Job(
            job_id=job_id,
            label=label,
            log_file=log_file,
            state_dir=self._jobs_dir.parent,
            records=self._records,
            open_logs=self._open_logs,
            created=created,
            level=level,
            pool=pool,
            high_priority=high_priority,
            confirmation=self._confirmation,
            clock=self._clock,
        )
        job.on_state_change(self._notify)
        self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with `job_id` if this process created it and it is running or among the
        `keep_finished` latest finished jobs, else None."""
        return self._jobs.get(job_id)

    def active(self) -> list[Job]:
        """The jobs of this process that have not finished, oldest first."""
        return [job for job in self._jobs.values() if job.finished is None]

    def log_path(self, job_id: str) -> Path:
        """The log file of `job_id`, which may belong to an earlier process.

        Raises ValueError unless `job_id` has exactly the job id format, so that an id taken from
        a URL cannot name a file outside the jobs directory.
        """
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self._jobs_dir / f"{job_id}.log"

    def on_change(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` whenever any job of this registry changes state."""
        self._change_callbacks.append(callback)

    def _notify(self, job: Job) -> None:
        if job.finished is not None:
            self._finished.append(job.id)
            # A long-running engine makes jobs for ever: keep only the latest finished ones in
            # memory (the cache's database and the log files keep the rest).
            while len(self._finished) > self.keep_finished:
                self._jobs.pop(self._finished.popleft(), None)
        for callback in list(self._change_callbacks):
            callback(job)

    def _new_id(self, created: datetime, safe_label: str) -> tuple[str, str]:
        """A fresh job id for a job of `safe_label` created at `created`, and its log file."""
        second = f"{created:%Y-%m-%d/%H%M%S}"
        if second != self._second:
            self._second = second
            self._ids_this_second = set()
            # A second not after every one seen so far (the start, or the clock went back) may
            # have logs on disk already; a new one cannot.
            self._check_disk = second <= self._latest_second
            self._latest_second = max(second, self._latest_second)
        while True:
            # The suffix only tells apart jobs of one label and second: it need not be secret.
            job_id = f"{second}-{safe_label}-{random.getrandbits(24):06x}"
            log_file = f"{self._jobs_dir}/{job_id}.log"
            if job_id in self._ids_this_second or (self._check_disk
                                                   and os.path.lexists(log_file)):
                continue
            self._ids_this_second.add(job_id)
            return job_id, log_file


class _OpenLogs:
    """The job logs open for writing: at most `limit` of them, the least recently written closed
    first, so that the number of open files does not grow with the number of jobs."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def write(self, log_file: str, data: bytes, *, create: bool) -> None:
        """Append `data` to `log_file`, opening it if needed; `create`: this is its first write,
        which creates the file (and its day directory) and fails if the file exists."""
        fd = self._fds.get(log_file)
        if fd is None:
            fd = self._open(log_file, create)
        else:
            self._fds.move_to_end(log_file)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def close(self, log_file: str) -> None:
        """Close `log_file` if it is open (its job has finished)."""
        fd = self._fds.pop(log_file, None)
        if fd is not None:
            os.close(fd)

    def _open(self, log_file: str, create: bool) -> int:
        if len(self._fds) >= self._limit:
            _, oldest = self._fds.popitem(last=False)
            os.close(oldest)
        # O_EXCL on the first write: a log left by another process under the same id must never
        # become a shared log. A log reopened later may have been removed: it is made again.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_EXCL if create else 0)
        try:
            fd = os.open(log_file, flags, 0o644)
        except FileNotFoundError:
            # The first log of its day (or the day's directory was removed): make the directory.
            os.makedirs(os.path.dirname(log_file), exist_ok=True)
            fd = os.open(log_file, flags, 0o644)
        self._fds[log_file] = fd
        return fd


async def follow_log(
    path: Path,
    *,
    done: Callable[[], bool],
    poll_interval: float = 0.05,
    start: int = 0,
    chunk_size: int = 65536,
) -> AsyncIterator[bytes]:
    """Yield the content of the file at `path` from byte offset `start` as it grows.

    Chunks are at most `chunk_size` bytes, so a large log is never held in memory whole. At the end
    of the file it polls every `poll_interval` seconds; once `done()` is true it yields whatever
    remains and stops. A file not created yet is waited for, polling likewise; raises
    FileNotFoundError if there is none once `done()` is true.
    """
    # done() is sampled before the look: a log created just before done() became true is found.
    while not done() and not path.exists():
        await asyncio.sleep(poll_interval)
    with open(path, "rb", buffering=0) as log:
        log.seek(start)
        while True:
            # Sampled before reading: everything written before done() became true is then read
            # below, so nothing is lost after the last poll.
            finished = done()
            while chunk := log.read(chunk_size):
                yield chunk
                # Lets other tasks run between chunks even if the consumer never awaits.
                await asyncio.sleep(0)
            if finished:
                return
            await asyncio.sleep(poll_interval)
