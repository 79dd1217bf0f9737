"""A fetcher reading rootfs tarballs from a local directory (tests and air-gapped sites).

Image `NAME` is `DIR/NAME.tar` or `DIR/NAME.tar.gz`, with `/` and `:` in the name replaced by `_`
(so `debian:12` is `debian_12.tar`). Its environment is read from `DIR/NAME.env` (`KEY=VALUE`
lines) when that file exists, and is otherwise a default `PATH`.
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from pathlib import Path

from pipeline.obuilder.fetchers.unpack import extract
from pipeline.obuilder.protocols import BuildError, ImageInfo, Log

DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


class LocalFetcher:
    """Unpacks images from `image_dir`; implements the `Fetcher` protocol."""

    def __init__(self, image_dir: Path) -> None:
        """Serve images from `image_dir`; nothing is read until `fetch`."""
        self.image_dir = image_dir

    def candidates(self, image: str) -> tuple[Path, Path]:
        """The tarballs that may hold `image`, in the order they are looked for."""
        stem = image.replace("/", "_").replace(":", "_")
        return self.image_dir / f"{stem}.tar", self.image_dir / f"{stem}.tar.gz"

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """Extract `image` into the empty directory `rootfs` and return its environment.

        Ownership (numeric ids), modes, symlinks, hard links and device nodes are preserved.
        Raises BuildError naming the image and the files looked for when neither exists, naming
        the member when the tarball holds a path escaping `rootfs` (`..`, or through a symlink)
        or one that cannot be extracted, naming the tarball when it is damaged or not a tarball,
        and naming the file and line when the `.env` file has a line without `=`. On failure
        `rootfs` may hold part of the image: the store discards it with the failed step.
        """
        tarball = next((p for p in self.candidates(image) if p.is_file()), None)
        if tarball is None:
            looked = " or ".join(str(p) for p in self.candidates(image))
            raise BuildError(f"unknown image {image!r}: no {looked}")
        digest = await asyncio.to_thread(_extract, tarball, rootfs)
        log.write(f"unpacked {tarball.name} (sha256:{digest})\n".encode())
        env_file = tarball.parent / f"{tarball.name.split('.tar')[0]}.env"
        env = _read_env(env_file) if env_file.is_file() else dict(DEFAULT_ENV)
        return ImageInfo(env=env, digest=f"sha256:{digest}")


def _read_env(path: Path) -> dict[str, str]:
    """Parse `KEY=VALUE` lines, ignoring blank lines and `#` comments."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise BuildError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        env[key] = value
    return env


def _extract(tarball: Path, rootfs: Path) -> str:
    """Extract `tarball` into `rootfs` and return the tarball's SHA-256 (hex)."""
    with open(tarball, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        with tarfile.open(tarball) as tar:
            extract(tar, rootfs)
    except (OSError, EOFError, tarfile.TarError) as e:
        # tarfile.open lists every compression it tried, one a line, when none fits.
        reason = "not a tar file" if "\n" in str(e) else str(e)
        raise BuildError(f"{tarball} cannot be unpacked ({reason})") from None
    return digest
