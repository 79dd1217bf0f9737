"""Builds for other architectures: the binfmt_misc check, the interpreter of a handler without
the `F` flag made visible (runc bind mount, chroot copy) and gone afterwards, Debian 13 bases of
amd64, arm64 and riscv64 in the session's shared store with `uname -m` under real qemu, and the
command line's platform errors.

The Debian 13 bases are debootstrapped once per session into `ocaml_store` (shared with the OCaml
CI tests): `uname_builds` builds them all, for every test here that needs one.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from binfmt_handlers import (
    PADDING,
    fake_binfmt_dir,
    handler_text,
    marked,
    new_marker,
    registered_handler,
)
from obuilder_fixtures import RecordingLog
from ocaml_fixtures import HANG_GUARD, PIPELINE

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder, from_id
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.emulation import (
    PACKAGES,
    Emulator,
    describe_platforms,
    find_emulator,
)
from pipeline.obuilder.fetchers.debootstrap import DebootstrapFetcher
from pipeline.obuilder.log_format import MARK
from pipeline.obuilder.platforms import host_platform
from pipeline.obuilder.protocols import BuildError, MissingTool, Mount, SandboxConfig
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.setup import open_sandbox, select_fetcher
from pipeline.obuilder.stores import open_store

ROOT = Path(__file__).resolve().parent.parent
QEMU_X86_64 = "/usr/bin/qemu-x86_64-static"
UNAME_SPEC = '((from debian:13)\n (run (shell "uname -m; cat /etc/debian_version")))\n'
PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/riscv64": "riscv64"}
"""The platforms the suite builds Debian 13 for, and what `uname -m` prints on each."""


def obuilder(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`pipeline obuilder ARGS`, its output captured (bounded: an emulated debootstrap takes
    minutes)."""
    return subprocess.run([str(PIPELINE), "obuilder", *map(str, args)], capture_output=True,
                          text=True, timeout=HANG_GUARD, cwd=ROOT)


@dataclass(frozen=True)
class UnameBuild:
    """`UNAME_SPEC` built for one platform: what the command printed and the final id."""

    output: list[str]
    result: str


@pytest.fixture(scope="session")
def uname_builds(ocaml_store: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, UnameBuild]:
    """`UNAME_SPEC` built with `pipeline obuilder build --platform P` for each of `PLATFORMS`
    in the shared store (each Debian 13 base debootstrapped there once per session); riscv64's
    with `--fast-sync`, whose seccomp filter (of the host's system calls, which qemu makes)
    must not stop the emulator."""
    context = tmp_path_factory.mktemp("uname")
    spec = context / "spec"
    spec.write_text(UNAME_SPEC)
    builds = {}
    for platform in PLATFORMS:
        fast_sync = ["--fast-sync"] if platform == "linux/riscv64" else []
        done = obuilder("build", "-f", spec, context, "--store", ocaml_store,
                        "--platform", platform, *fast_sync)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr
        lines = done.stdout.replace(MARK.decode(), "").splitlines()
        assert lines[-1].startswith('Got: "'), lines[-5:]
        header = lines.index('/: (run (shell "uname -m; cat /etc/debian_version"))')
        builds[platform] = UnameBuild(lines[header + 1:header + 3], lines[-1][6:-1])
    return builds


@pytest.mark.parametrize("platform", PLATFORMS)
def test_debian_13_runs_for_each_platform(uname_builds: dict[str, UnameBuild],
                                          platform: str) -> None:
    machine, version = uname_builds[platform].output
    assert machine == PLATFORMS[platform]
    assert version.startswith("13."), version


def test_step_ids_differ_by_platform(uname_builds: dict[str, UnameBuild]) -> None:
    results = {build.result for build in uname_builds.values()}
    bases = {from_id("debian:13", platform) for platform in PLATFORMS}
    assert len(results) == len(bases) == len(PLATFORMS)
    assert from_id("debian:13") == from_id("debian:13", host_platform())


