"""A monitor of one file's content, watched with watchdog.

The watch is on the file's directory, not the file: editors often save by writing a new file and
renaming it over the old one, which a watch on the old inode would miss.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pipeline.monitor import Monitor, Unwatch
from pipeline.term import Term


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
        """Watch the file's directory for events on the file."""
        directory = self.path.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory")
        observer = Observer()
        observer.schedule(_FileEvents(self.path, refresh), str(directory), recursive=False)
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
