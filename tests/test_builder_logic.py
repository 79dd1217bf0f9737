"""The builder's own rules (see `pipeline/obuilder/builder.py` and the protocols'
documentation in `pipeline/obuilder/protocols.py`), over the fakes of `obuilder_fakes`: caching,
steps shared by concurrent builds, cancellation, failures, caches, secrets and full stores.

These need no root and take milliseconds; test_builder.py checks the same kinds of rules over
the real stores and runc. Builds that must overlap are ordered by the scripted commands' events,
never by waiting for time to pass.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pytest
from obuilder_fakes import Command, FakeFetcher, FakeStore, ScriptedSandbox
from obuilder_fixtures import HANG_GUARD, RecordingLog

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder, from_id
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.log_format import MARK, MARK_SHOWN
from pipeline.obuilder.protocols import (
    BuildError,
    DiskUsage,
    Fetcher,
    Sandbox,
    SandboxConfig,
    Secret,
    Store,
    StoreFull,
)

TWO_STEPS = '((from base) (run (shell "prepare")) (run (shell "build")))'
SAVED = re.compile(r'---> saved as "([0-9a-f]{64})"')


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    root = tmp_path / "store"
    root.mkdir()
    return FakeStore(root)


@pytest.fixture
def sandbox() -> ScriptedSandbox:
    return ScriptedSandbox()


@pytest.fixture
def fetcher() -> FakeFetcher:
    return FakeFetcher({"base": {"PATH": "/bin"}})


@pytest.fixture
async def builder(store: FakeStore, sandbox: ScriptedSandbox,
                  fetcher: FakeFetcher) -> AsyncIterator[Builder]:
    builder = Builder(store, sandbox, fetcher)
    yield builder
    builder.close()


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "context"
    directory.mkdir()
    return directory


class Running(NamedTuple):
    """A build running in a task of its own, and its output so far."""

    task: asyncio.Task[str]
    log: RecordingLog


def start(builder: Builder, text: str, context: Path, **options: object) -> Running:
    """Start building the spec `text`."""
    log = RecordingLog()
    task = asyncio.create_task(
        builder.build(S.parse(text), context, log=log, **options))  # type: ignore[arg-type]
    return Running(task, log)


async def build(builder: Builder, text: str, context: Path, **options: object) -> tuple[str, str]:
    """Build the spec `text`; its result id and output."""
    running = start(builder, text, context, **options)
    async with asyncio.timeout(HANG_GUARD):
        return await running.task, running.log.text


async def started(command: Command) -> None:
    async with asyncio.timeout(HANG_GUARD):
        await command.started.wait()


async def two_builds_sharing_a_step(builder: Builder, sandbox: ScriptedSandbox, context: Path,
                                    step: Command) -> tuple[Running, Running]:
    """Two builds of TWO_STEPS, the second joining the first's "build" step, which does what
    `step` (a blocked command) says; returns once both wait for that step."""
    sandbox.script("prepare")
    sandbox.script("build", step)
    first = start(builder, TWO_STEPS, context)
    await started(step)
    second = start(builder, TWO_STEPS, context)
    await second.log.wait_for("(run (shell build))")
    return first, second


def test_the_fakes_implement_the_protocols(
        store: FakeStore, sandbox: ScriptedSandbox, fetcher: FakeFetcher) -> None:
    assert isinstance(store, Store)
    assert isinstance(sandbox, Sandbox)
    assert isinstance(fetcher, Fetcher)


# The log's form.


async def test_only_the_builder_writes_marked_lines_and_each_starts_a_line(
        builder: Builder, sandbox: ScriptedSandbox, context: Path) -> None:
    forged = b'/: (run (shell build))' + MARK + b'\n---> saved as "' + b"0" * 64 + b'"' + MARK
    sandbox.script("prepare", Command(output=b"no newline at the end"))
    sandbox.script("build", Command(output=forged, exit_status=1))
    running = start(builder, TWO_STEPS, context)
    with pytest.raises(BuildError):
        async with asyncio.timeout(HANG_GUARD):
            await running.task
    marked = [line for line in bytes(running.log.data).split(b"\n") if line.endswith(MARK)]
    assert [line.partition(b" ")[0] for line in marked] == [
        b"(from", b"--->", b"/:", b"--->", b"/:"], marked
    shown = forged.replace(MARK, MARK_SHOWN)
    # The output that ended no line is ended before the outcome; so is the failed step's.
    assert bytes(running.log.data).endswith(
        b"no newline at the end\n---> saved as " + marked[3].partition(b" as ")[2] + b"\n"
        + b"/: (run (shell build))" + MARK + b"\n" + shown + b"\n")


async def test_a_replayed_log_cannot_forge_marked_lines(
        builder: Builder, sandbox: ScriptedSandbox, context: Path) -> None:
    sandbox.script("prepare", Command(output=b"fake" + MARK + b"\n"))
    sandbox.script("build")
    await build(builder, TWO_STEPS, context)
    _, again = await build(builder, TWO_STEPS, context)
    assert "fake\u241f\n" in again and "from cache" in again


# Caching.


async def test_a_second_build_of_the_same_spec_runs_nothing(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, fetcher: FakeFetcher,
        context: Path) -> None:
    prepare = sandbox.script("prepare", Command(output=b"preparing\n", files={"p": "p"}))
    build_ = sandbox.script("build", Command(output=b"building\n"))
    first_id, first = await build(builder, TWO_STEPS, context)
    saved = SAVED.findall(first)
    assert len(saved) == 3 and saved[-1] == first_id

    second_id, second = await build(builder, TWO_STEPS, context)
    assert second_id == first_id
    assert (prepare.runs, build_.runs, fetcher.fetches["base"]) == (1, 1, 1)
    assert second == re.sub(r'saved as ("[0-9a-f]{64}")', r"using \1 from cache", first)
    # The store is told of each cache hit, for pruning (a `DbStore` also counts a build on a
    # base as a use of it).
    assert store.used == saved
    assert dict(store.builds) == dict.fromkeys(saved, 1)
    result = await store.result(first_id)
    assert result is not None and (result / "rootfs" / "p").read_text() == "p"


async def test_a_cache_hit_is_recorded_as_a_use_by_the_result_table(
        store: FakeStore, sandbox: ScriptedSandbox, fetcher: FakeFetcher,
        context: Path) -> None:
    sandbox.script("prepare")
    sandbox.script("build")
    now = 0.0

    def clock() -> float:
        return now

    db = DbStore(store, clock=clock)
    await db.clean()
    builder = Builder(db, sandbox, fetcher)
    try:
        prepared, _ = await build(builder, '((from base) (run (shell "prepare")))', context)
        now = 10.0
        built, _ = await build(builder, '((from base) (run (shell "build")))', context)
        # "prepare" was last used when it was made; the base again at 10 (a cache hit).
        assert await db.prune(datetime.fromtimestamp(5, UTC)) == [prepared]
        now = 20.0
        await build(builder, '((from base) (run (shell "build")))', context)
        # Both steps were cache hits at 20: neither is pruned before 15.
        assert await db.prune(datetime.fromtimestamp(15, UTC)) == []
        assert await db.prune(datetime.fromtimestamp(25, UTC)) == [built, from_id("base")]
    finally:
        builder.close()


# Sharing a step.


async def test_two_builds_needing_a_step_at_once_run_it_once_and_both_get_its_log(
        builder: Builder, sandbox: ScriptedSandbox, context: Path) -> None:
    build_ = Command(output=b"early output\n", blocked=True)
    first, second = await two_builds_sharing_a_step(builder, sandbox, context, build_)
    # The late joiner gets what the step wrote before it joined.
    await second.log.wait_for("early output")
    build_.release()
    async with asyncio.timeout(HANG_GUARD):
        result = await first.task
        assert await second.task == result
    assert build_.runs == 1
    shared = f'/: (run (shell build))\nearly output\n---> saved as "{result}"\n'
    assert first.log.text.endswith(shared)
    assert second.log.text.endswith(shared)


async def test_two_builds_sharing_a_failing_step_both_get_its_failure(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    build_ = Command(blocked=True, exit_status=2)
    first, second = await two_builds_sharing_a_step(builder, sandbox, context, build_)
    build_.release()
    outcomes = await asyncio.wait_for(
        asyncio.gather(first.task, second.task, return_exceptions=True), HANG_GUARD)
    assert [(type(e), str(e)) for e in outcomes] == [
        (BuildError, "step /: (run (shell build)) failed: command exited with status 2")] * 2
    assert build_.runs == 1
    assert len(await store.results()) == 2  # the base and "prepare"


# Cancellation.


async def test_cancelling_one_of_two_builds_sharing_a_step_keeps_the_step(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    build_ = Command(blocked=True)
    first, second = await two_builds_sharing_a_step(builder, sandbox, context, build_)
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    assert build_.cancellations == 0
    build_.release()
    result = await asyncio.wait_for(second.task, HANG_GUARD)
    assert await store.result(result) is not None
    assert build_.runs == 1


async def test_cancelling_the_last_build_waiting_for_a_step_kills_it(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    build_ = Command(blocked=True)
    first, second = await two_builds_sharing_a_step(builder, sandbox, context, build_)
    results_before = await store.results()
    for running in (first, second):
        running.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running.task
    # Cancelling the last waiter returns only once the step has ended and been discarded.
    assert build_.cancellations == 1
    assert await store.results() == results_before
    # Nothing was recorded: the next build runs the step again.
    build_.blocked = False
    await build(builder, TWO_STEPS, context)
    assert build_.runs == 2


async def test_a_build_needing_a_step_being_cancelled_runs_it_afresh(
        builder: Builder, sandbox: ScriptedSandbox, context: Path) -> None:
    sandbox.script("prepare")
    build_ = sandbox.script("build", Command(blocked=True, dies_slowly=True))
    first = start(builder, TWO_STEPS, context)
    await started(build_)
    first.task.cancel()
    # The step is dying, slowly: a newcomer must not join it (it would be cancelled with it),
    # but wait for it to end and run the step again.
    await asyncio.wait_for(build_.killed.wait(), HANG_GUARD)
    build_.started.clear()
    second = start(builder, TWO_STEPS, context)
    await second.log.wait_for("(run (shell build))")
    build_.let_die()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    await started(build_)
    build_.release()
    await asyncio.wait_for(second.task, HANG_GUARD)
    assert (build_.runs, build_.cancellations) == (2, 1)


# Failures.


async def test_a_failed_step_is_named_records_nothing_and_runs_again(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    sandbox.script("prepare")
    build_ = sandbox.script("build", Command(output=b"trying\n", files={"half": "done"},
                                             exit_status=2))
    with pytest.raises(BuildError) as failure:
        await build(builder, TWO_STEPS, context)
    assert str(failure.value) == "step /: (run (shell build)) failed: command exited with status 2"
    kept = await store.results()
    assert len(kept) == 2  # the base and "prepare", not "build"

    build_.exit_status = 0
    result, output = await build(builder, TWO_STEPS, context)
    assert build_.runs == 2
    assert await store.results() == sorted([*kept, result])
    assert output.count("from cache") == 2
    assert output.endswith(f'trying\n---> saved as "{result}"\n')


async def test_an_unknown_image_is_named_and_nothing_runs(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    with pytest.raises(BuildError, match="step \\(from nowhere\\) failed: unknown image "
                       "'nowhere'"):
        await build(builder, '((from nowhere) (run (shell "build")))', context)
    assert await store.results() == []
    assert sandbox.configs == []


async def test_a_full_store_refuses_to_build(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    store.usage = DiskUsage(total=10 * 2**30, free=2**20)
    with pytest.raises(StoreFull, match=f"store fake:{store.root} is full"):
        await build(builder, TWO_STEPS, context)
    assert await store.results() == []


# Caches and secrets.


async def test_a_cache_is_made_for_the_steps_user_and_a_failed_step_changes_nothing(
        builder: Builder, store: FakeStore, sandbox: ScriptedSandbox, context: Path) -> None:
    def count(config: SandboxConfig, rootfs: Path) -> None:
        (cache,) = config.mounts
        assert cache.dst == "/home/opam/.cache"
        counter = Path(cache.src) / "counter"
        counter.write_text(str(int(counter.read_text()) + 1) if counter.exists() else "1")

    cached = '((from base) (user (name opam)) (run (cache (c (target /home/opam/.cache))) ' \
             '(shell "{}")))'
    sandbox.script("count", Command(effect=count))
    sandbox.script("count and fail", Command(effect=count, exit_status=1))
    await build(builder, cached.format("count"), context)
    assert store.cache_owners == {"c": (1000, 1000)}
    assert store.cache_files("c") == {"counter": "1"}
    with pytest.raises(BuildError):
        await build(builder, cached.format("count and fail"), context)
    assert store.cache_files("c") == {"counter": "1"}


async def test_secrets_reach_the_sandbox_as_values_outside_the_step_id(
        builder: Builder, sandbox: ScriptedSandbox, context: Path) -> None:
    sandbox.script("use")
    spec = '((from base) (run (secrets (token (target /run/token))) (shell "use")))'
    with pytest.raises(BuildError, match="no value given for secret 'token'"):
        await build(builder, spec, context)
    assert sandbox.configs == []
    first, _ = await build(builder, spec, context, secrets={"token": b"one"})
    second, output = await build(builder, spec, context, secrets={"token": b"two"})
    assert first == second and "from cache" in output
    assert [config.secrets for config in sandbox.configs] == [[Secret(b"one", "/run/token")]]
