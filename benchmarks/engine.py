"""Measure the engine: evaluate a pipeline of N items, then change one item's input.

    python benchmarks/engine.py --nodes 10000 --json

The pipeline is a `list_map` over N items `(name, version)` keyed by name; each item's
sub-pipeline is a map plus a cached builder. After the first evaluation settles, one item's
version changes and the time until the engine settles again is measured, with the number of
nodes re-evaluated. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time
from typing import Any

import pipeline as p
from pipeline.engine import tune_gc


@p.builder("compile", auto_cancel=True)
async def compile_item(job: p.Job, key: list[Any]) -> str:
    """A cheap stand-in for a build: returns a digest of its key."""
    return f"{key[0]}@{key[1]}"


def build_pipeline(items: p.Variable[list[tuple[str, int]]]) -> p.Term[list[str]]:
    """N sub-pipelines: a map and a cached builder per item."""

    def per_item(item: p.Term[tuple[str, int]]) -> p.Term[str]:
        return compile_item(item.map(lambda it: [it[0], it[1]], label="key"))

    return p.list_map(per_item, items, key=lambda it: it[0], label="items")


async def measure(n: int, state_dir: str) -> dict[str, Any]:
    """Run the benchmark with `n` items; return the figures."""
    items = p.Variable([(f"item{i}", 1) for i in range(n)], label="items")
    root = build_pipeline(items)
    engine = p.Engine(root, state_dir=state_dir)
    start = time.perf_counter()
    await engine.start()
    await engine.wait_idle()
    initial = time.perf_counter() - start
    assert isinstance(engine.root_output(), p.Ok), engine.root_output()
    nodes = sum(1 for _ in engine.nodes())

    changed = list(items.output.value)  # type: ignore[union-attr]
    changed[n // 2] = (f"item{n // 2}", 2)
    before = engine.evaluations
    start = time.perf_counter()
    items.set(changed)
    await engine.wait_idle()
    change = time.perf_counter() - start
    evaluated = engine.evaluations - before
    result = engine.root_output()
    assert isinstance(result, p.Ok) and result.value[n // 2] == f"item{n // 2}@2"
    await engine.stop()
    return {
        "nodes": nodes,
        "items": n,
        "initial_s": round(initial, 4),
        "change_s": round(change, 5),
        "evaluated_on_change": evaluated,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


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
    parser.add_argument("--nodes", type=int, default=10000, help="number of items (default 10000)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--state-dir-in", metavar="DIR", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to make the temporary state directory (default: /dev/shm, so that the "
        "figures measure the engine rather than the disk's file-creation speed)",
    )
    options = parser.parse_args()
    tune_gc()  # as `pipeline run` does
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-", dir=options.state_dir_in) as d:
        figures = asyncio.run(measure(options.nodes, d))
        figures["state_dir_fs"] = _filesystem(d)
    if options.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>20}: {value}")


if __name__ == "__main__":
    main()
