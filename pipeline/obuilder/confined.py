"""Host-side path operations confined to a directory tree that a build controls (a rootfs).

Every entry of a rootfs may have been made by an untrusted command: any component of a path in
it may be a symlink, absolute or climbing with `..`, pointing at a host file. A path-based call on
the host (`open(rootfs / path)`, `Path.unlink`, `os.path.lexists`...) follows such links and acts
on the host. The functions here never do: they walk a path one component at a time from a
descriptor of the rootfs, each directory opened with `O_NOFOLLOW` relative to the one before (as
`openat2(RESOLVE_IN_ROOT)` does), so whatever the rootfs holds, they stay inside it.

Paths are written as inside the rootfs: `/etc/passwd` and `etc/passwd` are the same entry, and
`..` at the top stays at the top. Errors are the kernel's `OSError`s (FileNotFoundError,
NotADirectoryError, ELOOP for a symlink that may not be followed or for more than 40 of them);
callers turn them into a `BuildError` naming what they were doing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

MAX_SYMLINKS = 40
"""Symlinks followed in one path before giving up with ELOOP (the kernel's limit)."""

_OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def resolve(root_fd: int, path: str) -> str:
    """`path` with its symlinks resolved as if the directory `root_fd` were `/`, relative to it
    ("" for the root itself).

    A symlink's absolute target starts again from the root, and `..` never climbs above it;
    the last component is followed too. Components that do not exist are kept as written, so
    the result is where `path` would be created. Raises NotADirectoryError if a component
    before the last is neither a directory nor a symlink, OSError(ELOOP) after 40 symlinks.
    """
    fds, names = _walk(root_fd, path, follow_in_root=True, must_exist=False)
    _close(fds)
    return "/".join(names)


def open_dir(root_fd: int, path: str, *, follow_in_root: bool) -> int:
    """A new `O_PATH` descriptor of the directory `path` in the tree of `root_fd`, for use as
    the `dir_fd` of `os` calls (the caller closes it).

    With `follow_in_root` symlinks on the way are resolved as `resolve` does; without it any
    symlink is refused with OSError(ELOOP). Raises FileNotFoundError if a component is missing,
    NotADirectoryError if one is not a directory.
    """
    fds, _ = _walk(root_fd, path, follow_in_root=follow_in_root, must_exist=True)
    _close(fds[:-1])
    return fds[-1]


def _walk(root_fd: int, path: str, *, follow_in_root: bool,
          must_exist: bool) -> tuple[list[int], list[str]]:
    """Walk `path` from `root_fd`: the descriptors of the directories reached (the root's
    first; all owned by the caller) and the names of the components, the missing ones included
    (only when not `must_exist`: they are past the last descriptor)."""
    pending = deque(_parts(path))
    fds = [os.open(".", _OPEN_DIR, dir_fd=root_fd)]
    names: list[str] = []
    followed = 0
    try:
        while pending:
            name = pending.popleft()
            if name == "..":
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
                if must_exist:
                    raise
                names.append(name)
                continue
            if stat.S_ISLNK(info.st_mode):
                if not follow_in_root:
                    raise OSError(errno.ELOOP, "symbolic link in a confined path", name)
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=fds[-1])
                if target.startswith("/"):
                    _close(fds[1:])
                    del fds[1:], names[:]
                pending.extendleft(reversed(_parts(target)))
                continue
            if not stat.S_ISDIR(info.st_mode):
                if pending or must_exist:
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
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
