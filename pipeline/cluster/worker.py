"""`pipeline cluster worker`: a Dask worker of one pool that builds with its own builder.

    pipeline cluster worker SCHEDULER --pool NAME --capacity N --store KIND:PATH
        [--fetcher registry|debootstrap|local:DIR] [--platform linux/ARCH] [--name NAME]
        [--state-dir DIR] [--min-free-disk BYTES|PERCENT%] [--host HOST]

The worker is Dask's own `distributed.Worker`, offering the resource `NAME=N` (so that at most N
builds of the pool run on it at once) with `BuilderPlugin` (registered as `WORKER_PLUGIN`), which
owns the worker's `Builder`, its git mirror and its disk watch. `dask worker SCHEDULER --preload
pipeline.cluster.worker --pipeline-pool NAME --pipeline-store KIND:PATH ...` makes the same
worker out of a plain `dask worker` (see `dask_setup`).

The worker builds for one platform (`--platform`; by default the architecture whose pool is the
worker's pool, `linux-arm64` for `linux/arm64` and so on, else the host's): a worker of an
emulated pool runs its builds under qemu (see `pipeline.obuilder.emulation`, checked when the
worker starts).

A build is the Dask task `run_build(request)` (see `pipeline.cluster.protocol`): it runs on the
worker's event loop, sends a `started` event and the step log in numbered chunks on
`EVENTS_TOPIC`, and returns a `BuildOutcome` or raises the builder's error.

Low disk: the plugin reads the store's free space every `DISK_CHECK_INTERVAL` seconds, before
each build and after each one. Below the floor (`--min-free-disk`, and never below the builder's
own full-store threshold) the worker pauses itself (Dask's paused status: the scheduler sends it
nothing new, its running builds go on), prunes its store's least recently used results, and
resumes once the free space is back above the floor. The free space is sent to the scheduler as
the worker metric `free_disk` (bytes; the scheduler's `WorkerState.metrics["free_disk"]`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
from distributed import Worker, WorkerPlugin, get_worker
from distributed.core import Status

from pipeline.cluster.cli import EXIT_USAGE, UsageParser
from pipeline.cluster.protocol import (
    EVENTS_TOPIC,
    WORKER_PLUGIN,
    BuildEvent,
    BuildOutcome,
    BuildRequest,
    Source,
    cancel_event,
    event_message,
    task_key,
)
from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.emulation import find_emulator
from pipeline.obuilder.full_store import min_free
from pipeline.obuilder.platforms import ARCHITECTURES, host_platform, is_emulated, parse_platform
from pipeline.obuilder.protocols import BuildError, DiskUsage
from pipeline.obuilder.setup import open_builder

DEFAULT_MIN_FREE_DISK = "5%"
"""The default `--min-free-disk`: a share of the store's filesystem."""

DISK_CHECK_INTERVAL = 10.0
"""Seconds between two readings of the store's free space (builds also trigger one)."""

LOG_FLUSH_DELAY = 0.05
LOG_FLUSH_BYTES = 64 * 2**10
"""A log chunk is sent once it is this large, or `LOG_FLUSH_DELAY` seconds after its first
byte: a step printing 100,000 short lines makes a few dozen events, not 100,000."""

CANCEL_POLL = 1.0
"""Seconds a wait on the cancel `Event` lasts before the worker looks whether Dask itself has
let go of the task (a released future)."""

