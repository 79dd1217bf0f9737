"""The manifest of a `copy` step: what it copies, hashed for the step id, and the copying itself.

A manifest lists, for each source (a path relative to the source directory: the build context,
or the rootfs of an earlier stage), every file with its SHA-256 and executable bit, every symlink
with its target and every directory with its entries sorted by name, leaving out entries whose
basename is in `exclude` (at any depth below a source; a source named explicitly is kept). It
also records where each source lands in the rootfs, so its digest identifies the whole copy.

Both functions do blocking file I/O: call them from a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.obuilder.protocols import BuildError

_CHUNK = 1 << 20
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class File:
    """A regular file: its path relative to the source directory, content hash and `x` bit."""

    path: str
    sha256: str
    executable: bool


@dataclass(frozen=True)
class Symlink:
    """A symbolic link, copied as a link (never followed)."""

    path: str
    target: str


@dataclass(frozen=True)
class Dir:
    """A directory and its entries, sorted by name."""

    path: str
    entries: tuple[Entry, ...]


Entry = File | Symlink | Dir


@dataclass(frozen=True)
class Manifest:
    """What a `copy` step copies from `src_dir`: one entry per source and its destination.

    `targets[i]` is the absolute path inside the rootfs that `sources[i]` becomes.
    """

    src_dir: Path
    sources: tuple[Entry, ...]
    targets: tuple[str, ...]

    def digest(self) -> str:
        """SHA-256 (hex) of the entries and destinations; `src_dir` is not part of it."""
        text = json.dumps([[_plain(e) for e in self.sources], list(self.targets)],
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def write(self, rootfs: Path, uid: int, gid: int) -> None:
        """Copy every entry into `rootfs`, owned by `uid:gid`.

        Files get mode 0755 if executable, else 0644. Directories that do not exist yet are
        created (mode 0755, owned by `uid:gid`); existing ones keep their owner and mode.
        Symlinks already in the rootfs are resolved as if `rootfs` were `/`, so a copy never
        writes outside it; an existing file or symlink at a destination is replaced.
        Raises BuildError when a destination is an existing directory but the entry is not,
        when a directory on the way is a file, or when a file changed since it was hashed
        (so a result always matches its id). On failure the rootfs holds part of the copy:
        the store discards it with the failed step.
        """
        for entry, target in zip(self.sources, self.targets, strict=True):
            self._write(entry, target, rootfs, uid, gid)

    def _write(self, entry: Entry, target: str, rootfs: Path, uid: int, gid: int) -> None:
        if isinstance(entry, Dir):
            _directory(rootfs, target, uid, gid)
            for child in entry.entries:
                name = posixpath.basename(child.path)
                self._write(child, posixpath.join(target, name), rootfs, uid, gid)
            return
        host = _directory(rootfs, posixpath.dirname(target), uid, gid) / posixpath.basename(target)
        if host.is_dir() and not host.is_symlink():
            raise BuildError(f"copy: cannot replace the directory {_q(target)} with a file")
        host.unlink(missing_ok=True)
        if isinstance(entry, Symlink):
            os.symlink(entry.target, host)
        else:
            _copy_file(self.src_dir / entry.path, host, entry)
        os.lchown(host, uid, gid)


def manifest(src_dir: Path, srcs: Sequence[str], dst: str, *, exclude: Sequence[str] = (),
             workdir: str = "/") -> Manifest:
    """The manifest of copying `srcs` (relative to `src_dir`) to `dst`.

    A relative `dst` is joined to `workdir`. A `dst` ending in `/` receives each source under
    its basename; otherwise there must be exactly one source, which becomes `dst`.
    Raises BuildError (quoting the source as written) for a source containing `..`, passing
    through a symlink (a source that *is* a symlink is copied as a link), missing, or holding
    something other than files, symlinks and directories; and for several sources with a `dst`
    not ending in `/`.
    """
    absolute = posixpath.normpath(posixpath.join(workdir, dst))
    if not dst.endswith("/") and len(srcs) != 1:
        raise BuildError(f"copy: {len(srcs)} sources need a destination ending in \"/\", "
                         f"not {_q(dst)}")
    sources = tuple(_generate(src_dir, _checked(src_dir, src), frozenset(exclude))
                    for src in srcs)
    targets = tuple(
        posixpath.normpath(posixpath.join(absolute, posixpath.basename(entry.path)))
        if dst.endswith("/") else absolute
        for entry in sources
    )
    return Manifest(src_dir=src_dir, sources=sources, targets=targets)


def _checked(src_dir: Path, src: str) -> str:
    """`src` as a normalised relative path (`.` for the directory itself), after the rules."""
    parts = [p for p in src.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuildError(f"copy: source {_q(src)} contains \"..\"")
    for depth in range(1, len(parts)):
        prefix = src_dir.joinpath(*parts[:depth])
        if prefix.is_symlink():
            raise BuildError(f"copy: source {_q(src)} passes through the symlink "
                             f"{_q('/'.join(parts[:depth]))}")
    if not os.path.lexists(src_dir.joinpath(*parts)):
        raise BuildError(f"copy: source {_q(src)} not found")
    return "/".join(parts) or "."


def _generate(src_dir: Path, path: str, exclude: frozenset[str]) -> Entry:
    host = src_dir / path
    info = host.lstat()
    if stat.S_ISDIR(info.st_mode):
        names = sorted(n for n in os.listdir(host) if n not in exclude)
        return Dir(path, tuple(_generate(src_dir, _join(path, n), exclude) for n in names))
    if stat.S_ISLNK(info.st_mode):
        return Symlink(path, os.readlink(host))
    if stat.S_ISREG(info.st_mode):
        with open(host, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        return File(path, sha256, bool(info.st_mode & 0o111))
    raise BuildError(f"copy: {_q(path)} is not a file, directory or symlink")


def _join(path: str, name: str) -> str:
    return name if path == "." else f"{path}/{name}"


def _plain(entry: Entry) -> list[object]:
    """A JSON-able form of `entry`, for the digest."""
    if isinstance(entry, File):
        return ["file", entry.path, entry.sha256, entry.executable]
    if isinstance(entry, Symlink):
        return ["symlink", entry.path, entry.target]
    return ["dir", entry.path, [_plain(e) for e in entry.entries]]


def _copy_file(src: Path, dst: Path, entry: File) -> None:
    """Copy `src` to the new file `dst`, checking that it still has the hash in `entry`."""
    digest = hashlib.sha256()
    with open(src, "rb") as reader, open(dst, "xb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BuildError(f"copy: {_q(entry.path)} changed during the build")
    os.chmod(dst, 0o755 if entry.executable else 0o644)


def _directory(rootfs: Path, path: str, uid: int, gid: int) -> Path:
    """The host path of directory `path` of the rootfs, creating what is missing.

    Symlinks are followed as the kernel would inside a chroot at `rootfs` (absolute targets and
    `..` stay inside it). Raises BuildError if a component is neither a directory nor a
    symlink, or if symlinks loop.
    """
    pending = deque(p for p in path.split("/") if p not in ("", "."))
    resolved: list[str] = []
    followed = 0
    while pending:
        part = pending.popleft()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = rootfs.joinpath(*resolved, part)
        if host.is_symlink():
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise BuildError(f"copy: too many levels of symlinks in {_q(path)}")
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if not os.path.lexists(host):
            host.mkdir()
            os.chmod(host, 0o755)
            os.chown(host, uid, gid)
        elif not host.is_dir():
            where = "/" + "/".join([*resolved, part])
            raise BuildError(f"copy: {_q(where)} in the rootfs is not a directory")
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def _q(text: str) -> str:
    """`text` in double quotes, as paths appear in error messages."""
    return json.dumps(text)
