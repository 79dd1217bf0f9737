"""Safe extraction of image tarballs and layers into a rootfs, shared by the fetchers.

`extract` unpacks one tar stream into `rootfs`, preserving numeric ownership, modes, symlinks,
hard links and device nodes, and refusing any member that would write outside `rootfs`. With
`layer=True` it applies the tar as an image layer on top of what `rootfs` already holds: a
whiteout `.wh.NAME` deletes `NAME` from the lower layers and `.wh..wh..opq` empties its
directory of everything the lower layers put there.

What it guarantees, whatever the tarball and the lower layers hold:

- Nothing outside `rootfs` is created, changed or removed. Every directory a member's path
  passes through is reached by walking from `rootfs` one component at a time without following
  symlinks (`pipeline.obuilder.confined`): a member under a symlink or under a non-directory is
  refused with a BuildError naming it; so are whiteouts and opaque markers.
- An existing entry at a member's path is replaced (a directory only by a non-directory), so a
  member never writes through a symlink or into a file shared by a hard link.
- A hard link links, inside `rootfs`, what its target names there, a symlink included (never
  what the symlink points to); a target absent from the image is a BuildError.
- Directory owners, modes and times are applied once the whole tarball is extracted (so a
  read-only or back-dated directory does not stop or change later members), through a
  descriptor of the directory found as above: a directory a later member replaced (by a
  symlink to a host directory, say) gets nothing.
- Any other failure (a member the filesystem refuses) is a BuildError naming the member.

Device nodes and setuid files are extracted as they are: keeping other host users away from
them is the store's job (its directories are 0700, see `stores/common.py`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path

from pipeline.obuilder import confined
from pipeline.obuilder.protocols import BuildError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Mode of the directories a tarball implies but does not hold (as `tar` makes them).
IMPLIED_DIRECTORY_MODE = 0o755


def extract(tar: tarfile.TarFile, rootfs: Path, *, layer: bool = False) -> None:
    """Extract every member of `tar` (which may be a stream, mode `r|`) into `rootfs`.

    Raises BuildError naming the member when its path or hard-link target leaves `rootfs`
    (`..`, or through a symlink) or cannot be extracted (see the module's documentation);
    `rootfs` then holds part of the tarball: callers discard it.
    """
    directories: dict[str, tarfile.TarInfo] = {}
    added: set[str] = set()
    current = ""
    try:
        for member in tar:
            current = member.name
            if _prepare(member, rootfs, layer, added):
                if member.isdir():
                    directories[member.name] = member
                # Members are read in order, so a stream needs each extracted as it comes.
                tar.extract(member, rootfs, set_attrs=not member.isdir(), numeric_owner=True)
        for member in directories.values():
            current = member.name
            _set_directory_attributes(rootfs, member)
    except OSError as e:
        raise BuildError(f"image member {current!r} cannot be extracted: {e.strerror or e}"
                         ) from None


def _prepare(member: tarfile.TarInfo, rootfs: Path, layer: bool, added: set[str]) -> bool:
    """Make way for `member` (its name made relative to `rootfs`): create the directories it
    implies, remove what its path holds; apply it if it is a whiteout or a hard link. Whether
    tarfile must still extract it. Raises BuildError if it would leave `rootfs`."""
    original = member.name
    member.name = _relative(member.name, original)
    if member.name == ".":
        if not member.isdir():
            raise BuildError(f"image member {original!r} would replace the rootfs")
        return True
    directory, base = posixpath.split(member.name)
    if layer and base == OPAQUE:
        parent = _open_parent(rootfs, member.name, original, create=False)
        if parent is not None:
            try:
                _empty(parent, directory, added)
            finally:
                os.close(parent)
        return False
    if layer and base.startswith(WHITEOUT):
        hidden = _relative(posixpath.join(directory, base[len(WHITEOUT):]), original)
        if hidden == ".":
            raise BuildError(f"image member {original!r} whites out the rootfs")
        _whiteout(rootfs, hidden, original)
        return False
    added.add(member.name)
    parent = _open_parent(rootfs, member.name, original, create=True)
    assert parent is not None
    try:
        existing = _lstat(parent, base)
        if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            _remove(parent, base)
        if member.islnk():
            _hard_link(rootfs, member, parent, base, original)
            return False
    finally:
        os.close(parent)
    return True


def _hard_link(rootfs: Path, member: tarfile.TarInfo, parent: int, base: str,
               original: str) -> None:
    """Make `base` in `parent` a hard link to what `member.linkname` names in `rootfs`: the
    entry itself, never what a symlink there points to (tarfile's os.link would follow it and
    hard-link a host file such as /etc/shadow into the image), and never a host file."""
    target = _relative(member.linkname, original)
    absent = BuildError(f"image member {original!r} is a hard link to {member.linkname!r}, "
                        "which is not in the image")
    source_dir = _open_parent(rootfs, target, original, create=False)
    if source_dir is None:
        raise absent
    try:
        os.link(posixpath.basename(target), base, src_dir_fd=source_dir, dst_dir_fd=parent,
                follow_symlinks=False)
    except FileNotFoundError:
        raise absent from None
    finally:
        os.close(source_dir)


def _set_directory_attributes(rootfs: Path, member: tarfile.TarInfo) -> None:
    """Give the directory `member` made its owner, mode and time, through a descriptor; nothing
    if a later member replaced it or a directory above it."""
    try:
        fd = confined.open_dir(rootfs, member.name)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return
        raise
    try:
        os.chown(fd, member.uid, member.gid)
        # After chown, which may clear set-id bits.
        os.chmod(fd, member.mode)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _whiteout(rootfs: Path, hidden: str, original: str) -> None:
    """Delete `hidden` (relative to `rootfs`) for the whiteout `original`."""
    parent = _open_parent(rootfs, hidden, original, create=False)
    if parent is not None:
        try:
            _remove(parent, posixpath.basename(hidden))
        finally:
            os.close(parent)


def _empty(directory: int, name: str, added: set[str]) -> None:
    """Remove what lower layers put in `directory` (a descriptor; `name` in the image), keeping
    the entries this layer already `added`."""
    for child in os.listdir(directory):
        if posixpath.join(name, child) not in added:
            _remove(directory, child)


def _lstat(parent: int, name: str) -> os.stat_result | None:
    """The entry `name` in the directory `parent`, not following a symlink; None if absent."""
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(parent: int, name: str) -> None:
    """Delete the entry `name` (a directory with its contents) of `parent` if it exists."""
    existing = _lstat(parent, name)
    if existing is None:
        return
    if stat.S_ISDIR(existing.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def _open_parent(rootfs: Path, name: str, member: str, *, create: bool) -> int | None:
    """A descriptor of the directory holding `name` in `rootfs`, its missing components made
    if `create` (None if one is missing otherwise). Raises BuildError naming `member` if a
    component is a symlink or not a directory."""
    try:
        if create:
            return confined.make_dirs(rootfs, posixpath.dirname(name), IMPLIED_DIRECTORY_MODE)
        return confined.open_dir(rootfs, posixpath.dirname(name))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BuildError(f"image member {member!r} passes through the symlink "
                             f"/{e.filename}") from None
        if e.errno == errno.ENOTDIR:
            raise BuildError(f"image member {member!r} is under /{e.filename}, which is not a "
                             "directory") from None
        if e.errno == errno.ENOENT:
            return None
        raise


def _relative(name: str, member: str) -> str:
    """`name` relative to the rootfs, or BuildError naming `member` if it leaves it.

    A leading `/` is dropped (as GNU tar does): paths in an image are relative to its root.
    """
    relative = posixpath.normpath(name.lstrip("/"))
    if relative == ".." or relative.startswith("../"):
        raise BuildError(f"image member {member!r} escapes the rootfs")
    return relative
