"""A demo pipeline for the web UI: a few pure-Python jobs you can hold, feed and release by hand.

    pipeline run examples/web_demo.py --port 8080 -- CONTROL_DIR

Nothing here touches the network or a sandbox: every job is a small coroutine that writes log
lines with pauses in between. The pipeline is

    file version -> fetch -> one branch per platform (debian-12, alpine-3.19):
                             build PLATFORM -> test PLATFORM
                   lint (fails unless CONTROL_DIR/lint.ok exists when it runs)

CONTROL_DIR (created if missing, with a `version` file) steers it while it runs:

- `version`: watched; editing it makes fetch, builds and tests run again.
- `NAME.hold`: while this file exists, the job NAME (`fetch`, `build-debian-12`, `test-alpine-3.19`,
  `lint`, ...) keeps running after its own steps, waiting. Remove it to let the job finish.
- `NAME.say`: while NAME is held, each line appended to this file is copied to its log.
- `lint.ok`: lint succeeds when this file exists at the time it runs (outcomes are cached, so
  press Rebuild on the lint job after creating it).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path

import pipeline as p

PLATFORMS = ["debian-12", "alpine-3.19"]
"""The platforms each built and tested in their own branch of the diagram."""

POLL = 0.02
"""Seconds between two looks at the control directory while a job is held."""

CONTROL = Path("web-demo")
"""The control directory, set by `pipeline(args)` (kept out of the keys to keep them short)."""


async def steps(job: p.Job, what: str, count: int, pause: float = 0.15) -> None:
    """Write `count` progress lines to the job's log, `pause` seconds apart."""
    for i in range(1, count + 1):
        job.log(f"{what}: step {i}/{count}")
        await asyncio.sleep(pause)


async def hold(job: p.Job, name: str) -> None:
    """Keep the job running while `CONTROL/NAME.hold` exists; copy `NAME.say` lines to its log."""
    held = CONTROL / f"{name}.hold"
    say = CONTROL / f"{name}.say"
    if not held.exists():
        return
    job.log(f"Held: waiting for {held} to be removed")
    offset = say.stat().st_size if say.exists() else 0
    pending = b""
    while True:
        if say.exists():
            with say.open("rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                job.log(line.decode("utf-8", errors="replace"))
        if not held.exists():
            break
        await asyncio.sleep(POLL)
    job.log("Released")


@p.builder("fetch", auto_cancel=True, pp=lambda key: f"version {key.strip()}")
async def fetch(job: p.Job, key: str) -> str:
    """Pretend to fetch the sources of a version (the key); the value is the version."""
    version = key.strip()
    job.log(f"Fetching sources of version {version}")
    await steps(job, "fetch", 3)
    await hold(job, "fetch")
    return version


@p.builder("build", auto_cancel=True, pp=lambda key: f"{key[0]} at {key[1]}")
async def build(job: p.Job, key: tuple[str, str]) -> str:
    """Pretend to build a version for a platform; the value names the artefact."""
    platform, version = key
    job.log(f"Building version {version} for {platform}")
    await steps(job, f"compile {platform}", 4)
    await hold(job, f"build-{platform}")
    return f"app-{version}-{platform}.tar"


@p.builder("test", auto_cancel=True)
async def test(job: p.Job, key: str) -> str:
    """Pretend to run the tests of an artefact (the key)."""
    platform = next(name for name in PLATFORMS if key.endswith(f"-{name}.tar"))
    job.log(f"Testing {key}")
    await steps(job, f"test {platform}", 3)
    await hold(job, f"test-{platform}")
    return f"{key}: 42 tests passed"


@p.builder("lint", auto_cancel=True, pp=lambda key: f"version {key.strip()}")
async def lint(job: p.Job, key: str) -> str:
    """Pretend to lint the sources; fails unless `CONTROL/lint.ok` exists."""
    job.log("Linting")
    await steps(job, "lint", 2)
    await hold(job, "lint")
    if not (CONTROL / "lint.ok").exists():
        job.log("\x1b[31msrc/main.py:3: unused import 'os'\x1b[0m")
        raise RuntimeError(f"lint found 1 problem (create {CONTROL / 'lint.ok'} and rebuild)")
    return "clean"


def platform_branch(version: p.Term[str]) -> Callable[[p.Term[str]], p.Term[str]]:
    """The per-platform sub-pipeline of the list_map: build then test, labelled by platform."""

    def branch(item: p.Term[str]) -> p.Term[str]:
        def per_platform(platform: str) -> p.Term[str]:
            built = build(version.map(lambda v: (platform, v), label="build key"),
                          label=f"build {platform}")
            return test(built, label=f"test {platform}")

        return item.bind(per_platform, label="platform")

    return branch


def pipeline(args: list[str]) -> p.Term[list[object]]:
    """The demo pipeline; creates CONTROL_DIR and its `version` file if they are missing."""
    global CONTROL
    parser = argparse.ArgumentParser(prog="web_demo.py")
    parser.add_argument("control", type=Path, help="the control directory (see the docstring)")
    options = parser.parse_args(args)
    CONTROL = options.control.absolute()
    CONTROL.mkdir(parents=True, exist_ok=True)
    if not (CONTROL / "version").exists():
        (CONTROL / "version").write_text("1.0\n")

    source = p.watch_file(CONTROL / "version")
    version = fetch(source, label="fetch")
    platforms = p.const(PLATFORMS, label="platform list")
    tests = p.list_map(platform_branch(version), platforms, label="platforms")
    return p.all_labelled({"tests": tests, "lint": lint(source, label="lint")}, label="all")