_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256, full length
_SIZE = re.compile(r"(\d+)([KMG]?)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class UsageError(Exception):
    """A bad option: the message is the one line the user sees."""


class BuildCancelled(Exception):
    """The build was cancelled (its cancel `Event` was set, or Dask released its task)."""


@dataclass(frozen=True)
class DiskFloor:
    """The free space below which the worker pauses and prunes: `bytes`, or `share` of the
    store's filesystem; never below the builder's own full-store threshold (`min_free`), so
    that the worker pauses before its builds would be refused."""

    bytes: int = 0
    share: float = 0.0

    @classmethod
    def parse(cls, text: str) -> DiskFloor:
        """`N`, `NK`, `NM`, `NG` (bytes, powers of 1024) or `P%`; raises UsageError."""
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 <= share < 1:
                raise UsageError(f"--min-free-disk: not a percentage below 100: {text!r}")
            return cls(share=share)
        match = _SIZE.fullmatch(text.upper())
        if match is None:
            raise UsageError(f"--min-free-disk: not a size (N, NK, NM, NG or P%): {text!r}")
        return cls(bytes=int(match[1]) * _UNITS[match[2]])

    def needed(self, usage: DiskUsage) -> int:
        """The floor in bytes for a filesystem of `usage.total` bytes."""
        return max(self.bytes, int(usage.total * self.share), min_free(usage))


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker is, whichever way it was started (`main` or `dask_setup`)."""

    pool: str
    capacity: int
    store: str
    fetcher: str | None
    platform: str
    """`linux/ARCH`: what every build of the worker is for."""
    name: str
    state_dir: Path
    disk_floor: DiskFloor


def make_settings(*, pool: str, capacity: int, store: str, fetcher: str | None,
                  name: str | None, state_dir: str | None, min_free_disk: str,
                  platform: str | None = None) -> WorkerSettings:
    """Check the options shared by both ways of starting a worker; raises UsageError."""
    if not pool or pool.strip() != pool:
        raise UsageError(f"--pool: not a pool name: {pool!r}")
    if capacity < 1:
        raise UsageError(f"--capacity must be at least 1, not {capacity}")
    try:
        platform = parse_platform(platform) if platform else pool_platform(pool)
    except BuildError as error:
        raise UsageError(f"--platform: {error}") from None
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    directory = Path(state_dir) if state_dir else Path("pipeline-worker") / name
    return WorkerSettings(pool, capacity, store, fetcher, platform, name, directory.absolute(),
                          DiskFloor.parse(min_free_disk))


def pool_platform(pool: str) -> str:
    """The platform a worker of `pool` builds for when not told: the architecture whose pool
    it is (`linux-arm64` is `linux/arm64`), else the host's."""
    for arch in ARCHITECTURES.values():
        if arch.pool == pool:
            return arch.platform
    return host_platform()


async def open_worker_builder(settings: WorkerSettings) -> Builder:
    """The builder of `settings.store`, `settings.fetcher` and `settings.platform`; a bad
    store or fetcher, or an environment that cannot build (no runc, not root, no emulator for
    an emulated platform), is a UsageError with the builder's message."""
    try:
        if is_emulated(settings.platform):
            # Now rather than at the first build: a worker that cannot build must not start.
            find_emulator(settings.platform)
        return await open_builder(settings.store, fetcher=settings.fetcher,
                                  platform=settings.platform)
    except (BuildError, OSError) as error:
        raise UsageError(str(error)) from None


class LogStream:
    """A build's step log as numbered `log` events: small writes are gathered into chunks
    (see `LOG_FLUSH_BYTES`), sent in the order written; `flush` sends what is pending."""

    def __init__(self, send: Callable[[BuildEvent], None], request_id: str, worker: str
                 ) -> None:
        """Send chunks of the log of `request_id`, built on `worker`, through `send`."""
        self._send = send
        self._request_id = request_id
        self._worker = worker
        self._pending = bytearray()
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes) -> None:
        """Append `data` to the log."""
        if not data:
            return
        self._pending += data
        if len(self._pending) >= LOG_FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LOG_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Send what is pending as the next chunk."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        chunk = bytes(self._pending)
        self._pending.clear()
        self._send(BuildEvent(self._request_id, "log", self._worker, self._seq, chunk))
        self._seq += 1


class SourceError(BuildError):
    """The source could not be fetched, checked out or merged."""


