"""A fetcher making `debian:SUITE` images with `debootstrap --variant=minbase`, from the Debian
mirror the host's apt is configured with (no registry, no Docker daemon).

Image names: `debian:SUITE` for any suite debootstrap has a script for (`bookworm`, `trixie`,
`sid`, `stable`, ...), `debian:N` for a release number (`debian:12` is bookworm, `debian:13`
trixie), and `debian` or `debian:latest` for the mirror's current `stable` (as on Docker Hub,
where `latest` is the current stable release). A `-slim` suffix (`debian:12-slim`) is accepted
and ignored: minbase is already smaller than Docker's slim images. The `library/` and
`docker.io/library/` prefixes are accepted too. Point releases (`debian:12.5`) and digests are
refused: debootstrap cannot reproduce them.

The image is of the fetcher's platform (`linux/ARCH`, by default the host's). The host's own
architecture is debootstrapped in one go; another one (`debian:13` for `linux/riscv64`, say) in
two stages: `debootstrap --arch ARCH --foreign` downloads and unpacks the packages with the
host's tools, then `chroot ROOTFS /debootstrap/debootstrap --second-stage` configures them,
running the image's own programs under emulation (`emulation.py`; qemu's binfmt_misc handler is
checked first). An architecture the mirror's Release file does not list for the suite (riscv64
is in trixie, not in bookworm) is refused before anything is downloaded.

The image is whatever the mirror serves now; the builder stores it as the `from` step's result,
so it is made once per store (`pipeline obuilder pull` makes it again). Its digest is the
SHA-256 of the suite's Release file debootstrap verified, which identifies the archive's state.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.obuilder.emulation import BINFMT_DIR, find_emulator
from pipeline.obuilder.platforms import architecture, host_platform, is_emulated, parse_platform
from pipeline.obuilder.protocols import BuildError, ImageInfo, Log, MissingTool

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Debian's default PATH: the image's environment, and debootstrap's (which runs `chroot`,
`mount` and friends from the sbin directories a user's PATH may lack)."""

SCRIPTS = Path("/usr/share/debootstrap/scripts")
"""debootstrap's per-suite scripts: a suite is known if it has one."""

APT_DIR = Path("/etc/apt")

RELEASE_TIMEOUT = 60
"""Seconds the suite's Release file may take to download, for the architecture check."""

