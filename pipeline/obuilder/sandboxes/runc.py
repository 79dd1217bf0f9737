"""The runc sandbox: each command runs as a fresh OCI container over the step's rootfs.

For every command `RuncSandbox.run` writes a bundle (a temporary directory under the state
directory holding `config.json` and the container's `/etc/hosts`) and calls `runc run`. The
container gets its own pid, ipc, uts and mount namespaces, and its own network namespace (only a
loopback interface) unless the step asked for `(network host)`; OBuilder's capability set; /proc,
a tmpfs /dev, /dev/shm, /dev/pts, /dev/mqueue, a read-only /sys; hostname `builder`.

Several processes may share a state directory (they share the store it belongs to): each takes
an owner token (`locks.Owner`) and names its bundles `bundle-TOKEN-*` and its containers
`pipeline-TOKEN-*`. `clean` (before a builder's first step) kills the containers and removes the
bundles of tokens whose process has gone, e.g. a build killed with SIGKILL while its command ran
on.

The rootfs is a build result in the making, so the sandbox leaves nothing of its own in it: the
mount points it has to create (for /etc/hosts, caches, secrets, ...) are removed after the run, and
/etc/hosts and /etc/resolv.conf are bind-mounted over, never written.

The rootfs is also hostile: the command may replace any directory with a symlink to a host path.
Mount points are made and removed only through `confined` (descriptor-relative walks that never
leave the rootfs): before the run a symlink on the way is followed as if the rootfs were `/`;
after it nothing is followed, and an entry is removed only if it is still the very file or
directory (same device and inode, in the same parent) that was made for the run; anything else
is the command's output and stays.

Secrets never exist as files on the host: runc is started through `secret_namespace`, in a
private mount namespace where they are files on a tmpfs that disappears with the container.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.obuilder import confined
from pipeline.obuilder.locks import Owner, is_live_owner
from pipeline.obuilder.protocols import BuildError, Log, MissingTool, SandboxConfig
from pipeline.obuilder.sandboxes.process import exit_error, signal_name, supervise

CAPABILITIES = (
    "CAP_CHOWN",  # change file owners (package managers unpack files owned by other users)
    "CAP_DAC_OVERRIDE",  # bypass file permission checks, as root normally can
    "CAP_FSETID",  # keep set-user-ID bits when changing files
    "CAP_FOWNER",  # act on files regardless of their owner (chmod, utime)
    "CAP_MKNOD",  # create device nodes (dpkg unpacks some)
    "CAP_NET_RAW",  # raw sockets (ping)
    "CAP_SETGID",  # switch groups (apt-get drops to the _apt user)
    "CAP_SETUID",  # switch users
    "CAP_SETFCAP",  # set file capabilities (dpkg on ping, ...)
    "CAP_SETPCAP",  # pass capabilities on to children
    "CAP_NET_BIND_SERVICE",  # bind ports below 1024
    "CAP_SYS_CHROOT",  # chroot (used by some package scripts)
    "CAP_KILL",  # signal processes of other users
    "CAP_AUDIT_WRITE",  # write to the audit log (su, login tools)
)
"""The capabilities of root in the sandbox: Docker's defaults, enough for apt-get and dpkg.