async def _git(*args: str, cwd: Path) -> str:
    """Run `git ARGS` in `cwd` (never through a shell), its stdout; raises SourceError with
    git's message. Cancelling kills git."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
           "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        # Both streams: a merge names its conflicts on stdout, its failure on stderr.
        text = b"\n".join(part for part in (err, out) if part.strip())
        message = text.decode(errors="replace").strip().replace("\n", "; ")
        raise SourceError(f"git {args[0]} failed: {message}")
    return out.decode(errors="replace")


def check_source(source: Source) -> None:
    """Refuse a source a worker must not run git on: commits that are not full hex ids, a URL
    that git would read as an option. Raises SourceError."""
    if not source.commits:
        raise SourceError("the source names no commit")
    for commit in source.commits:
        if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
            raise SourceError(f"not a full commit id (hex): {commit!r}")
    if not source.url or source.url.startswith("-"):
        raise SourceError(f"not a repository URL: {source.url!r}")


class GitMirror:
    """A bare repository under the worker's state directory holding every commit its builds
    fetched (each under `refs/pipeline/ID`, so that git keeps it), and scratch checkouts."""

    def __init__(self, path: Path) -> None:
        """The mirror at `path`, made by `open`."""
        self.path = path
        # Two fetches at once into one repository could fight over its lock files.
        self._fetching = asyncio.Lock()

    async def open(self) -> None:
        """Make the bare repository if missing, and remove checkouts a killed worker left."""
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            await _git("init", "--quiet", "--bare", str(self.path), cwd=self.path)
        await asyncio.to_thread(shutil.rmtree, self._checkouts, True)
        self._checkouts.mkdir()

    @property
    def _checkouts(self) -> Path:
        return self.path.parent / "checkouts"

    async def _missing(self, commits: tuple[str, ...]) -> list[str]:
        missing = []
        for commit in commits:
            try:
                await _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=self.path)
            except SourceError:
                missing.append(commit)
        return missing

    async def fetch(self, source: Source, log: Callable[[bytes], None]) -> None:
        """Fetch the commits of `source` that the mirror lacks."""
        check_source(source)
        async with self._fetching:
            missing = await self._missing(source.commits)
            if not missing:
                return
            log(f"Fetching {' '.join(c[:12] for c in missing)} from {source.url}\n".encode())
            # `--` ends the options: the URL is only ever a repository.
            await _git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--",
                       source.url, *(f"{c}:refs/pipeline/{c}" for c in missing), cwd=self.path)

    @contextlib.asynccontextmanager
    async def checkout(self, source: Source, log: Callable[[bytes], None]
                       ) -> AsyncIterator[Path]:
        """A scratch checkout of the first commit of `source` with each next one merged into
        it in turn, removed on leaving. Raises SourceError naming the commits on a merge
        conflict."""
        await self.fetch(source, log)
        scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self._checkouts))
        try:
            tree = scratch / "src"
            await _git("clone", "--quiet", "--shared", "--no-checkout", str(self.path),
                       str(tree), cwd=scratch)
            first, *others = source.commits
            await _git("checkout", "--quiet", "--detach", first, cwd=tree)
            for commit in others:
                log(f"Merging {commit[:12]}\n".encode())
                await self._merge(tree, commit, first)
            yield tree
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    @staticmethod
    async def _merge(tree: Path, commit: str, first: str) -> None:
        try:
            await _git("-c", "user.name=pipeline", "-c", "user.email=pipeline@localhost",
                       "merge", "--no-edit", "--no-ff", "-m", f"Merge {commit}", commit,
                       cwd=tree)
        except SourceError as error:
            conflicts = re.findall(r"Merge conflict in ([^;]+)", str(error))
            where = f" (conflicts in {', '.join(conflicts)})" if conflicts else f": {error}"
            raise SourceError(f"cannot merge {commit} into {first}{where}") from None


@contextlib.asynccontextmanager
async def _empty_context() -> AsyncIterator[Path]:
    directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="pipeline-build-")
    try:
        yield Path(directory)
    finally:
        await asyncio.to_thread(os.rmdir, directory)


class BuilderPlugin(WorkerPlugin):
    """The worker plugin owning the worker's `Builder`, git mirror and disk watch."""

    name = WORKER_PLUGIN

    def __init__(self, settings: WorkerSettings, builder: Builder) -> None:
        """A plugin building with `builder` as `settings` say (the builder is closed on
        teardown)."""
        self.settings = settings
        self.builder = builder
        self.mirror = GitMirror(settings.state_dir / "git-mirror")
        self.free_disk: int | None = None
        self._worker: Worker | None = None
        # Each running build's task, with the time it started (see `_prune`).
        self._running: dict[asyncio.Task[str], float] = {}
        self._paused_for_disk = False
        self._disk_check = asyncio.Event()
        self._disk_lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None

    async def setup(self, worker: Worker) -> None:
        """Open the mirror, report free disk as a worker metric, start watching the disk."""
        self._worker = worker
        await self.mirror.open()
        worker.metrics["free_disk"] = lambda _: self.free_disk
        # Builds run in sandboxes, outside this process: its own memory says nothing about
        # them, and Dask's memory monitor would unpause a worker paused for its disk.
        worker.memory_manager.memory_pause_fraction = False
        await self.check_disk()
        self._watch = asyncio.create_task(self._watch_disk(), name="watch the store's disk")

    async def teardown(self, worker: Worker) -> None:
        """Cancel running builds (killing their sandboxes), stop watching, close the store."""
        if self._watch is not None:
            self._watch.cancel()
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, *([self._watch] if self._watch else []),
                             return_exceptions=True)
        self.builder.close()

    def _send(self, event: BuildEvent) -> None:
        assert self._worker is not None
        self._worker.log_event(EVENTS_TOPIC, event_message(event))

    async def build(self, request: BuildRequest) -> BuildOutcome:
        """Run `request` (see `run_build`)."""
        name = self.settings.name
        self._send(BuildEvent(request.request_id, "started", name))
        log = LogStream(self._send, request.request_id, name)
        build = asyncio.create_task(self._build(request, log), name=task_key(request))
        self._running[build] = time.time()
        cancelled = asyncio.create_task(self._cancelled(request))
        try:
            await asyncio.wait({build, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not build.done():
                build.cancel()
            try:
                result = await build
            except asyncio.CancelledError:
                if cancelled.done():
                    raise BuildCancelled("the build was cancelled") from None
                raise
        finally:
            for task in (build, cancelled):
                task.cancel()
            await asyncio.gather(build, cancelled, return_exceptions=True)
            del self._running[build]
            # Whatever happened, the log written so far reaches the client.
            log.flush()
            self._disk_check.set()
        return BuildOutcome(result, name)

    async def _build(self, request: BuildRequest, log: LogStream) -> str:
        spec = S.parse(request.spec, filename="spec")
        await self.check_disk()
        context = (self.mirror.checkout(request.source, log.write)
                   if request.source is not None else _empty_context())
        async with context as directory:
            return await self.builder.build(spec, directory, log=log.write)

    async def _cancelled(self, request: BuildRequest) -> None:
        """Return once the build's cancel `Event` is set or Dask has released its task."""
        assert self._worker is not None
        name, key = cancel_event(request), task_key(request)
        while True:
            try:
                # What `distributed.Event(name).wait` asks the scheduler, without a client.
                if await self._worker.scheduler.event_wait(name=name, timeout=CANCEL_POLL):
                    return
            except OSError:
                # The scheduler is unreachable for now: the build goes on; Dask reconnects.
                await asyncio.sleep(CANCEL_POLL)
            task = self._worker.state.tasks.get(key)
            if task is not None and task.state in ("cancelled", "released"):
                return

    async def _watch_disk(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disk_check.wait(), DISK_CHECK_INTERVAL)
            self._disk_check.clear()
            try:
                await self.check_disk()
            except Exception as error:  # the watch goes on; say why this check failed
                self._say(f"cannot check the store's free disk: {error}")

    async def check_disk(self) -> None:
        """Read the store's free space; below the floor, pause the worker and prune; resume
        once above it."""
        assert self._worker is not None
        async with self._disk_lock:
            usage = await self.builder.store.df()
            floor = self.settings.disk_floor.needed(usage)
            if usage.free < floor:
                if self._worker.status == Status.running:
                    self._say(f"free disk {usage.free} below {floor}: pausing and pruning")
                    self._worker.status = Status.paused
                    self._paused_for_disk = True
                usage = await self._prune(floor)
            self.free_disk = usage.free
            if usage.free >= floor and self._paused_for_disk:
                self._paused_for_disk = False
                if self._worker.status == Status.paused:
                    self._worker.status = Status.running
                    self._say(f"free disk {usage.free} back above {floor}: resumed")

    async def _prune(self, floor: int) -> DiskUsage:
        """Delete least recently used results until `floor` bytes are free or none is left to
        delete; the free space then.

        Only results last used before the oldest running build started are candidates:
        `DbStore.prune` keeps the bases of running steps, and this keeps the results a running
        build has just made, on which its next step is about to build.
        """
        store = self.builder.store
        assert isinstance(store, DbStore)  # `open_builder` makes one
        cutoff = min(self._running.values(), default=time.time())
        usage = await store.df()
        while usage.free < floor:
            deleted = await store.prune(datetime.fromtimestamp(cutoff, UTC), limit=1)
            if not deleted:
                break
            usage = await store.df()
        return usage

    def _say(self, text: str) -> None:
        print(f"worker {self.settings.name}: {text}", flush=True)


async def run_build(request: BuildRequest) -> BuildOutcome:
    """The Dask task of a build, run on the worker's event loop: see the module docstring and
    `pipeline.cluster.protocol`. Raises the builder's (or git's) error, whose message the client
    shows, and BuildCancelled once cancelled."""
    plugin = get_worker().plugins[WORKER_PLUGIN]
    assert isinstance(plugin, BuilderPlugin)
    return await plugin.build(request)


@click.command()
@click.option("--pipeline-pool", required=True, help="The worker's pool.")
@click.option("--pipeline-capacity", type=int, default=1, show_default=True,
              help="Builds at once (the worker's --nthreads must be at least this).")
@click.option("--pipeline-store", required=True, help="KIND:PATH of the worker's store.")
@click.option("--pipeline-fetcher", default=None, help="registry, debootstrap or local:DIR.")
@click.option("--pipeline-platform", default=None,
              help="linux/ARCH the builds are for (default: the pool's, else the host's).")
@click.option("--pipeline-state-dir", default=None, help="Where the git mirror is kept.")
@click.option("--pipeline-min-free-disk", default=DEFAULT_MIN_FREE_DISK, show_default=True,
              help="Pause and prune below this free space (bytes or P%).")
async def dask_setup(worker: Worker, pipeline_pool: str, pipeline_capacity: int,
                     pipeline_store: str, pipeline_fetcher: str | None,
                     pipeline_platform: str | None, pipeline_state_dir: str | None,
                     pipeline_min_free_disk: str) -> None:
    """`dask worker --preload pipeline.cluster.worker --pipeline-pool ...`: the same worker as
    `pipeline cluster worker` (named as Dask names it)."""
    try:
        settings = make_settings(
            pool=pipeline_pool, capacity=pipeline_capacity, store=pipeline_store,
            fetcher=pipeline_fetcher, name=str(worker.name) if worker.name else None,
            state_dir=pipeline_state_dir, min_free_disk=pipeline_min_free_disk,
            platform=pipeline_platform)
        if worker.state.nthreads < settings.capacity:
            raise UsageError(f"--nthreads {worker.state.nthreads} is less than "
                             f"--pipeline-capacity {settings.capacity}")
        builder = await open_worker_builder(settings)
    except UsageError as error:
        raise click.UsageError(str(error)) from None
    # Preloads run before the worker registers, which sends its resources to the scheduler.
    worker.state.total_resources[settings.pool] = settings.capacity
    worker.state.available_resources[settings.pool] = settings.capacity
    await worker.plugin_add(BuilderPlugin(settings, builder), catch_errors=False)


def _parser() -> UsageParser:
    parser = UsageParser(prog="pipeline cluster worker",
                     description="A Dask worker of one pool, building with its own store.")
    parser.add_argument("scheduler", help="the scheduler's address, tcp://HOST:PORT")
    parser.add_argument("--pool", required=True, help="the pool this worker serves")
    parser.add_argument("--capacity", type=int, default=1, help="builds at once (default 1)")
    parser.add_argument("--store", required=True, metavar="KIND:PATH",
                        help="the worker's store (btrfs, overlayfs, xfs or rsync)")
    parser.add_argument("--fetcher", help="registry, debootstrap or local:DIR")
    parser.add_argument("--platform", metavar="linux/ARCH",
                        help="the platform builds are for, emulated if not the host's "
                        "(default: the architecture whose pool is --pool, e.g. linux/arm64 "
                        "for linux-arm64, else the host's)")
    parser.add_argument("--name", help="the worker's name (default: HOST-PID)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the git mirror is kept (default: ./pipeline-worker/NAME)")
    parser.add_argument("--min-free-disk", default=DEFAULT_MIN_FREE_DISK,
                        metavar="BYTES|PERCENT%",
                        help="pause and prune below this free space "
                             f"(default {DEFAULT_MIN_FREE_DISK} of the store's filesystem)")
    parser.add_argument("--host", help="the address to listen on (default: Dask's choice)")
    return parser


async def _serve(options: argparse.Namespace, settings: WorkerSettings) -> int:
    builder = await open_worker_builder(settings)
    plugin = BuilderPlugin(settings, builder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Builds are async tasks on the event loop: a thread per build slot only lets the
    # scheduler count slots.
    worker = Worker(options.scheduler, nthreads=settings.capacity, name=settings.name,
                    resources={settings.pool: settings.capacity}, plugins=(plugin,),
                    host=options.host, local_directory=str(settings.state_dir / "dask"))
    async with worker:
        print(f"worker {settings.name} of pool {settings.pool} at {worker.address}, "
              f"building for {settings.platform}", flush=True)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, asyncio.ensure_future(worker.finished())},
                           return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    return 0


def main(args: list[str]) -> int:
    """Run `pipeline cluster worker ARGS` until SIGINT or SIGTERM; the exit status."""
    options = _parser().parse_args(args)
    try:
        settings = make_settings(pool=options.pool, capacity=options.capacity,
                                 store=options.store, fetcher=options.fetcher,
                                 name=options.name, state_dir=options.state_dir,
                                 min_free_disk=options.min_free_disk,
                                 platform=options.platform)
        return asyncio.run(_serve(options, settings))
    except UsageError as error:
        print(f"pipeline cluster worker: error: {error}", file=sys.stderr)
        return EXIT_USAGE

