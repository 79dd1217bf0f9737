"""The platforms a build can target: Linux on five architectures, named as OCI images name them.

A platform is written `linux/ARCH` (`linux/arm64`), as `--platform` takes it and as an image
index lists it. Each architecture has other names too: Debian's (`ppc64el`), the kernel's
(`uname -m`: `aarch64`), qemu's (`qemu-aarch64`, the name of its binfmt_misc handler) and the
build cluster's pool (`linux-arm64`); `ARCHITECTURES` keeps them together. A platform other
than the host's runs under emulation (qemu-user through binfmt_misc).
"""

from __future__ import annotations

import platform as host
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.obuilder.protocols import BuildError


@dataclass(frozen=True)
class Architecture:
    """One architecture's names: `oci` (in `linux/ARCH`), `debian` (dpkg's), `machine` (what
    `uname -m` prints), `qemu` (qemu-user's, as in `qemu-aarch64`) and `pool` (the cluster's
    pool of its workers)."""

    oci: str
    debian: str
    machine: str
    qemu: str
    pool: str

    @property
    def platform(self) -> str:
        """`linux/ARCH`."""
        return f"linux/{self.oci}"


ARCHITECTURES: Mapping[str, Architecture] = {
    a.oci: a
    for a in (
        Architecture("amd64", "amd64", "x86_64", "x86_64", "linux-x86_64"),
        Architecture("arm64", "arm64", "aarch64", "aarch64", "linux-arm64"),
        Architecture("ppc64le", "ppc64el", "ppc64le", "ppc64le", "linux-ppc64le"),
        Architecture("s390x", "s390x", "s390x", "s390x", "linux-s390x"),
        Architecture("riscv64", "riscv64", "riscv64", "riscv64", "linux-riscv64"),
    )
}
"""The supported architectures, by OCI name, the host's (amd64) first."""

# Every other name of an architecture, so that `--platform aarch64` or `ppc64el` is understood.
_ALIASES = {
    name: a.oci
    for a in ARCHITECTURES.values()
    for name in (a.oci, a.debian, a.machine, a.qemu)
} | {"arm64/v8": "arm64"}


def platform_help() -> str:
    """The accepted platforms, for messages and help: `linux/amd64, linux/arm64, ...`."""
    return ", ".join(a.platform for a in ARCHITECTURES.values())


def parse_platform(text: str) -> str:
    """The canonical `linux/ARCH` of `text`: `linux/ARCH` or `ARCH`, ARCH any of an
    architecture's names (`aarch64`, `ppc64el`, `arm64/v8`).

    Raises BuildError, naming the accepted platforms, for another operating system or an
    unknown architecture.
    """
    os_name, sep, arch = text.partition("/")
    if not sep or os_name not in ("linux", ""):
        os_name, arch = "linux", text
    oci = _ALIASES.get(arch)
    if oci is None or (sep and os_name != "linux"):
        raise BuildError(f"unknown platform {text!r}: expected one of {platform_help()}")
    return ARCHITECTURES[oci].platform


def architecture(platform: str) -> Architecture:
    """The architecture of `platform` (any form `parse_platform` accepts); BuildError as
    `parse_platform` raises."""
    return ARCHITECTURES[parse_platform(platform).removeprefix("linux/")]


def host_platform() -> str:
    """This machine's platform, `linux/ARCH`. Raises BuildError on an architecture that
    `ARCHITECTURES` lacks."""
    return parse_platform(host.machine())


def is_emulated(platform: str) -> bool:
    """Whether builds for `platform` run under emulation here (it is not the host's)."""
    return parse_platform(platform) != host_platform()
