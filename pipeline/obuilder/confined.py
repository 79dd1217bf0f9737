"""Host-side path operations confined to a directory tree that hostile code wrote (a rootfs).

Every entry of a rootfs may have been made by an untrusted image or command: any component of a
path in it may be a symlink, absolute or climbing with `..`, pointing at a host file. A
path-based call on the host (`open(rootfs / path)`, `Path.unlink`, `os.path.lexists`, tarfile's
`chmod` of a directory...) follows such links and acts on the host. The functions here never do:
they walk a path one component at a time from a descriptor of the root, each directory opened
with `O_NOFOLLOW` relative to the one before, so whatever the tree holds, they stay inside it.
Act on what they return through the descriptor (`dir_fd=` arguments, `os.fchown`, `os.fchmod`,
`os.utime(fd)`).

Two ways of walking:
- *following in the root* (`resolve`, `open_dir(..., follow_in_root=True)`): symlinks are
  resolved as if the root were `/` (as `openat2(RESOLVE_IN_ROOT)` does): an absolute target
  starts again from the root and `..` never climbs above it;
- *literal* (`open_dir`, `make_dirs`): every symlink and every `..` component is refused, so the
  caller gets the directory the path names literally, or an error.

`make_entry` creates a path (a mount point, a file put in for a while) and `remove_made` removes
what it created, and only that, once done.

Paths are written as inside the tree: `/etc/passwd` and `etc/passwd` are the same entry. Errors
are the kernel's `OSError`s, whose `filename` is the path walked up to the offending component:
ELOOP for a symlink a literal walk may not follow (or after `MAX_SYMLINKS` of them), EXDEV for a
literal `..`, ENOTDIR for a component that is not a directory, ENOENT for a missing one; callers
turn them into a `BuildError` naming what they were doing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections import deque
from dataclasses import dataclass

MAX_SYMLINKS = 40
"""Symlinks followed in one path before giving up with ELOOP (the kernel's limit)."""

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Root = int | str | os.PathLike[str]
"""The top of a tree: a directory descriptor, or a trusted host path."""


def resolve(root: Root, path: str) -> str:
    """`path` with its symlinks resolved as if `root` were `/`, relative to it ("" for the
    root itself).

    The last component is followed too. Components that do not exist are kept as written, so
    the result is where `path` would be created. Raises NotADirectoryError if a component
    before the last is neither a directory nor a symlink, OSError(ELOOP) after 40 symlinks.
    """
    fds, names = _walk(root, path, follow_in_root=True, must_exist=False)
    _close(fds)
    return "/".join(names)


def open_dir(root: Root, path: str, *, follow_in_root: bool = False) -> int:
    """A new descriptor (read-only, close-on-exec; the caller closes it) of the directory
    `path` in the tree of `root`; `""`, `.` and `/` open the root itself.

    With `follow_in_root` symlinks on the way are resolved as `resolve` does; without it the
    walk is literal (see the module's documentation). Raises FileNotFoundError if a component
    is missing, NotADirectoryError if one is not a directory, OSError(ELOOP or EXDEV) as said.
    """
    fds, _ = _walk(root, path, follow_in_root=follow_in_root, must_exist=True)
    _close(fds[:-1])
    return fds[-1]


def make_dirs(root: Root, path: str, mode: int) -> int:
    """Like a literal `open_dir`, but missing components of `path` are created as directories
    with `mode` (less the umask); a descriptor of the last one. Raises OSError as `open_dir`
    does (never ENOENT), or as mkdir does."""
    fds, _ = _walk(root, path, follow_in_root=False, must_exist=True, create_mode=mode)
    _close(fds[:-1])
    return fds[-1]


@dataclass(frozen=True)
class Made:
    """An entry `make_entry` made: its path relative to the root (free of symlinks when it was
    made), and the (st_dev, st_ino) of the entry and of its parent directory."""

    path: str
    identity: tuple[int, int]
    parent: tuple[int, int]


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def make_entry(root: int, path: str, *, is_dir: bool, made: list[Made]) -> None:
    """Create `path` in the tree of the descriptor `root` (a directory if `is_dir`, else an
    empty file, mode 0644), and its missing parents, unless it exists; symlinks on the way are
    followed as if the root were `/`. Each entry made is appended to `made` as soon as it
    exists, so that a failure half-way still lets the caller remove them (`remove_made`).
    Raises OSError as `resolve` and `open_dir` do."""
    parts = resolve(root, path).split("/")
    for depth, name in enumerate(parts):
        if not name:
            continue  # the path is the root itself
        parent = open_dir(root, "/".join(parts[:depth]), follow_in_root=False)
        try:
            if depth < len(parts) - 1 or is_dir:
                os.mkdir(name, dir_fd=parent)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644, dir_fd=parent))
        except FileExistsError:
            continue
        else:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            made.append(Made("/".join(parts[:depth + 1]), _identity(info),
                             _identity(os.fstat(parent))))
        finally:
            os.close(parent)