A non-root user gets none of them (they are not in the ambient set), as on a normal system."""

SYNC_SYSCALLS = ("fsync", "fdatasync", "msync", "sync", "syncfs", "sync_file_range")
"""The calls `fast_sync` turns into no-ops: a crashed build is thrown away, never recovered."""

_SECCOMP_ARCHES = {
    # A filter applies only to the architectures it names: list every ABI a native binary may use.
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}

_CFS_PERIOD = 100_000
"""The CPU accounting period in microseconds (the kernel's default) against which `cpus` is a
quota."""

_INSTALL_RUNC = "runc not found: apt-get install runc"
_BUNDLE_PREFIX = "bundle-"
_SECRET_NAMESPACE = Path(__file__).with_name("secret_namespace.py")
"""The launcher of commands with secrets (`secret_namespace`), run as a file."""
_CONTAINER_PREFIX = "pipeline-"


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _mount(destination: str, type: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": type, "source": source, "options": options}


def _system_mounts(hosts: Path, network: bool) -> list[dict[str, Any]]:
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts",
               ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        _mount("/dev/shm", "tmpfs", "shm",
               ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        # Lets a build read its own limits (memory.limit_in_bytes, ...), never change them.
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "ro"]),
        _mount("/etc/hosts", "bind", str(hosts), ["rbind", "rprivate", "ro"]),
    ]
    if network:
        # Without a network namespace there is nothing to resolve names with but the host's DNS.
        mounts.append(_mount("/etc/resolv.conf", "bind", "/etc/resolv.conf",
                             ["rbind", "rprivate", "ro"]))
    return mounts


def _needs_mount_point(destination: str) -> bool:
    """Whether `destination` lies in the rootfs itself (rather than inside /dev, /proc or /sys,
    which are fresh filesystems where runc makes its own mount points)."""
    parts = PurePosixPath(destination).parts
    return not (len(parts) > 2 and parts[1] in ("dev", "proc", "sys"))


def _make_mount_point(root_fd: int, destination: str, is_dir: bool,
                      created: list[confined.Made]) -> None:
    """Create `destination` (and missing parents) in the rootfs as `confined.make_entry` does.
    Raises BuildError if a parent is not a directory or symlinks loop."""
    try:
        confined.make_entry(root_fd, destination, is_dir=is_dir, made=created)
    except OSError as exc:
        raise BuildError(f"cannot create mount point {destination} in the rootfs: "
                         f"{exc.strerror}") from None




def _runc_error(runc_log: Path) -> str | None:
    """The last error runc itself logged (it failed to start the container), if any."""
    try:
        lines = runc_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    errors = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            errors.append(str(entry.get("msg", "")))
    return errors[-1] if errors else None


async def check_runc(runc: str = "runc") -> str:
    """The version line of `runc --version` (e.g. "runc version 1.1.5+ds1").

    Raises MissingTool if runc is not installed, BuildError if it does not answer.
    """
    path = shutil.which(runc)
    if path is None:
        raise MissingTool(_INSTALL_RUNC)
    proc = await asyncio.create_subprocess_exec(
        path, "--version", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    text = output.decode(errors="replace").strip()
    if proc.returncode != 0 or not text:
        raise BuildError(f"{path} --version failed: {text or f'status {proc.returncode}'}")
    return text.splitlines()[0]


class RuncSandbox:
    """Runs commands with `runc run`, keeping runc's state and the bundles under `state_dir`.

    `memory` (bytes) and `cpus` (a number of CPUs, fractions allowed) limit each command through
    cgroups; `fast_sync` makes the fsync family of calls succeed without doing anything (seccomp),
    which is much faster on btrfs and loses nothing but a build that a crash would discard anyway.

    Raises MissingTool if `runc` is not installed and BuildError if not running as root (runc
    needs root to create namespaces and mounts); ValueError for a limit that is not positive.
    """

    def __init__(self, state_dir: Path, *, memory: int | None = None, cpus: float | None = None,
                 fast_sync: bool = False, runc: str = "runc") -> None:
        if memory is not None and memory <= 0:
            raise ValueError(f"memory limit must be positive, not {memory}")
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpu limit must be positive, not {cpus}")
        if os.geteuid() != 0:
            raise BuildError("the runc sandbox must run as root (runc needs it to create "
                             "namespaces and mounts)")
        path = shutil.which(runc)
        if path is None:
            raise MissingTool(_INSTALL_RUNC)
        # Absolute: runc resolves the bundle's paths from its own working directory.
        self.state_dir = state_dir.absolute()
        self.memory = memory
        self.cpus = cpus
        self.fast_sync = fast_sync
        self._runc = path
        self._runc_root = self.state_dir / "runc"
        self._runc_root.mkdir(parents=True, exist_ok=True)
        self._owners = self.state_dir / "owner"
        self._owner = Owner(self._owners)
        self._bundles = itertools.count()
        self._finalizer = weakref.finalize(self, self._owner.release)

    def close(self) -> None:
        """See `Sandbox.close`: gives up the owner token."""
        self._finalizer()

    async def clean(self) -> None:
        """See `Sandbox.clean`: kills and deletes the containers of `runc --root STATE/runc`
        whose owner has gone (with every process in them) and removes their bundles."""
        for container in await asyncio.to_thread(_entries, self._runc_root):
            if not is_live_owner(self._owners, container.removeprefix(_CONTAINER_PREFIX)):
                await self._runc_quietly("delete", "--force", container)
        for bundle in await asyncio.to_thread(_entries, self.state_dir):
            if bundle.startswith(_BUNDLE_PREFIX) and not is_live_owner(
                    self._owners, bundle.removeprefix(_BUNDLE_PREFIX)):
                await asyncio.to_thread(shutil.rmtree, self.state_dir / bundle, True)

    async def _runc_quietly(self, *args: str) -> int:
        """Run `runc --root STATE/runc ARGS`, its output discarded; its exit status."""
        process = await asyncio.create_subprocess_exec(
            self._runc, "--root", str(self._runc_root), *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await process.wait()

    def oci_config(self, config: SandboxConfig, rootfs: Path, *, hosts: Path,
                   secrets_dir: Path | None = None) -> dict[str, Any]:
        """The OCI runtime `config.json` running `config` over `rootfs` (an absolute path), with
        `hosts` bound read-only at /etc/hosts and secret number N bound read-only from
        `secrets_dir/N` (required if there are secrets). Raises BuildError for a relative
        mount target."""
        mounts = _system_mounts(hosts, config.network)
        binds = [(m.src, m.dst, m.readonly) for m in config.mounts]
        if config.secrets:
            if secrets_dir is None:
                raise ValueError("secrets need a secrets_dir")
            binds += [(secrets_dir / str(n), s.dst, True) for n, s in enumerate(config.secrets)]
        for source, destination, readonly in binds:
            if not destination.startswith("/"):
                raise BuildError(f"mount target {destination!r} is not an absolute path")
            options = ["rbind", "rprivate", "nosuid", "nodev"]
            if readonly:
                options.append("ro")
            mounts.append(_mount(destination, "bind", str(source), options))
        namespaces = ["pid", "ipc", "uts", "mount"]
        if not config.network:
            namespaces.append("network")
        capabilities = list(CAPABILITIES)
        linux: dict[str, Any] = {
            "namespaces": [{"type": name} for name in namespaces],
            # Docker's masks: kernel interfaces a build has no business reading or writing.
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        }
        resources: dict[str, Any] = {}
        if self.memory is not None:
            resources["memory"] = {"limit": self.memory}
        if self.cpus is not None:
            resources["cpu"] = {"quota": max(1000, round(self.cpus * _CFS_PERIOD)),
                                "period": _CFS_PERIOD}
        if resources:
            linux["resources"] = resources
        if self.fast_sync:
            seccomp: dict[str, Any] = {
                "defaultAction": "SCMP_ACT_ALLOW",
                # errnoRet 0: the call "fails" with no error, i.e. succeeds without syncing.
                "syscalls": [{"names": list(SYNC_SYSCALLS), "action": "SCMP_ACT_ERRNO",
                              "errnoRet": 0}],
            }
            arches = _SECCOMP_ARCHES.get(os.uname().machine)
            if arches:
                seccomp["architectures"] = arches
            linux["seccomp"] = seccomp
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": config.uid, "gid": config.gid},
                "args": list(config.argv),
                "env": [f"{name}={value}" for name, value in config.env.items()],
                "cwd": config.cwd,
                "capabilities": {
                    "bounding": capabilities,
                    "effective": capabilities,
                    "inheritable": capabilities,
                    "permitted": capabilities,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                # As OBuilder: set-user-ID programs (su, sudo) keep working inside builds.
                "noNewPrivileges": False,
            },
            "root": {"path": str(rootfs), "readonly": False},
            "hostname": config.hostname,
            "mounts": mounts,
            "linux": linux,
        }

    async def run(
        self,
        config: SandboxConfig,
        rootfs: Path,
        *,
        log: Log,
        stdin: bytes | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        """Run `config` in a container over `rootfs`, streaming its stdout and stderr to `log`.

        runc relays stdout and stderr through separate pipes, so the log keeps the order of each
        but not always their interleaving (as with OBuilder and Docker).

        Returns when the command exits 0. Raises BuildError for any other status ("command
        exited with status N", or "command killed by SIGNAME" for a status above 128), or if
        runc cannot start the container (runc's message; its details are also in the log);
        MissingTool if runc has disappeared. Setting `cancelled`, or cancelling the calling
        task, kills every process in the container and raises asyncio.CancelledError. In every
        case the container, its bundle and the mount points made in `rootfs` are gone on return.
        """
        rootfs = rootfs.resolve()
        # The owner's token makes the name unique among processes, the count within this one.
        bundle = self.state_dir / f"{_BUNDLE_PREFIX}{self._owner.token}-{next(self._bundles)}"
        bundle.mkdir(mode=0o700)
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        created: list[confined.Made] = []
        # Anonymous memory files: they vanish with the processes holding them.
        values = [os.memfd_create("obuilder-secret") for _ in config.secrets]
        try:
            hosts = bundle / "hosts"
            hosts.write_text(f"127.0.0.1 localhost {config.hostname}\n")
            secrets_dir = bundle / "secrets"
            spec = self.oci_config(config, rootfs, hosts=hosts, secrets_dir=secrets_dir)
            (bundle / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
            for mount in spec["mounts"]:
                if _needs_mount_point(mount["destination"]):
                    # A secret's source exists only in secret_namespace's tmpfs: it is a file.
                    is_dir = mount["type"] != "bind" or Path(mount["source"]).is_dir()
                    _make_mount_point(root_fd, mount["destination"], is_dir, created)
            launcher: list[str] = []
            if config.secrets:
                secrets_dir.mkdir(mode=0o700)
                for fd, secret in zip(values, config.secrets, strict=True):
                    os.write(fd, secret.value)
                launcher = [sys.executable, "-I", str(_SECRET_NAMESPACE),
                            str(bundle / "runc.log"), str(secrets_dir), str(config.uid),
                            str(config.gid), *map(str, values), "--"]
            await self._run_bundle(bundle, log=log, stdin=stdin, cancelled=cancelled,
                                   launcher=launcher, pass_fds=values)
        finally:
            for fd in values:
                os.close(fd)
            confined.remove_made(root_fd, created)
            os.close(root_fd)
            shutil.rmtree(bundle, ignore_errors=True)

    async def _run_bundle(self, bundle: Path, *, log: Log, stdin: bytes | None,
                          cancelled: asyncio.Event | None, launcher: Sequence[str],
                          pass_fds: Sequence[int]) -> None:
        """`runc run` the bundle. A non-empty `launcher` is a command that ends by exec'ing
        the runc command line appended to it (`secret_namespace`); it inherits `pass_fds`."""
        container_id = f"{_CONTAINER_PREFIX}{self._owner.token}-{os.urandom(8).hex()}"
        runc_log = bundle / "runc.log"
        try:
            proc = await asyncio.create_subprocess_exec(
                *launcher, self._runc, "--root", str(self._runc_root), "--log", str(runc_log),
                "--log-format", "json", "run", "--bundle", str(bundle), container_id,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                pass_fds=pass_fds)
        except FileNotFoundError:
            raise MissingTool(_INSTALL_RUNC) from None
        status = await supervise(proc, log=log, stdin=stdin, cancelled=cancelled,
                                 stop=lambda: self._stop(container_id, proc))
        if status == 0:
            return
        if status < 0:
            raise BuildError(f"runc killed by {signal_name(-status)}")
        error = _runc_error(runc_log)
        if error is not None:
            raise BuildError(error if error.startswith("runc") else f"runc: {error}")
        raise exit_error(status)

    async def _stop(self, container_id: str, proc: asyncio.subprocess.Process) -> None:
        """Kill the container if still running, wait for runc to exit and delete its state."""
        while proc.returncode is None:
            if await self._runc_quietly("kill", "--all", container_id, "KILL") == 0:
                await proc.wait()
            else:
                # runc may not have created the container yet (or has just deleted it): retry
                # until runc run itself has exited.
                try:
                    await asyncio.wait_for(proc.wait(), 0.1)
                except TimeoutError:
                    continue
        # `runc run` deletes the container when it exits normally; only an interrupted run
        # leaves state behind.
        if (self._runc_root / container_id).exists():
            await self._runc_quietly("delete", "--force", container_id)
