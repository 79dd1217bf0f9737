"""Safe extraction of image tarballs and layers into a rootfs, shared by the fetchers.

`extract` unpacks one tar stream into `rootfs`, preserving numeric ownership, modes, symlinks,
hard links and device nodes, and refusing any member that would write outside `rootfs`. With
`layer=True` it applies the tar as an image layer on top of what `rootfs` already holds: a
whiteout `.wh.NAME` deletes `NAME` from the lower layers and `.wh..wh..opq` empties its
directory of everything the lower layers put there.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.obuilder.protocols import BuildError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def extract(tar: tarfile.TarFile, rootfs: Path, *, layer: bool = False) -> None:
    """Extract every member of `tar` (which may be a stream, mode `r|`) into `rootfs`.

    An existing entry at a member's path is replaced (a directory only by a non-directory), so
    a member never writes through a symlink or into a file shared by a hard link. Raises
    BuildError naming the member when its path or hard-link target leaves `rootfs` (`..`, or
    through a symlink); `rootfs` then holds part of the tarball: callers discard it.
    """
    # `extractall` sets directory modes and times last, so read-only directories in the image
    # do not stop later members; the generator checks each member just before it is extracted,
    # when the directories it will pass through are already on disk.
    tar.extractall(rootfs, members=_checked(tar, rootfs, layer), numeric_owner=True)


def _checked(tar: tarfile.TarFile, rootfs: Path, layer: bool) -> Iterator[tarfile.TarInfo]:
    """Yield the members of `tar` to extract, refusing those that would write outside `rootfs`,
    and (for a layer) applying whiteouts instead of yielding them."""
    added: set[str] = set()
    for member in tar:
        member.name = _inside(member.name, rootfs, member.name)
        if member.name == "." and not member.isdir():
            raise BuildError(f"image member {member.name!r} would replace the rootfs")
        directory, base = posixpath.split(member.name)
        if layer and base == OPAQUE:
            _empty(rootfs / directory, directory, added)
            continue
        if layer and base.startswith(WHITEOUT):
            hidden = _inside(posixpath.join(directory, base[len(WHITEOUT):]), rootfs, member.name)
            if hidden in ("", "."):
                raise BuildError(f"image member {member.name!r} whites out the rootfs")
            _remove(rootfs / hidden)
            continue
        added.add(member.name)
        target = rootfs / member.name
        if target.is_symlink() or (target.exists() and not (member.isdir() and target.is_dir())):
            _remove(target)
        if member.islnk():
            member.linkname = _inside(member.linkname, rootfs, member.name)
            source = rootfs / member.linkname
            if source.is_symlink():
                # tarfile's os.link follows a symlink: a link to `/etc/shadow` would hard-link
                # the host's file into the image. Link the symlink itself, as Docker does.
                os.link(source, target, follow_symlinks=False)
                continue
        yield member


def _empty(directory: Path, name: str, added: set[str]) -> None:
    """Remove what lower layers put in `directory` (named `name` in the image), keeping the
    entries this layer already `added`."""
    if not directory.is_dir() or directory.is_symlink():
        return
    for child in directory.iterdir():
        if posixpath.join(name, child.name) not in added:
            _remove(child)


def _remove(path: Path) -> None:
    """Delete `path` (a directory with its contents) if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _inside(name: str, rootfs: Path, member: str) -> str:
    """`name` relative to `rootfs`, or BuildError if it leaves it or passes through a symlink.

    A leading `/` is dropped (as GNU tar does): paths in an image are relative to its root.
    """
    relative = posixpath.normpath(name.lstrip("/"))
    if relative == ".." or relative.startswith("../"):
        raise BuildError(f"image member {member!r} escapes the rootfs")
    parent = rootfs
    for part in Path(relative).parts[:-1]:
        parent = parent / part
        if parent.is_symlink():
            inside = parent.relative_to(rootfs)
            raise BuildError(f"image member {member!r} passes through the symlink /{inside}")
    return relative