async def test_a_handler_without_f_gets_its_interpreter_bound_in_each_step(
        uname_builds: dict[str, UnameBuild], ocaml_store: str, tmp_path: Path) -> None:
    """An arm64 build whose binfmt directory says that qemu's handler has no `F` flag binds the
    interpreter into each step: a program that only a real handler without `F` runs (its
    marked header matches nothing else) runs, and the saved result does not hold the
    interpreter. Told that the handler has `F`, the builder binds nothing and the program
    cannot start."""
    interpreter = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"  # Debian's name for it
    marker = new_marker()
    header = bytes.fromhex("7f454c460201010000000000000000000200b700")  # arm64 ELF
    octal = "".join(f"\\{byte:03o}" for byte in marker)
    command = (f"cp /usr/bin/uname /tmp/u && printf '{octal}' | dd of=/tmp/u bs=1 "
               f"seek={PADDING.start} conv=notrunc 2>/dev/null && /tmp/u -m")
    quoted = command.replace("\\", "\\\\")
    spec = S.parse(f'((from debian:13) (run (shell "{quoted}")))')

    async def build(flags: str) -> tuple[RecordingLog, Builder, str]:
        binfmt = fake_binfmt_dir(tmp_path / f"binfmt-{flags}",
                                 {"qemu-aarch64": handler_text(interpreter, flags)})
        store = DbStore(open_store(ocaml_store))
        builder = Builder(store, open_sandbox(store.root), select_fetcher(store.state_dir),
                          platform="linux/arm64", binfmt_dir=binfmt)
        log = RecordingLog()
        try:
            async with asyncio.timeout(HANG_GUARD):
                result = await builder.build(spec, tmp_path, log=log)
        except BaseException:
            builder.close()
            raise
        return log, builder, result

    with registered_handler(marked(header, marker), interpreter):
        with pytest.raises(BuildError, match="command exited with status 127"):
            await build("PF")
        log, builder, id = await build("P")
    try:
        assert "\naarch64\n" in log.text
        result = await builder.store.result(id)
        assert result is not None
        assert (result / "rootfs/tmp/u").is_file()
        assert not (result / "rootfs/usr/libexec/qemu-binfmt").exists()
    finally:
        builder.close()


@pytest.fixture
def rootfs(busybox_rootfs: Path, tmp_path: Path) -> Path:
    """A copy of the busybox rootfs holding `/marked/echo`: busybox with a header of its own
    (`marker` in the file `/marker`)."""
    copy = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, copy, symlinks=True)
    (copy / "marked").mkdir()
    data = bytearray((busybox_rootfs / "bin" / "busybox").read_bytes())
    data[PADDING] = new_marker()
    (copy / "marked" / "echo").write_bytes(bytes(data))
    (copy / "marked" / "echo").chmod(0o755)
    return copy


def entries(rootfs: Path) -> list[str]:
    return sorted(str(path.relative_to(rootfs)) for path in rootfs.rglob("*"))


@pytest.fixture
def interpreter(tmp_path: Path) -> str:
    """qemu-x86_64 behind a symlink in directories no rootfs has: the path a handler names."""
    link = tmp_path / "libexec" / "qemu-binfmt" / "x86_64-binfmt"
    link.parent.mkdir(parents=True)
    link.symlink_to(QEMU_X86_64)
    return str(link)


async def test_runc_binds_a_non_f_interpreter_and_removes_its_mount_point(
        rootfs: Path, interpreter: str, tmp_path: Path) -> None:
    emulator = Emulator("linux/amd64", interpreter, fix_binary=False)
    [mount] = emulator.mounts()
    assert mount == Mount(Path(QEMU_X86_64), interpreter, readonly=True)
    assert Emulator("linux/amd64", interpreter, fix_binary=True).mounts() == []
    sandbox = RuncSandbox(tmp_path / "state")
    config = SandboxConfig(argv=["/bin/sh", "-c", "/marked/echo interpreted"],
                           env={"PATH": "/bin"}, mounts=emulator.mounts())
    spec = sandbox.oci_config(config, rootfs, hosts=tmp_path / "hosts")
    assert spec["mounts"][-1] == {"destination": interpreter, "type": "bind",
                                  "source": QEMU_X86_64,
                                  "options": ["rbind", "rprivate", "nosuid", "nodev", "ro"]}
    before = entries(rootfs)
    header = (rootfs / "marked" / "echo").read_bytes()
    try:
        with registered_handler(header[:20], interpreter):
            log = RecordingLog()
            async with asyncio.timeout(HANG_GUARD):
                await sandbox.run(config, rootfs, log=log)
            assert log.text == "interpreted\n"
            with pytest.raises(BuildError, match="status 127"):
                await sandbox.run(SandboxConfig(argv=config.argv, env=config.env), rootfs,
                                  log=RecordingLog())
    finally:
        sandbox.close()
    assert entries(rootfs) == before