def remove_made(root: int, made: list[Made]) -> None:
    """Remove what `make_entry` made, deepest first, without following any symlink.

    An entry stays if it or anything on its path was replaced since (a different inode, a
    symlink on the way), or if files were put into it (a directory not empty): it is no longer
    only what `make_entry` made. Errors are ignored: what cannot be removed stays."""
    for entry in reversed(made):
        parent_path, _, name = entry.path.rpartition("/")
        try:
            parent = open_dir(root, parent_path, follow_in_root=False)
        except OSError:
            continue
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if _identity(os.fstat(parent)) != entry.parent or _identity(info) != entry.identity:
                continue
            if stat.S_ISDIR(info.st_mode):
                os.rmdir(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        except OSError:
            continue
        finally:
            os.close(parent)


def _walk(root: Root, path: str, *, follow_in_root: bool, must_exist: bool,
          create_mode: int | None = None) -> tuple[list[int], list[str]]:
    """Walk `path` from `root`: the descriptors of the directories reached (the root's first;
    all owned by the caller) and the names of the components, the missing ones included (only
    when not `must_exist`: they are past the last descriptor)."""
    pending = deque(_parts(path))
    if isinstance(root, int):
        fds = [os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)]
    else:
        fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    names: list[str] = []
    followed = 0

    def error(code: int, name: str) -> OSError:
        return OSError(code, os.strerror(code), posixpath.join(*names, name))

    try:
        while pending:
            name = pending.popleft()
            if name == "..":
                if not follow_in_root:
                    raise error(errno.EXDEV, name)
                if len(names) == len(fds) - 1 and len(fds) > 1:
                    os.close(fds.pop())
                if names:
                    names.pop()
                continue
            if len(names) >= len(fds):
                # Below a missing directory nothing exists: the rest is taken as written.
                names.append(name)
                continue
            try:
                info = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            except FileNotFoundError:
                if create_mode is not None:
                    # Made meanwhile by someone else: opened below like any other.
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, create_mode, dir_fd=fds[-1])
                    info = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
                elif must_exist:
                    raise error(errno.ENOENT, name) from None
                else:
                    names.append(name)
                    continue
            if stat.S_ISLNK(info.st_mode):
                followed += 1
                if not follow_in_root or followed > MAX_SYMLINKS:
                    raise error(errno.ELOOP, name)
                target = os.readlink(name, dir_fd=fds[-1])
                if target.startswith("/"):
                    _close(fds[1:])
                    del fds[1:], names[:]
                pending.extendleft(reversed(_parts(target)))
                continue
            if not stat.S_ISDIR(info.st_mode):
                if pending or must_exist:
                    raise error(errno.ENOTDIR, name)
                names.append(name)
                continue
            # O_NOFOLLOW: had the entry become a symlink since the stat, this fails.
            fds.append(os.open(name, _OPEN_DIR, dir_fd=fds[-1]))
            names.append(name)
    except BaseException:
        _close(fds)
        raise
    return fds, names


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
