"""A monitor of one file's content, watched with watchdog.

The watch is on the file's directory, not the file: editors often save by writing a new file and
renaming it over the old one, which a watch on the old inode would miss.

Only events that mean a finished change wake the monitor: a writer closing the file, and the file
appearing, going or being renamed. Opening and reading do not (the monitor's own reads would wake
it again, for ever), nor does a write in progress: a writer that truncates the file then writes
is read once, when it closes the file, never half-way. A file *created* by a slow writer is still
read as soon as it appears and again when it is closed; write a new file and rename it over the
watched one (as editors do) to be read once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from pipeline.monitor import Monitor, Unwatch
from pipeline.term import Term

# The events of a finished change (see the module's docstring). Given to the observer, which asks
# the kernel for these only (inotify's mask), so that reads and writes in progress cost nothing.
_FINISHED_CHANGES: list[type[FileSystemEvent]] = [
    FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent]


class _FileEvents(FileSystemEventHandler):
    def __init__(self, path: Path, refresh: Callable[[], None]) -> None:
        self.path = path
        self.refresh = refresh

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {event.src_path, getattr(event, "dest_path", "")}
        if any(p and Path(str(p)).absolute() == self.path for p in paths):
            self.refresh()


class FileMonitor(Monitor[str]):
    """The text content of `path`; a missing or unreadable file is an error naming it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()
        self.label = f"file {self.path.name}"

    @property
    def key(self) -> tuple[str, str]:
        """Monitors of the same path share one watch."""
        return ("file", str(self.path))

    async def watch(self, refresh: Callable[[], None]) -> Unwatch:
        """Watch the file's directory for finished changes of the file."""
        directory = self.path.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory")
        observer = Observer()
        observer.schedule(_FileEvents(self.path, refresh), str(directory), recursive=False,
                          event_filter=_FINISHED_CHANGES)
        observer.start()

        async def unwatch() -> None:
            observer.stop()
            await asyncio.to_thread(observer.join)

        return unwatch

    async def read(self) -> str:
        """Read the file's text (UTF-8)."""
        try:
            return await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise OSError(f"{self.path}: {exc.strerror}") from None


def watch_file(path: Path | str) -> Term[str]:
    """A term whose value is the current content of the file at `path`."""
    return FileMonitor(path).term
