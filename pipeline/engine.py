"""The engine: turns a term into live nodes and keeps their outputs up to date, incrementally.

Every node has a height greater than its inputs'. A change schedules the nodes that read the
changed output on a heap ordered by height, so each is evaluated after everything it depends on
and only what is downstream of a change is visited; a node whose new output equals its old one
schedules nothing. Dynamic dependencies (the sub-graph of a `bind`, the items of a `list_map`)
raise heights as needed, and a dependency that would close a loop is reported as a cycle.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import heapq
import itertools
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from pipeline.cache import storage
from pipeline.cache.instances import Cache
from pipeline.clock import Clock, SystemClock
from pipeline.jobs import Confirmation, JobRegistry
from pipeline.level import Level
from pipeline.monitor import Monitor, Watcher
from pipeline.nodes import NODE_CLASSES, Node, error_message
from pipeline.output import NodeState, Output
from pipeline.term import Term, as_term
from pipeline.usercode import Interrupted


class PipelineError(Exception):
    """A problem with the pipeline itself (not with one of its jobs)."""


class CycleError(PipelineError):
    """A dynamic sub-graph depends on its own output."""


StartHook = Callable[[Path], Awaitable[None]]
"""A function that an engine awaits with its state directory when it starts (see `on_start`)."""

_start_hooks: list[StartHook] = []
_log = logging.getLogger(__name__)


def on_start(hook: StartHook) -> StartHook:
    """Have every engine await `hook(state_dir)` when it starts, before anything is evaluated.

    For primitives to clean up what a killed process left behind (the build primitive kills
    its containers) without the engine knowing them. A hook registered twice runs once; one
    that raises is reported in one warning and the start carries on.
    """
    if hook not in _start_hooks:
        _start_hooks.append(hook)
    return hook


async def _run_start_hooks(state_dir: Path) -> None:
    for hook in list(_start_hooks):
        try:
            await hook(state_dir)
        except Exception as exc:
            # A clean-up that cannot run now (runc missing, a store gone) must not stop the
            # pipeline: its next start tries again.
            _log.warning("start-up clean-up %s failed: %s", hook.__qualname__, exc)


class Engine:
    """Evaluates a pipeline and keeps it up to date.

    `state_dir` holds the cache database and job logs (default `./var`); `confirm` is the
    confirmation threshold (jobs at or above it wait for a person); `clock` gives the time for
    schedules (a fake clock in tests). Use within a running event loop:

        async with Engine(root) as engine:
            await engine.wait_idle()
    """

    def __init__(
        self,
        root: Term[Any],
        *,
        state_dir: Path | str = "var",
        confirm: Level | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.root = as_term(root)
        self.state_dir = Path(state_dir)
        self.clock: Clock = clock or SystemClock()
        self.confirmation = Confirmation(confirm)
        db = storage.Database(self.state_dir / storage.FILE_NAME)
        self.jobs = JobRegistry(self.state_dir / "job", self.confirmation, clock=self.clock.now,
                                records=db)
        self.cache = Cache(self, db)
        self.evaluations = 0
        # How long the latest round of evaluation took, for the web UI's metrics.
        self.last_round_seconds = 0.0
        self.root_node: Node | None = None
        self.fatal: PipelineError | None = None
        # True once a stop signal interrupted user code (pipeline.usercode): the process is
        # stopping, so nothing more is evaluated.
        self.halted = False
        self._nodes: dict[Term[Any], Node] = {}
        self._uids = itertools.count()
        # The nodes to evaluate, by height, each height in the order scheduled; and the heights
        # that have nodes, as a heap. A bucket per height rather than one heap of nodes: a round
        # of tens of thousands of nodes spans a few heights, so scheduling and taking the next
        # node cost the same whatever the size of the round.
        self._queued: dict[int, collections.deque[Node]] = {}
        self._heights: list[int] = []
        self._kicked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._watchers: dict[Hashable, Watcher] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._change_listeners: list[Callable[[], None]] = []

    # Life cycle

    async def start(self) -> None:
        """Run the `on_start` hooks, instantiate the root term and start evaluating.

        Raises PipelineError if the state directory's database is not a pipeline's (it is left
        as it is). Jobs an earlier process left unfinished are recorded as failed, interrupted.
        """
        self._loop = asyncio.get_running_loop()
        try:
            self.cache.open()
        except sqlite3.DatabaseError as exc:
            raise PipelineError(str(exc)) from None
        await _run_start_hooks(self.state_dir)
        self.jobs.on_change(lambda _job: self.check_idle())
        self.root_node = self.acquire(self.root)

    async def stop(self, *, reason: str = "Engine stopped") -> None:
        """Cancel running jobs (their outcomes are not recorded), remove watches, save state."""
        await self.cache.shutdown(reason)
        if self.root_node is not None:
            root, self.root_node = self.root_node, None
            self.release(root)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        self.cache.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the engine runs on."""
        if self._loop is None:
            raise RuntimeError("engine not started")
        return self._loop

    # Nodes

    def acquire(self, term: Term[Any]) -> Node:
        """The node for `term`, created (with its inputs) if not live yet; counts one more user."""
        node = self._nodes.get(term)
        if node is None:
            node = self._instantiate(term)
        node.refcount += 1
        return node

    def _instantiate(self, term: Term[Any]) -> Node:
        if all(i in self._nodes for i in term.inputs):
            return self._create(term)
        # Iterative depth-first walk, so that long chains do not hit the recursion limit.
        stack: list[tuple[Term[Any], int]] = [(term, 0)]
        while stack:
            current, i = stack[-1]
            if i < len(current.inputs):
                stack[-1] = (current, i + 1)
                child = current.inputs[i]
                if child not in self._nodes:
                    stack.append((child, 0))
                continue
            stack.pop()
            if current not in self._nodes:
                self._create(current)
        return self._nodes[term]

    def _create(self, term: Term[Any]) -> Node:
        """The node of `term`, whose inputs all have nodes already."""
        inputs = [self._nodes[c] for c in term.inputs]
        node_class = NODE_CLASSES.get(type(term))
        if node_class is None:
            raise TypeError(f"unknown kind of term: {type(term).__name__}")
        node = node_class(self, term, inputs, next(self._uids))
        for input_node in inputs:
            input_node.refcount += 1
            input_node.dependents.add(node)
        self._nodes[term] = node
        node.attach()
        self.schedule(node)
        return node

    def release(self, node: Node) -> None:
        """Count one user less; a node nobody uses is destroyed and releases its inputs."""
        stack = [node]
        while stack:
            current = stack.pop()
            current.refcount -= 1
            if current.refcount > 0:
                continue
            current.dead = True
            del self._nodes[current.term]
            current.destroy()
            for input_node in current.inputs:
                input_node.dependents.discard(current)
                stack.append(input_node)

    def node_for(self, term: Term[Any]) -> Node | None:
        """The live node of `term`, if any."""
        return self._nodes.get(term)

    def nodes(self) -> Iterator[Node]:
        """Every live node."""
        return iter(list(self._nodes.values()))

    def add_dependency(self, node: Node, dependency: Node) -> bool:
        """Make `node` read `dependency` dynamically; True if `node`'s height had to rise (it is
        then scheduled again, to be evaluated after `dependency`)."""
        dependency.dependents.add(node)
        if dependency.height < node.height:
            return False
        self._raise_height(node, dependency.height + 1, dependency)
        self.schedule(node)
        return True

    def remove_dependency(self, node: Node, dependency: Node) -> None:
        """Stop `node` reading `dependency`."""
        dependency.dependents.discard(node)

    def _raise_height(self, node: Node, height: int, origin: Node) -> None:
        stack = [(node, height)]
        while stack:
            current, h = stack.pop()
            if current is origin:
                origin.dependents.discard(node)
                raise CycleError(_cycle_message(node.term, origin.term))
            if current.height >= h:
                continue
            current.height = h
            stack.extend((d, h + 1) for d in current.dependents)

    # Evaluation

    def schedule(self, node: Node) -> None:
        """Evaluate `node` in the current or next round of evaluation."""
        if node.dead or node.dirty or self.halted:
            return
        node.dirty = True
        self._enqueue(node)
        if not self._kicked:
            self._kicked = True
            self._idle.clear()
            self.loop.call_soon(self._process)

    def _enqueue(self, node: Node) -> None:
        bucket = self._queued.get(node.height)
        if bucket is None:
            bucket = self._queued[node.height] = collections.deque()
            heapq.heappush(self._heights, node.height)
        bucket.append(node)

    def set_output(self, node: Node, output: Output) -> None:
        """Record `node`'s new output and schedule its readers if it changed."""
        if output == node.output:
            return
        node.output = output
        for dependent in tuple(node.dependents):
            dependent.input_changed(node)

    def _process(self) -> None:
        self._kicked = False
        began = time.perf_counter()
        queued, heights = self._queued, self._heights
        try:
            while heights and self.fatal is None:
                height = heights[0]
                bucket = queued[height]
                if not bucket:
                    heapq.heappop(heights)
                    del queued[height]
                    continue
                node = bucket.popleft()
                if node.dead or not node.dirty:
                    continue
                if height != node.height:
                    if height < node.height:
                        self._enqueue(node)
                    continue
                node.dirty = False
                self.evaluations += 1
                try:
                    node.evaluate()
                except CycleError:
                    raise
                except Exception as exc:
                    # A bug, or the world failing under a node (no file descriptor left, a full
                    # disk), fails that node: the rest of the pipeline is still evaluated.
                    _log.debug("evaluating %r failed", node.term.label, exc_info=True)
                    node.fail(error_message(exc))
        except CycleError as exc:
            self.fatal = exc
        except Interrupted:
            self.halted = True
        if self.fatal is not None or self.halted:
            queued.clear()
            heights.clear()
        self.last_round_seconds = time.perf_counter() - began
        for listener in tuple(self._change_listeners):
            listener()
        self.check_idle()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each round of evaluation (e.g. to redraw a diagram)."""
        self._change_listeners.append(listener)

    # Monitors

    def acquire_watcher(self, monitor: Monitor[Any]) -> Watcher:
        """The shared watcher of `monitor`, installing the watch for its first user."""
        watcher = self._watchers.get(monitor.key)
        if watcher is None:
            watcher = Watcher(monitor, self.loop)
            self._watchers[monitor.key] = watcher
            watcher.start(self.check_idle)
        watcher.refcount += 1
        return watcher

    def release_watcher(self, watcher: Watcher) -> None:
        """One user less; the last one removes the watch."""
        watcher.refcount -= 1
        if watcher.refcount == 0:
            del self._watchers[watcher.monitor.key]
            task = self.loop.create_task(watcher.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    # Idleness

    def is_idle(self) -> bool:
        """Nothing to evaluate, no monitor read pending, no job queued or running."""
        return (
            self.fatal is not None
            or (not self._kicked
                and not self._heights
                and not any(w.busy for w in self._watchers.values())
                and not self.cache.busy())
        )

    def check_idle(self) -> None:
        """Update the idle event (called when a job, a monitor or the heap changes)."""
        if self.is_idle():
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self) -> None:
        """Wait until nothing is left to evaluate, read, or run (jobs waiting for a person aside).

        Raises the pipeline's fatal error (a cycle) if there is one.
        """
        while True:
            self.check_idle()
            await self._idle.wait()
            await asyncio.sleep(0)
            if self.is_idle():
                break
        if self.fatal is not None:
            raise self.fatal

    # Job actions (what the web UI's buttons do)

    def job_actions(self, job_id: str) -> set[str]:
        """What may be done to a job now: a subset of {"cancel", "start-now", "rebuild"}."""
        job = self.jobs.get(job_id)
        actions = job.actions() if job is not None else set()
        if "cancel" not in actions and (self.cache.find(job_id) is not None
                                        or self.cache.db.entry(job_id) is not None):
            actions.add("rebuild")
        return actions

    def cancel(self, job_id: str) -> bool:
        """Cancel a running or waiting job (a sticky "Cancelled" failure); False if not running."""
        return self.cache.cancel(job_id)

    def rebuild(self, job_id: str) -> bool:
        """Run the key of a finished job again; False if there is no such job."""
        return self.cache.rebuild(job_id)

    def start_now(self, job_id: str) -> bool:
        """Start a job that waits for confirmation; False if it does not wait."""
        job = self.jobs.get(job_id)
        if job is None or "start-now" not in job.actions():
            return False
        job.approve()
        return True

    # Introspection

    def state_counts(self) -> Counter[NodeState]:
        """How many live nodes are in each diagram state."""
        return Counter(node.state for node in self._nodes.values())

    def pool_stats(self) -> list[dict[str, Any]]:
        """For each pool in use: name, capacity, slots in use, queue length."""
        return [pool.stats() for pool in self.cache.pools()]

    def root_output(self) -> Output | None:
        """The root node's output (None before start)."""
        return self.root_node.output if self.root_node is not None else None


def tune_gc() -> None:
    """Make the garbage collector run less often, for processes that evaluate big pipelines.

    Evaluating a pipeline allocates many small objects that live long (nodes, outputs, jobs);
    with CPython's default thresholds the collector scans them again and again, which costs about
    a fifth of the first evaluation of a 30,000-node pipeline. `pipeline run` calls this.
    """
    gc.set_threshold(50_000, 20, 100)


def _cycle_message(term: Term[Any], dependency: Term[Any]) -> str:
    file, line = term.site
    return (f"{file}:{line}: cycle: {term.label!r} depends on {dependency.label!r}, "
            f"which depends on {term.label!r}")
