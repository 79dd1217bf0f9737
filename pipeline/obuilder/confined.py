"""Opening directories inside a tree that hostile code wrote (a rootfs), without leaving it.

A path inside a rootfs must never be resolved by the host's kernel as a plain path: any of its
components may be a symlink the image or a build planted (`etc -> /etc`), and the host would
follow it out of the rootfs. These functions walk such a path one component at a time from a
descriptor of the root, opening each with `O_NOFOLLOW | O_DIRECTORY`, so a symlink or a
non-directory anywhere on the way is an error instead of a way out; act on what they return
through the descriptor (`os.fchown`, `os.fchmod`, `os.utime(fd)`, `dir_fd=` arguments).

Unlike `openat2(RESOLVE_IN_ROOT)`, which resolves symlinks as if the root were `/`, these refuse
every symlink and every `..` component: a caller gets the directory the path names literally,
or an error saying which component is in the way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: int | str | os.PathLike[str], path: str) -> int:
    """A new descriptor (O_RDONLY, close-on-exec; the caller closes it) of the directory `path`
    inside `root` (a directory descriptor, or a trusted host path), no symlink followed.

    `path` is relative to `root`; a leading `/` is ignored, so an absolute path inside the
    rootfs may be given as is, and `""`, `.` and `/` open `root` itself. Raises OSError whose
    `filename` is `path` up to the offending component: errno ELOOP if that component is a
    symlink, ENOTDIR if it is not a directory, ENOENT if it does not exist, EXDEV if it is `..`.
    """
    return _walk(root, path, create_mode=None)


def make_dirs(root: int | str | os.PathLike[str], path: str, mode: int) -> int:
    """Like `open_dir`, but components of `path` that do not exist are created as directories
    with `mode` (less the umask); a descriptor of the last one. Raises OSError as `open_dir`
    does (never ENOENT), or as mkdir does."""
    return _walk(root, path, create_mode=mode)


def _walk(root: int | str | os.PathLike[str], path: str, create_mode: int | None) -> int:
    if isinstance(root, int):
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    else:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    for part in path.split("/"):
        if part in ("", "."):
            continue
        walked = posixpath.join(walked, part)
        try:
            if part == "..":
                raise OSError(errno.EXDEV, "a '..' component could leave the root", walked)
            child = _open_child(fd, part, walked, create_mode)
        finally:
            os.close(fd)
        fd = child
    return fd


def _open_child(parent: int, name: str, walked: str, create_mode: int | None) -> int:
    """Open the directory `name` in `parent`, made first if missing and `create_mode` is given;
    `walked` names it in errors."""
    try:
        try:
            return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if create_mode is None:
                raise
            # Made meanwhile by someone else: opened below like any other.
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, create_mode, dir_fd=parent)
            return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    except OSError as e:
        code = e.errno
        # O_DIRECTORY makes the kernel report a symlink as ENOTDIR, not O_NOFOLLOW's ELOOP.
        if code == errno.ENOTDIR and _is_symlink(parent, name):
            code = errno.ELOOP
        raise OSError(code, os.strerror(code), walked) from None


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