def test_a_chroot_gets_a_copy_of_a_non_f_interpreter_while_it_runs(
        rootfs: Path, interpreter: str) -> None:
    header = (rootfs / "marked" / "echo").read_bytes()
    before = entries(rootfs)
    chroot = ["chroot", str(rootfs), "/marked/echo", "copied"]
    with registered_handler(header[:20], interpreter):
        with Emulator("linux/amd64", interpreter, fix_binary=False).visible_in(rootfs):
            done = subprocess.run(chroot, capture_output=True, text=True, timeout=60)
            assert (done.returncode, done.stdout) == (0, "copied\n"), done.stderr
        assert entries(rootfs) == before
        with Emulator("linux/amd64", interpreter, fix_binary=True).visible_in(rootfs):
            done = subprocess.run(chroot, capture_output=True, text=True, timeout=60)
            assert done.returncode != 0
    assert entries(rootfs) == before


def test_the_hosts_handlers_are_found() -> None:
    emulator = find_emulator("linux/arm64")
    assert emulator.interpreter.startswith("/")
    lines = describe_platforms()
    assert f"{host_platform()}: native" in lines
    assert any(line.startswith("linux/riscv64: emulated by ") for line in lines), lines


@pytest.mark.parametrize(("layout", "problem"), [
    ({}, "binfmt_misc is not mounted at"),
    ({"status": "disabled"}, "binfmt_misc is disabled"),
    ({"handlers": {}}, "no qemu handler"),
    ({"handlers": {"qemu-aarch64": handler_text(QEMU_X86_64, "PF", enabled=False)}},
     "is disabled"),
    ({"handlers": {"qemu-aarch64": handler_text("/nonexistent/qemu", "PF")}},
     "the interpreter /nonexistent/qemu of"),
])
def test_a_missing_handler_names_the_packages_and_what_to_run(
        tmp_path: Path, layout: dict, problem: str) -> None:
    binfmt = tmp_path / "binfmt"
    if layout:
        fake_binfmt_dir(binfmt, layout.get("handlers", {}),
                        status=layout.get("status", "enabled"))
    with pytest.raises(MissingTool) as error:
        find_emulator("aarch64", binfmt)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot run linux/arm64 programs on this ")
    assert problem in message
    assert f"apt-get install {PACKAGES}" in message
    assert "update-binfmts --enable qemu-aarch64" in message
    assert ("mount -t binfmt_misc" in message) == (not layout)
    assert any(line.startswith("linux/arm64: unavailable: cannot run")
               for line in describe_platforms(binfmt))


async def test_an_emulated_build_checks_its_handler_before_its_first_step(
        busybox_images: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = DbStore(open_store(f"rsync:{store_dir}"))
    builder = Builder(store, open_sandbox(store.root),
                      select_fetcher(store.state_dir, image_dir=str(busybox_images)),
                      platform="linux/s390x", binfmt_dir=fake_binfmt_dir(tmp_path / "b", {}))
    log = RecordingLog()
    try:
        with pytest.raises(MissingTool, match=r"no qemu handler .*qemu-s390x"):
            await builder.build(S.parse("((from busybox))"), tmp_path, log=log)
        with pytest.raises(MissingTool, match=PACKAGES):
            await builder.fetch_base("busybox", log=log)
        assert log.text == ""
        assert await store.results() == []
    finally:
        builder.close()


async def test_an_architecture_the_suite_lacks_is_refused(tmp_path: Path) -> None:
    fetcher = DebootstrapFetcher(platform="riscv64")
    log = RecordingLog()
    with pytest.raises(BuildError) as error:
        await fetcher.fetch("debian:12", tmp_path, log=log)
    assert str(error.value).startswith(
        "debootstrap fetcher: cannot make debian:12 for linux/riscv64: the mirror ")
    assert "has no riscv64 packages for bookworm (it has " in str(error.value)
    assert log.text == "" and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["build", "pull"])
def test_an_unknown_platform_is_a_usage_error(command: str, tmp_path: Path) -> None:
    args = ["-f", tmp_path / "spec", tmp_path] if command == "build" else ["debian:13"]
    done = obuilder(command, *args, "--store", f"rsync:{tmp_path}", "--platform", "linux/mips")
    assert done.returncode == 2
    assert done.stderr == (f"pipeline obuilder {command}: --platform: unknown platform "
                           f"'linux/mips': expected one of linux/amd64, linux/arm64, "
                           f"linux/ppc64le, linux/s390x, linux/riscv64\n")
    assert done.stdout == ""


def test_healthcheck_says_which_platforms_build_here(tmp_path: Path) -> None:
    done = obuilder("healthcheck", "--store", f"rsync:{tmp_path}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"platform {host_platform()}: native" in lines
    assert any(line.startswith("platform linux/s390x: emulated by") for line in lines), lines

