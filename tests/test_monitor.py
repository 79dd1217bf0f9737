"""Monitor lifecycle (reference counts, watch before read, coalesced refreshes); file monitor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline as p
import pipeline.monitor as monitor_module
from pipeline.output import Failed, Ok


class RecordingMonitor(p.Monitor[int]):
    """A monitor of an in-memory counter that records what the engine asks of it."""

    label = "counter"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.value = 0
        self.refresh: Callable[[], None] | None = None
        self.read_gate = asyncio.Event()
        self.read_gate.set()

    async def watch(self, refresh: Callable[[], None]) -> Any:
        self.events.append("watch")
        self.refresh = refresh

        def unwatch() -> None:
            self.events.append("unwatch")

        return unwatch

    async def read(self) -> int:
        self.events.append("read")
        await self.read_gate.wait()
        return self.value


async def poll_until(condition: Callable[[], bool], tries: int = 500) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_watch_is_installed_before_the_first_read(tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    async with p.Engine(monitor.term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        assert engine.root_output() == Ok(0)
    await poll_until(lambda: "unwatch" in monitor.events)
    assert monitor.events == ["watch", "read", "unwatch"]


async def test_monitor_shared_by_many_users_is_watched_once(tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    root = p.pair(monitor.term.map(str), p.watch(monitor).map(float))
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        assert engine.root_output() == Ok(("0", 0.0))
        assert monitor.events.count("watch") == 1
        assert monitor.events.count("read") == 1


async def test_refreshes_during_a_read_are_coalesced(tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    async with p.Engine(monitor.term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        monitor.read_gate.clear()
        monitor.value = 1
        assert monitor.refresh is not None
        monitor.refresh()
        await poll_until(lambda: monitor.events.count("read") == 2)
        for _ in range(5):
            monitor.refresh()
        monitor.value = 2
        monitor.read_gate.set()
        await engine.wait_idle()
        assert engine.root_output() == Ok(2)
        assert monitor.events.count("read") == 3, "five refreshes during a read: one more read"


async def test_last_release_unwatches(tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    use_it = p.Variable(True, label="use")
    root = p.bind(lambda use: monitor.term if use else p.const(-1), use_it, label="choose")
    async with p.Engine(root, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        assert monitor.events == ["watch", "read"]
        use_it.set(False)
        await engine.wait_idle()
        assert engine.root_output() == Ok(-1)
        await poll_until(lambda: "unwatch" in monitor.events)
        use_it.set(True)
        await engine.wait_idle()
        assert monitor.events == ["watch", "read", "unwatch", "watch", "read"]


async def test_read_error_fails_the_node_and_recovers(tmp_path: Path) -> None:
    class Flaky(RecordingMonitor):
        async def read(self) -> int:
            if self.value < 0:
                raise OSError("unreachable")
            return self.value

    monitor = Flaky()
    monitor.value = -1
    async with p.Engine(monitor.term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Failed) and out.message == "unreachable"
        monitor.value = 4
        assert monitor.refresh is not None
        monitor.refresh()
        await poll_until(lambda: engine.root_output() == Ok(4))


async def test_a_failed_watch_stays_failed_until_a_retry_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unwatchable(RecordingMonitor):
        """A monitor whose watch fails while `failures` is positive."""

        failures = 2

        async def watch(self, refresh: Callable[[], None]) -> Any:
            self.refresh = refresh
            if self.failures > 0:
                self.failures -= 1
                raise PermissionError("watch refused")
            return await super().watch(refresh)

    # The first retry after 0.5 s, then 1 s: the test waits for two retries.
    monkeypatch.setattr(monitor_module, "WATCH_RETRY_FIRST_S", 0.5)
    monitor = Unwatchable()
    async with p.Engine(monitor.term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Failed) and out.message == "cannot watch: watch refused"
        # A refresh asked for without a watch reads nothing and keeps the monitor idle.
        assert monitor.refresh is not None
        monitor.refresh()
        await engine.wait_idle()
        assert monitor.events == [] and isinstance(engine.root_output(), Failed)
        await poll_until(lambda: monitor.failures == 0)
        assert isinstance(engine.root_output(), Failed), "failed until a watch succeeds"
        await poll_until(lambda: engine.root_output() == Ok(0))
        assert monitor.events == ["watch", "read"]


async def test_refresh_from_another_thread(tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    async with p.Engine(monitor.term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        monitor.value = 9
        assert monitor.refresh is not None
        await asyncio.to_thread(monitor.refresh)
        await poll_until(lambda: engine.root_output() == Ok(9))


async def test_file_monitor_sees_edits_and_replacements(tmp_path: Path) -> None:
    path = tmp_path / "watched.txt"
    path.write_text("one")
    async with p.Engine(p.watch_file(path), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert engine.root_output() == Ok("one")
        path.write_text("two")
        await poll_until(lambda: engine.root_output() == Ok("two"))
        # Editors save by renaming a new file over the old one.
        replacement = tmp_path / "watched.txt.new"
        replacement.write_text("three")
        replacement.rename(path)
        await poll_until(lambda: engine.root_output() == Ok("three"))
        path.unlink()
        await poll_until(lambda: isinstance(engine.root_output(), Failed))
        out = engine.root_output()
        assert isinstance(out, Failed) and "no such file" in out.message


async def test_file_monitor_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "file.txt"
    async with p.Engine(p.watch_file(missing), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Failed) and "no such" in out.message


async def test_file_monitors_of_one_path_share_a_watch(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x")
    root = p.all(p.watch_file(path), p.watch_file(tmp_path / "." / "f.txt"))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert engine.root_output() == Ok(["x", "x"])
        assert len(engine._watchers) == 1


async def test_file_monitor_reads_a_slow_writer_once_when_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "watched.txt"
    path.write_text("old")
    seen: list[str] = []
    root = p.watch_file(path).map(lambda text: seen.append(text) or text)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        [watcher] = engine._watchers.values()

        def slow_write() -> None:
            # Truncated at open, written 0.3 s later: a read in between would see "".
            with path.open("w") as file:
                time.sleep(0.3)
                file.write("full")

        await asyncio.to_thread(slow_write)
        await poll_until(lambda: engine.root_output() == Ok("full"))
        # A rename as a barrier: the observer delivers events in order, so once this one is
        # read, any read the slow writer caused has been made.
        replacement = tmp_path / "watched.txt.new"
        replacement.write_text("barrier")
        replacement.rename(path)
        await poll_until(lambda: engine.root_output() == Ok("barrier"))
        await engine.wait_idle()
        assert seen == ["old", "full", "barrier"]
        assert watcher.reads == 3, "one read at start, one per finished change, none of its own"
