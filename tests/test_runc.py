"""The runc sandbox, with the real runc over a copy of the busybox rootfs."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from obuilder_fixtures import HANG_GUARD, RecordingLog

from pipeline.obuilder.protocols import (
    BuildError,
    MissingTool,
    Mount,
    Sandbox,
    SandboxConfig,
    Secret,
)
from pipeline.obuilder.sandboxes.runc import SYNC_SYSCALLS, RuncSandbox

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}



def sh(command: str, **fields: object) -> SandboxConfig:
    return SandboxConfig(argv=["/bin/sh", "-c", command], env=ENV, **fields)  # type: ignore[arg-type]


@pytest.fixture
def rootfs(busybox_rootfs: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, copy, symlinks=True)
    return copy


@pytest.fixture
def sandbox(tmp_path: Path) -> RuncSandbox:
    return RuncSandbox(tmp_path / "state")


async def run(sandbox: RuncSandbox, config: SandboxConfig, rootfs: Path, **options: object) -> str:
    log = RecordingLog()
    async with asyncio.timeout(HANG_GUARD):
        await sandbox.run(config, rootfs, log=log, **options)  # type: ignore[arg-type]
    return log.text


def containers(sandbox: RuncSandbox) -> list[str]:
    listing = subprocess.run(["runc", "--root", str(sandbox.state_dir / "runc"), "list", "-q"],
                             check=True, capture_output=True, text=True)
    return listing.stdout.split()


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def assert_clean(sandbox: RuncSandbox) -> None:
    """No container, no bundle: only runc's (empty) state directory and the owner tokens are
    left."""
    assert containers(sandbox) == []
    assert sorted(p.name for p in sandbox.state_dir.iterdir()) == ["owner", "runc"]


def test_implements_the_protocol(sandbox: RuncSandbox) -> None:
    assert isinstance(sandbox, Sandbox)


async def test_output_reaches_the_log_as_it_is_written(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    log = RecordingLog()
    config = sh("echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2")
    running = asyncio.create_task(sandbox.run(config, rootfs, log=log))
    await log.wait_for("first\n")
    assert "second" not in log.text
    (rootfs / "tmp" / "go").touch()
    async with asyncio.timeout(HANG_GUARD):
        await running
    assert log.text == "first\nsecond\n"
    assert_clean(sandbox)


async def test_a_failing_command_raises_with_its_status(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    log = RecordingLog()
    with pytest.raises(BuildError, match=r"^command exited with status 3$"):
        await sandbox.run(sh("echo before failing; exit 3"), rootfs, log=log)
    assert log.text == "before failing\n"
    assert_clean(sandbox)


async def test_a_missing_program_is_reported_by_runc(sandbox: RuncSandbox, rootfs: Path) -> None:
    with pytest.raises(BuildError, match=r"/no/such/program.*no such file or directory"):
        await run(sandbox, SandboxConfig(argv=["/no/such/program"], env=ENV), rootfs)
    assert_clean(sandbox)


async def test_cwd_user_and_environment_are_honoured(sandbox: RuncSandbox, rootfs: Path) -> None:
    config = SandboxConfig(argv=["/bin/sh", "-c", 'echo "$(id -u) $(id -g) $(pwd) $GREETING"'],
                           cwd="/home/opam", uid=1000, gid=1000,
                           env={"PATH": ENV["PATH"], "GREETING": "hello world"})
    assert await run(sandbox, config, rootfs) == "1000 1000 /home/opam hello world\n"


async def test_root_has_the_builder_capabilities_and_other_users_none(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    # What package managers do as root: change owners, make device nodes.
    await run(sandbox, sh("touch /tmp/f && chown 1000:1000 /tmp/f && mknod /tmp/null c 1 3"),
              rootfs)
    assert (rootfs / "tmp" / "f").stat().st_uid == 1000
    with pytest.raises(BuildError):
        await run(sandbox, sh("touch /etc/by-opam", uid=1000, gid=1000), rootfs)
    assert not (rootfs / "etc" / "by-opam").exists()


async def test_hostname_is_builder_and_resolves_locally(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    output = await run(sandbox, sh("hostname; cat /etc/hosts"), rootfs)
    assert output == "builder\n127.0.0.1 localhost builder\n"
    # /etc/hosts was bound over a mount point made for the run, not written into the rootfs.
    assert not (rootfs / "etc" / "hosts").exists()


async def test_an_existing_etc_hosts_is_covered_not_changed(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    (rootfs / "etc" / "hosts").write_text("10.0.0.1 image\n")
    assert await run(sandbox, sh("cat /etc/hosts"), rootfs) == "127.0.0.1 localhost builder\n"
    assert (rootfs / "etc" / "hosts").read_text() == "10.0.0.1 image\n"


async def connect_from_inside(sandbox: RuncSandbox, rootfs: Path, network: bool) -> str:
    """Run nc inside against a server on the host's loopback; what the sandbox saw."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from the host\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        command = (f"if nc -w 2 127.0.0.1 {port} </dev/null 2>/dev/null; then echo reached; "
                   "else echo unreachable; fi; cat /proc/net/dev")
        return await run(sandbox, sh(command, network=network), rootfs)
    finally:
        server.close()
        await server.wait_closed()