RELEASES = {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
"""Release numbers to code names, for `debian:N`."""

_NAMES = ("debian", "library/debian", "docker.io/library/debian")
_SUITE = re.compile(r"[a-z][a-z0-9-]*")
# The suites of a Debian archive itself (not security or updates): a source listing one of
# these is taken as the host's Debian mirror.
_ARCHIVE_SUITES = {"stable", "testing", "unstable", "oldstable", "sid", *RELEASES.values()}


def suite_of(image: str) -> str:
    """The debootstrap suite of `image` (`debian:12-slim` -> `bookworm`).

    Raises BuildError, naming the image, for an image that is not Debian's or a tag naming no
    suite (`debian:12.5`, a digest). Whether debootstrap knows the suite is checked by `fetch`.
    """
    name, _, tag = image.partition(":")
    if name not in _NAMES or "@" in image:
        raise BuildError(f"debootstrap fetcher: cannot make {image} (only debian:SUITE)")
    tag = tag or "latest"
    tag = tag.removesuffix("-slim")
    if tag == "latest":
        return "stable"
    suite = RELEASES.get(tag, tag)
    if not _SUITE.fullmatch(suite):
        raise BuildError(f"debootstrap fetcher: cannot make {image}: {tag!r} is not a Debian "
                         f"suite or release number ({', '.join(sorted(RELEASES))})")
    return suite


def find_mirror(apt_dir: Path = APT_DIR) -> str:
    """The URI of the first Debian archive in the host's apt sources under `apt_dir`.

    Looks in `sources.list.d/*.sources` (deb822, sorted by name), then `sources.list.d/*.list`
    and `sources.list` (one-line format), for a `deb` source whose suites include a Debian
    archive suite (`bookworm`, `stable`, ...; not `bookworm-security` or `-updates`). Raises
    BuildError naming `apt_dir` when there is none.
    """
    for uri, suites in _sources(apt_dir):
        if any(s in _ARCHIVE_SUITES for s in suites):
            return uri
    raise BuildError(f"no Debian mirror found in the apt sources under {apt_dir} "
                     f"(give the debootstrap fetcher a mirror)")


def _sources(apt_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` source, deb822 files first."""
    parts = apt_dir / "sources.list.d"
    for path in sorted(parts.glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", _read(path)):
            fields = _deb822(stanza)
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" in fields.get("types", "").split():
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    yield uri, suites
    for path in [*sorted(parts.glob("*.list")), apt_dir / "sources.list"]:
        for line in _read(path).splitlines():
            # `deb [option=value ...] URI SUITE COMPONENT...`
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], [words[2]]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _deb822(stanza: str) -> dict[str, str]:
    """The fields of one deb822 stanza, names lower-cased; continuation lines joined."""
    fields: dict[str, str] = {}
    name = None
    for line in stanza.splitlines():
        if line.startswith("#"):
            continue
        if line[:1].isspace() and name is not None:
            fields[name] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            name = key.strip().lower()
            fields[name] = value.strip()
    return fields


class DebootstrapFetcher:
    """Makes `debian:SUITE` images with debootstrap; implements the `Fetcher` protocol."""

    def __init__(self, *, mirror: str | None = None, apt_dir: Path = APT_DIR,
                 platform: str | None = None, binfmt_dir: Path = BINFMT_DIR) -> None:
        """Use `mirror`, or else the first Debian mirror of the apt sources under `apt_dir`
        (read at the first `fetch`, so that making a fetcher never fails). Images are of
        `platform` (any form `platforms.parse_platform` takes; None: the host's), another
        one than the host's emulated through the handlers under `binfmt_dir`. Raises
        BuildError for an unknown platform."""
        self.mirror = mirror
        self.apt_dir = apt_dir
        self.platform = parse_platform(platform or host_platform())
        self.binfmt_dir = binfmt_dir

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """Run `debootstrap --variant=minbase SUITE ROOTFS MIRROR` (for another architecture,
        with `--arch ARCH --foreign`, then its second stage under emulation), its output going
        to `log`.

        Raises BuildError for an image that is not `debian:SUITE`, a suite debootstrap does not
        know, an architecture the mirror lacks for the suite, no mirror in the apt sources, or
        debootstrap failing (naming its exit status and its last `E:` line; the rest is in
        the log); MissingTool if debootstrap is not installed, or qemu's handler for an
        emulated platform is missing (see `emulation.find_emulator`). Cancelling the calling
        task kills debootstrap and everything it started. On failure or cancellation the file
        systems debootstrap mounted inside `rootfs` are unmounted, so the store can discard
        it.
        """
        suite = suite_of(image)
        if shutil.which("debootstrap", path=DEFAULT_PATH) is None:
            raise MissingTool("debootstrap not found: apt-get install debootstrap")
        if not (SCRIPTS / suite).is_file():
            raise BuildError(f"debootstrap fetcher: cannot make {image}: debootstrap knows no "
                             f"suite {suite!r} (no {SCRIPTS / suite})")
        emulator = (find_emulator(self.platform, self.binfmt_dir)
                    if is_emulated(self.platform) else None)
        mirror = self.mirror or find_mirror(self.apt_dir)
        arch = architecture(self.platform).debian
        offered = await asyncio.to_thread(_architectures, mirror, suite)
        if offered is not None and arch not in offered:
            raise BuildError(f"debootstrap fetcher: cannot make {image} for {self.platform}: "
                             f"the mirror {mirror} has no {arch} packages for {suite} "
                             f"(it has {', '.join(sorted(offered)) or 'none'})")
        try:
            if emulator is None:
                log.write(f"debootstrap --variant=minbase {suite} from {mirror}\n".encode())
                await _run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror],
                           log, "debootstrap")
            else:
                log.write(f"debootstrap --variant=minbase --arch {arch} --foreign {suite} "
                          f"from {mirror}\n".encode())
                await _run(["debootstrap", "--variant=minbase", f"--arch={arch}", "--foreign",
                            suite, str(rootfs), mirror], log, "debootstrap")
                log.write(f"debootstrap --second-stage under {emulator.interpreter}\n".encode())
                with emulator.visible_in(rootfs):
                    await _run(["chroot", str(rootfs), "/debootstrap/debootstrap",
                                "--second-stage"], log, "debootstrap's second stage")
        except BaseException:
            await asyncio.to_thread(_unmount_under, rootfs)
            raise
        # The downloaded packages are not part of the image (Docker's Debian images have none
        # either) and would be copied with every step built on it.
        for deb in (rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()
        digest = await asyncio.to_thread(_release_digest, rootfs, suite)
        return ImageInfo(env={"PATH": DEFAULT_PATH}, digest=digest)


def _architectures(mirror: str, suite: str) -> set[str] | None:
    """The architectures the `Architectures` field of the suite's Release file on `mirror`
    lists, or None if it cannot be read (debootstrap then says what is wrong)."""
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=RELEASE_TIMEOUT) as response:
            text = response.read(4 << 20).decode(errors="replace")
    except (OSError, ValueError):
        return None
    fields = _deb822(text.split("\n\n", 1)[0])
    if "architectures" not in fields:
        return None
    return set(fields["architectures"].split())


async def _run(argv: list[str], log: Log, name: str) -> None:
    """Run `argv` with Debian's PATH, streaming its output to `log`; BuildError naming it
    `name` if it fails, with debootstrap's last error line (`E: ...`) if it printed one.

    It runs in its own session so that a cancellation kills the chroot'ed children too.
    """
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={"PATH": DEFAULT_PATH}, start_new_session=True)
    assert process.stdout is not None
    tail = b""
    try:
        while chunk := await process.stdout.read(65536):
            log.write(chunk)
            tail = (tail + chunk)[-_TAIL:]
        status = await process.wait()
    except BaseException:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        raise
    if status != 0:
        raise BuildError(f"{name} exited with status {status}: {_last_error(tail)}")


_TAIL = 4096
"""How much of debootstrap's output is kept for finding its last error line."""
_ERROR_LENGTH = 300


def _last_error(tail: bytes) -> str:
    """debootstrap's last `E: ` line in `tail` (its output's end), shown safely on one line
    and shortened; or a pointer to the log if there is none."""
    errors = [line for line in tail.decode(errors="replace").splitlines()
              if line.startswith("E: ")]
    if not errors:
        return "see the log above"
    # The line names packages and URLs from the mirror: nothing in it may drive a terminal.
    text = "".join(ch if ch.isprintable() else "?" for ch in errors[-1][3:])
    return text if len(text) <= _ERROR_LENGTH else text[:_ERROR_LENGTH] + "..."


def _unmount_under(rootfs: Path) -> None:
    """Unmount every file system mounted at or below `rootfs`, deepest first.

    debootstrap mounts /proc and /sys in the target and unmounts them only when it exits
    normally; a killed debootstrap leaves them, and the store could not remove the directory.
    """
    for point in sorted(_mount_points_under(rootfs), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], env={"PATH": DEFAULT_PATH}, check=False,
                       capture_output=True)


def _mount_points_under(rootfs: Path) -> Iterable[str]:
    prefix = str(rootfs.resolve())
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            # Field 5 is the mount point, with spaces and the like escaped in octal.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                yield point


def _release_digest(rootfs: Path, suite: str) -> str | None:
    """`sha256:` of the suite's Release file that debootstrap verified and left in the apt
    lists, or None if it left none."""
    lists = rootfs / "var" / "lib" / "apt" / "lists"
    for name in ("InRelease", "Release"):
        for path in sorted(lists.glob(f"*_dists_{suite}_{name}")):
            with open(path, "rb") as f:
                return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return None
