"""Measure the engine: evaluate a big pipeline, then change one input and let it settle again.

    python benchmarks/engine.py --nodes 10000 --json
    python benchmarks/engine.py --scenario branches --branches 1000 --json

Scenario `items` (the default): a `list_map` over N items `(name, version)` keyed by name; each
item's sub-pipeline is a map plus a cached builder. After the first evaluation settles, one
item's version changes.

Scenario `branches`: the shape of a CI pipeline over the branches of one repository, a
`list_map` over `(branch, commit)` keyed by branch; per branch the commit is fetched, analysed
into three platforms, built on each, and a status is published for the commit (builders and
publisher do no work). After the first evaluation settles, one branch moves to a new commit.

Both report the time of the first evaluation until idle, the time until idle after the change
and the number of nodes evaluated for it, the peak memory (RSS) and the peak number of open file
descriptors (counted after every round of evaluation and at most every 10 ms while jobs
change state). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pipeline as p
from pipeline.engine import tune_gc

PLATFORMS = ("debian-12", "alpine-3.20", "fedora-41")


@p.builder("compile", auto_cancel=True)
async def compile_item(job: p.Job, key: list[Any]) -> str:
    """A cheap stand-in for a build: returns a digest of its key."""
    return f"{key[0]}@{key[1]}"


@p.builder("fetch")
async def fetch(job: p.Job, commit: str) -> str:
    """A stand-in for a fetch: the commit's source."""
    return f"src-{commit}"


@p.builder("analyse")
async def analyse(job: p.Job, source: str) -> list[list[str]]:
    """A stand-in for an analysis: what to build, one (source, platform) per platform."""
    return [[source, platform] for platform in PLATFORMS]


@p.builder("build", auto_cancel=True)
async def build(job: p.Job, key: list[str]) -> str:
    """A stand-in for a build on one platform."""
    return f"built {key[0]} on {key[1]}"


@p.publisher("status")
async def set_status(job: p.Job, commit: str, results: list[str]) -> None:
    """A stand-in for setting a commit's status on a forge."""


def items_pipeline(items: p.Variable[list[tuple[str, int]]]) -> p.Term[list[str]]:
    """N sub-pipelines: a map and a cached builder per item."""

    def per_item(item: p.Term[tuple[str, int]]) -> p.Term[str]:
        return compile_item(item.map(lambda it: [it[0], it[1]], label="key"))

    return p.list_map(per_item, items, key=lambda it: it[0], label="items")


def branches_pipeline(branches: p.Variable[list[tuple[str, str]]]) -> p.Term[list[None]]:
    """A CI pipeline per branch: fetch, analyse, three builds, a status for the commit."""

    def per_branch(branch: p.Term[tuple[str, str]]) -> p.Term[None]:
        commit = branch.map(lambda b: b[1], label="commit")
        analysis = analyse(fetch(commit))
        builds = [build(analysis.map(lambda a, i=i: a[i], label=platform))
                  for i, platform in enumerate(PLATFORMS)]
        return set_status(commit, p.all(*builds, label="results"))

    return p.list_map(per_branch, branches, key=lambda b: b[0], label="branches")


class FdPeak:
    """The peak number of open file descriptors while `counting`: counted after every round of
    evaluation, and when a job changes state at most every 10 ms (a sampling thread would
    take the GIL from the event loop and slow what it measures)."""

    def __init__(self) -> None:
        self.peak = 0
        self.counting = True
        self._last = 0.0

    def count(self) -> None:
        """Count the open file descriptors now, if counting."""
        if self.counting:
            self.peak = max(self.peak, len(os.listdir("/proc/self/fd")))

    def count_soon(self, _job: p.Job) -> None:
        """Count them unless they were counted less than 10 ms ago."""
        now = time.perf_counter()
        if self.counting and now - self._last >= 0.01:
            self._last = now
            self.count()


async def measure(root: p.Term[Any], state_dir: str, change: Callable[[], None],
                  check: Callable[[Any], bool]) -> dict[str, Any]:
    """Evaluate `root` until idle, then `change()` and wait until idle again; `check(value)`
    must hold for the root's value at the end."""
    engine = p.Engine(root, state_dir=state_dir)
    fds = FdPeak()
    engine.on_change(fds.count)
    engine.jobs.on_change(fds.count_soon)
    start = time.perf_counter()
    await engine.start()
    await engine.wait_idle()
    initial = time.perf_counter() - start
    assert isinstance(engine.root_output(), p.Ok), engine.root_output()
    nodes = sum(1 for _ in engine.nodes())

    # Counting takes a few hundred microseconds, which the change's figure must not include:
    # its jobs are counted at the end.
    fds.counting = False
    before = engine.evaluations
    start = time.perf_counter()
    change()
    await engine.wait_idle()
    settle = time.perf_counter() - start
    evaluated = engine.evaluations - before
    fds.counting = True
    fds.count()
    result = engine.root_output()
    assert isinstance(result, p.Ok) and check(result.value), result
    await engine.stop()
    return {
        "nodes": nodes,
        "initial_s": round(initial, 4),
        "change_s": round(settle, 5),
        "evaluated_on_change": evaluated,
        "peak_fds": fds.peak,
    }


async def measure_items(n: int, state_dir: str) -> dict[str, Any]:
    """The `items` scenario with `n` items."""
    items = p.Variable([(f"item{i}", 1) for i in range(n)], label="items")
    changed = [(f"item{i}", 2 if i == n // 2 else 1) for i in range(n)]
    figures = await measure(items_pipeline(items), state_dir, lambda: items.set(changed),
                            lambda value: value[n // 2] == f"item{n // 2}@2")
    return {"scenario": "items", "items": n, **figures}


async def measure_branches(n: int, state_dir: str) -> dict[str, Any]:
    """The `branches` scenario with `n` branches."""
    branches = p.Variable([(f"branch{i}", f"{i:040x}") for i in range(n)], label="branches")
    moved = [(name, f"{n + i:040x}" if i == n // 2 else commit)
             for i, (name, commit) in enumerate(branches.output.value)]  # type: ignore[union-attr]
    figures = await measure(branches_pipeline(branches), state_dir,
                            lambda: branches.set(moved), lambda value: len(value) == n)
    return {"scenario": "branches", "branches": n, **figures}


def _filesystem(path: str) -> str:
    """The type of the filesystem holding `path` (from /proc/mounts)."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount_point, fs_type, *_ = line.split()
            if path.startswith(mount_point) and len(mount_point) > len(best):
                best, kind = mount_point, fs_type
    return kind


def main() -> None:
    """Parse the arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("items", "branches"), default="items",
                        help="what to measure (default: items)")
    parser.add_argument("--nodes", type=int, default=10000,
                        help="number of items of the items scenario (default 10000)")
    parser.add_argument("--branches", type=int, default=1000,
                        help="number of branches of the branches scenario (default 1000)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--state-dir-in", metavar="DIR", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to make the temporary state directory (default: /dev/shm, so that the "
        "figures measure the engine rather than the disk's file-creation speed)",
    )
    options = parser.parse_args()
    tune_gc()  # as `pipeline run` does
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-", dir=options.state_dir_in) as d:
        if options.scenario == "items":
            figures = asyncio.run(measure_items(options.nodes, d))
        else:
            figures = asyncio.run(measure_branches(options.branches, d))
        figures["peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        figures["state_dir_fs"] = _filesystem(d)
    if options.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>20}: {value}")


if __name__ == "__main__":
    main()