async def test_no_network_without_network_host(sandbox: RuncSandbox, rootfs: Path) -> None:
    output = await connect_from_inside(sandbox, rootfs, network=False)
    assert "hello from the host" not in output
    assert "unreachable" in output
    interfaces = [line.split(":")[0].strip() for line in output.splitlines() if ":" in line]
    assert interfaces == ["lo"]


async def test_network_host_reaches_the_host(sandbox: RuncSandbox, rootfs: Path) -> None:
    output = await connect_from_inside(sandbox, rootfs, network=True)
    assert "hello from the host\nreached\n" in output


async def test_resolv_conf_only_with_network_and_never_left_behind(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    host = Path("/etc/resolv.conf").read_text()
    output = await run(sandbox, sh("cat /etc/resolv.conf", network=True), rootfs)
    assert output == host
    with pytest.raises(BuildError):
        await run(sandbox, sh("cat /etc/resolv.conf"), rootfs)
    assert not (rootfs / "etc" / "resolv.conf").exists()


async def test_host_files_are_invisible(
        sandbox: RuncSandbox, rootfs: Path, tmp_path: Path) -> None:
    host_file = tmp_path / "host-only"
    host_file.write_text("host data\n")
    output = await run(sandbox, sh(f"if [ -e {host_file} ]; then echo visible; "
                                   "else echo invisible; fi; ls /tmp"), rootfs)
    assert output == "invisible\n"


async def test_a_readonly_mount_is_readonly_and_its_mount_point_is_removed(
        sandbox: RuncSandbox, rootfs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    # The failed write's complaint goes nowhere: runc copies stdout and stderr separately, so it
    # could land in the middle of the secret's line.
    config = sh("cat /run/secrets/token; "
                "if { echo x >/run/secrets/token; } 2>/dev/null; then echo writable; fi",
                mounts=[Mount(secret, "/run/secrets/token", readonly=True)])
    output = await run(sandbox, config, rootfs)
    assert output == "s3cret\n"
    assert "writable" not in output
    assert secret.read_text() == "s3cret\n"
    # /run did not exist: all of /run/secrets/token was made for the run and is gone again.
    assert not (rootfs / "run").exists()


async def test_a_writable_mount_keeps_what_the_command_writes(
        sandbox: RuncSandbox, rootfs: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 1000, 1000)
    config = sh("echo built >/home/opam/.cache/result", uid=1000, gid=1000,
                mounts=[Mount(cache, "/home/opam/.cache")])
    await run(sandbox, config, rootfs)
    assert (cache / "result").read_text() == "built\n"
    assert sorted(p.name for p in (rootfs / "home" / "opam").iterdir()) == []


async def test_mount_points_follow_symlinks_only_inside_the_rootfs(
        sandbox: RuncSandbox, rootfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    # An absolute link in the rootfs means a path in the rootfs, not on the host.
    (rootfs / "data").symlink_to(outside)
    secret = tmp_path / "secret"
    secret.write_text("value\n")
    config = sh("cat /data/token", mounts=[Mount(secret, "/data/token", readonly=True)])
    assert await run(sandbox, config, rootfs) == "value\n"
    assert not outside.exists()
    assert not (rootfs / outside.relative_to("/")).exists()
    assert (rootfs / "data").is_symlink()


async def test_mount_points_the_command_moved_or_replaced_are_its_output(
        sandbox: RuncSandbox, rootfs: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "y").write_text("precious\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    # The parent of the mount point, made for the run, is moved away and replaced by a link to
    # the host: removing /x/y by its host path would follow it.
    config = sh(f"mv /x /z && ln -s {victim} /x", mounts=[Mount(cache, "/x/y")])
    await run(sandbox, config, rootfs)
    assert sorted(p.name for p in victim.iterdir()) == ["y"]
    assert (victim / "y").read_text() == "precious\n"
    assert os.readlink(rootfs / "x") == str(victim)
    assert (rootfs / "z" / "y").is_dir()


async def test_secrets_are_files_of_the_user_that_exist_only_in_the_container(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    config = sh("stat -c '%a %u:%g' /run/token; cat /run/token; ls /run; ls -a /proc/self/fd",
                uid=1000, gid=1000, secrets=[Secret(b"s3cret\n", "/run/token")])
    output = await run(sandbox, config, rootfs)
    # Only the command's standard descriptors: the secrets' memory files are not passed on.
    assert output == "400 1000:1000\ns3cret\ntoken\n.\n..\n0\n1\n2\n3\n"
    assert not (rootfs / "run").exists()
    assert_clean(sandbox)


async def test_stdin_is_fed_to_the_command(sandbox: RuncSandbox, rootfs: Path) -> None:
    assert await run(sandbox, sh("tr a-z A-Z"), rootfs, stdin=b"some input\n") == "SOME INPUT\n"
    # Without stdin the command reads an empty /dev/null rather than hanging.
    assert await run(sandbox, sh("cat; echo done"), rootfs) == "done\n"


async def test_stdin_the_command_ignores_is_not_an_error(
        sandbox: RuncSandbox, rootfs: Path) -> None:
    await run(sandbox, sh("true"), rootfs, stdin=b"x" * (4 * 1024 * 1024))


@pytest.fixture
def sleeper() -> str:
    """A `sleep` command line no other test (nor a parallel run) uses."""
    return f"sleep {random.randrange(10**8, 10**9)}"


def sleeping(sleeper: str) -> list[int]:
    return processes_mentioning(sleeper.replace(" ", "\0"))


@pytest.mark.parametrize("how", ["event", "task"])
async def test_cancelling_kills_every_process(
        sandbox: RuncSandbox, rootfs: Path, sleeper: str, how: str) -> None:
    log = RecordingLog()
    cancelled = asyncio.Event()
    config = sh(f"{sleeper} & {sleeper} & echo started; wait")
    running = asyncio.create_task(sandbox.run(config, rootfs, log=log, cancelled=cancelled))
    await log.wait_for("started")
    async with asyncio.timeout(HANG_GUARD):
        # The shell has forked both, but each may not have exec'd sleep yet.
        while len(sleeping(sleeper)) < 2:
            await asyncio.sleep(0.01)
    if how == "event":
        cancelled.set()
    else:
        running.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(HANG_GUARD):
            await running
    assert sleeping(sleeper) == []
    assert_clean(sandbox)


async def test_cancelling_before_the_container_starts(
        sandbox: RuncSandbox, rootfs: Path, sleeper: str) -> None:
    cancelled = asyncio.Event()
    cancelled.set()
    with pytest.raises(asyncio.CancelledError):
        await run(sandbox, sh(sleeper), rootfs, cancelled=cancelled)
    assert sleeping(sleeper) == []
    assert_clean(sandbox)


async def test_memory_limit_is_applied(rootfs: Path, tmp_path: Path) -> None:
    sandbox = RuncSandbox(tmp_path / "state", memory=32 * 2**20, cpus=0.5)
    output = await run(sandbox, sh("cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
                                   "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), rootfs)
    assert output == f"{32 * 2**20}\n50000\n"
    # A command growing past the limit is killed by the kernel.
    with pytest.raises(BuildError, match=r"^command killed by SIGKILL \(exit status 137\)$"):
        await run(sandbox, sh("""exec awk 'BEGIN { s = "x"; while (1) s = s s }'"""), rootfs)
    assert_clean(sandbox)


async def test_fast_sync_silences_sync_calls(rootfs: Path, tmp_path: Path) -> None:
    sandbox = RuncSandbox(tmp_path / "state", fast_sync=True)
    spec = sandbox.oci_config(sh("sync"), rootfs, hosts=tmp_path / "hosts")
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    [rule] = spec["linux"]["seccomp"]["syscalls"]
    assert rule == {"names": list(SYNC_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 0}
    assert await run(sandbox, sh("echo data >/tmp/f && sync && sync -d /tmp/f && echo ok"),
                     rootfs) == "ok\n"
    assert await run(sandbox, sh("sync && echo ok", uid=1000, gid=1000), rootfs) == "ok\n"


def test_default_config_has_no_limits_nor_seccomp(sandbox: RuncSandbox, tmp_path: Path) -> None:
    spec = sandbox.oci_config(sh("true"), tmp_path, hosts=tmp_path / "hosts")
    assert "seccomp" not in spec["linux"]
    assert "resources" not in spec["linux"]
    assert {"type": "network"} in spec["linux"]["namespaces"]
    with_network = sandbox.oci_config(sh("true", network=True), tmp_path, hosts=tmp_path / "h")
    assert {"type": "network"} not in with_network["linux"]["namespaces"]


def test_a_missing_runc_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingTool, match=r"^runc not found: apt-get install runc$"):
        RuncSandbox(tmp_path / "state", runc="no-such-runc")


def test_not_root_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for an unprivileged user: the suite runs as root.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(BuildError, match=r"^the runc sandbox must run as root"):
        RuncSandbox(tmp_path / "state")
