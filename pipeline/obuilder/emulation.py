"""Running another architecture's programs: qemu-user, started by the kernel through binfmt_misc.

Debian's `qemu-user-static` registers, with `binfmt-support`, one binfmt_misc handler per
architecture (`/proc/sys/fs/binfmt_misc/qemu-aarch64`, ...): the kernel runs every arm64 program
through the handler's interpreter, wherever it is started, containers included. `find_emulator`
checks, before a build for an emulated platform runs anything, that the handler is there,
enabled and has its interpreter, and otherwise raises `MissingTool` saying what to install and
run.

Where the kernel finds the interpreter depends on the handler's `F` ("fix binary") flag:
- with `F` (Debian's default: flags `PF`), the kernel opened the interpreter when the handler
  was registered and uses that open file in any mount namespace or chroot: nothing more to do;
- without it, the kernel opens the interpreter's path when a program starts, inside the
  program's root: the interpreter must be visible there. A sandbox binds it read-only at its
  path (`Emulator.mounts`); a chroot gets a copy for the time it runs (`Emulator.visible_in`).
  Either way it is gone afterwards: no build result contains it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.obuilder import confined
from pipeline.obuilder.platforms import ARCHITECTURES, architecture, is_emulated, parse_platform
from pipeline.obuilder.protocols import BuildError, MissingTool, Mount

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
"""Where binfmt_misc is mounted: its `status` file and one file per handler."""

PACKAGES = "qemu-user-static binfmt-support"
"""The Debian packages that provide qemu-user and register its handlers."""


@dataclass(frozen=True)
class Emulator:
    """qemu's binfmt_misc handler for `platform` (`linux/ARCH`): `interpreter` is the path the
    handler names, `fix_binary` whether it has the `F` flag (see the module's documentation)."""

    platform: str
    interpreter: str
    fix_binary: bool

    def mounts(self) -> list[Mount]:
        """What a sandbox binds into the rootfs so that the kernel finds the interpreter:
        nothing with `F`; without it the interpreter (the file itself, symlinks resolved on
        the host), read-only at the path the handler names."""
        if self.fix_binary:
            return []
        return [Mount(Path(os.path.realpath(self.interpreter)), self.interpreter, readonly=True)]

    @contextmanager
    def visible_in(self, rootfs: Path) -> Iterator[None]:
        """Within the block, the interpreter is visible at its path in `rootfs` for a `chroot`
        (without `F`: a copy, made with its missing parent directories and removed with them
        afterwards, never written through a symlink leaving `rootfs`; with `F`: nothing is
        done). An entry already at that path is left as it is. Raises BuildError if the copy
        cannot be made."""
        if self.fix_binary:
            yield
            return
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        made: list[confined.Made] = []
        try:
            try:
                confined.make_entry(root_fd, self.interpreter, is_dir=False, made=made)
                if made and made[-1].path == confined.resolve(root_fd, self.interpreter):
                    _fill(root_fd, made[-1].path, Path(self.interpreter))
            except OSError as exc:
                raise BuildError(f"cannot put the interpreter {self.interpreter} in the "
                                 f"rootfs: {exc.strerror}") from None
            yield
        finally:
            confined.remove_made(root_fd, made)
            os.close(root_fd)


def _fill(root_fd: int, path: str, source: Path) -> None:
    """Copy `source` (a host file) into the empty file `path` of the tree `root_fd`, made
    executable."""
    parent_path, _, name = path.rpartition("/")
    parent = confined.open_dir(root_fd, parent_path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    with open(fd, "wb") as target, open(source, "rb") as original:
        shutil.copyfileobj(original, target)
        os.fchmod(target.fileno(), 0o755)


def handler_name(platform: str) -> str:
    """The name of qemu's binfmt_misc handler for `platform`: `qemu-aarch64`, ..."""
    return f"qemu-{architecture(platform).qemu}"


def find_emulator(platform: str, binfmt_dir: Path = BINFMT_DIR) -> Emulator:
    """The handler running `platform`'s programs (an emulated one), read from `binfmt_dir`.

    Raises MissingTool, in one line naming the Debian packages and what to run, when
    binfmt_misc is not mounted or disabled, or the handler is missing, disabled, or names an
    interpreter that does not exist; BuildError for an unknown platform.
    """
    platform = parse_platform(platform)
    name = handler_name(platform)
    handler = binfmt_dir / name

    def missing(problem: str, *, mount: bool = False) -> MissingTool:
        todo = [f"apt-get install {PACKAGES}", f"update-binfmts --enable {name}"]
        if mount:
            todo.insert(0, f"mount -t binfmt_misc binfmt_misc {binfmt_dir}")
        return MissingTool(f"cannot run {platform} programs on this {os.uname().machine} "
                           f"host: {problem} ({'; '.join(todo)})")

    status = _read(binfmt_dir / "status")
    if status is None:
        raise missing(f"binfmt_misc is not mounted at {binfmt_dir}", mount=True)
    if status.strip() != "enabled":
        raise missing(f"binfmt_misc is disabled ({binfmt_dir / 'status'})")
    text = _read(handler)
    if text is None:
        raise missing(f"no qemu handler {handler}")
    # `enabled`, then `NAME VALUE` lines: `interpreter /usr/...`, `flags: PF`, `magic ...`.
    lines = text.splitlines()
    fields = {}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        fields[key] = value
    if lines[:1] != ["enabled"]:
        raise missing(f"the qemu handler {handler} is disabled")
    interpreter = fields.get("interpreter", "")
    if not interpreter.startswith("/") or not os.access(interpreter, os.X_OK):
        raise missing(f"the interpreter {interpreter or '(none)'} of {handler} is missing")
    return Emulator(platform, interpreter, "F" in fields.get("flags:", ""))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def describe_platforms(binfmt_dir: Path = BINFMT_DIR) -> list[str]:
    """One line per platform saying whether builds for it can run here: natively, under
    emulation (the handler, and whether its interpreter is bound into sandboxes), or not (why,
    and what to do)."""
    lines = []
    for arch in ARCHITECTURES.values():
        if not is_emulated(arch.platform):
            lines.append(f"{arch.platform}: native")
            continue
        try:
            emulator = find_emulator(arch.platform, binfmt_dir)
        except MissingTool as exc:
            lines.append(f"{arch.platform}: unavailable: {exc}")
            continue
        how = "F flag" if emulator.fix_binary else "interpreter bound into each sandbox"
        lines.append(f"{arch.platform}: emulated by {emulator.interpreter} ({how})")
    return lines
