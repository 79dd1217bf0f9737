"""The platforms table: every name of an architecture is understood, anything else refused."""

import pytest

from pipeline.obuilder.platforms import (
    ARCHITECTURES,
    architecture,
    host_platform,
    is_emulated,
    parse_platform,
)
from pipeline.obuilder.protocols import BuildError


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/arm64", "linux/arm64"), ("arm64", "linux/arm64"), ("aarch64", "linux/arm64"),
    ("linux/arm64/v8", "linux/arm64"), ("ppc64el", "linux/ppc64le"),
    ("linux/ppc64le", "linux/ppc64le"), ("x86_64", "linux/amd64"), ("s390x", "linux/s390x"),
    ("linux/riscv64", "linux/riscv64"),
])
def test_every_name_of_an_architecture_is_understood(text: str, expected: str) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize("text", ["windows/amd64", "linux/mips", "", "/arm64", "linux/"])
def test_other_platforms_are_refused_naming_the_accepted_ones(text: str) -> None:
    with pytest.raises(BuildError) as error:
        parse_platform(text)
    assert f"unknown platform {text!r}" in str(error.value)
    assert "linux/riscv64" in str(error.value)


def test_the_names_of_one_architecture_agree() -> None:
    arm = architecture("linux/arm64")
    assert (arm.debian, arm.machine, arm.qemu, arm.pool) == ("arm64", "aarch64", "aarch64",
                                                             "linux-arm64")
    assert architecture("ppc64el").debian == "ppc64el"
    assert {a.platform for a in ARCHITECTURES.values()} == {
        "linux/amd64", "linux/arm64", "linux/ppc64le", "linux/s390x", "linux/riscv64"}


def test_only_the_hosts_platform_is_native() -> None:
    assert not is_emulated(host_platform())
    assert sum(is_emulated(a.platform) for a in ARCHITECTURES.values()) == 4
