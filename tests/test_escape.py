"""Builds that try to make the builder act on host files through symlinks in their rootfs.

Each attack runs on every store kind (btrfs, overlayfs, xfs, rsync) with the real runc sandbox.
The target is a victim directory on the host (under the test's tmp_path): after the build it
must be exactly as before, entries, contents and metadata (ctime included, so a chmod, chown
or link count change shows), whether the step succeeded or failed. Also here: the confined
walks themselves, and secrets surviving nowhere when the builder is killed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from obuilder_fixtures import HANG_GUARD
from test_builder import build, make_store, rootfs

from pipeline.obuilder import confined
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.local import LocalFetcher
from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.stores import DIRECTORY_KINDS

Snapshot = dict[str, tuple[object, ...]]


def snapshot(directory: Path) -> Snapshot:
    """Every entry under `directory` (itself included) with its metadata and content."""
    entries: Snapshot = {}
    for path in [directory, *directory.rglob("*")]:
        info = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        entries[str(path.relative_to(directory))] = (
            info.st_mode, info.st_ino, info.st_uid, info.st_gid, info.st_size, info.st_nlink,
            info.st_mtime_ns, info.st_ctime_ns, content)
    return entries


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host directory a hostile build aims at: files named like the mount points it uses."""
    directory = tmp_path / "victim"
    directory.mkdir()
    for name in ("y", "t", "hosts", "f"):
        (directory / name).write_text("precious\n")
    (directory / "d").mkdir()
    (directory / "d" / "keep").write_text("precious\n")
    (directory / "passwd").write_text("intruder:x:4242:4242::/:/bin/sh\n")
    return directory


@pytest.fixture(params=list(DIRECTORY_KINDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> DbStore:
    return await make_store(request.param, request, tmp_path)


@pytest.fixture
def builder(store: DbStore, tmp_path: Path, busybox_images: Path) -> Builder:
    return Builder(store, RuncSandbox(tmp_path / "runc"), LocalFetcher(busybox_images))


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "context"
    directory.mkdir()
    (directory / "f").write_text("copied\n")
    return directory


async def build_untouched(builder: Builder, spec: str, context: Path, victim: Path,
                          **options: object) -> str | None:
    """Build `spec`; its result id (None if it failed), after checking `victim` is intact."""
    before = snapshot(victim)
    try:
        result, _ = await build(builder, spec, context, **options)
    except BuildError:
        result = None
    assert snapshot(victim) == before
    return result


# --- mount points ---------------------------------------------------------------------------------


async def test_a_cache_targets_parent_replaced_by_a_symlink(
        builder: Builder, store: DbStore, context: Path, victim: Path) -> None:
    # The reproduction of issue #10 item 1.
    spec = (f'((from busybox) (run (cache (c (target /x/y)))'
            f' (shell "mv /x /z && ln -s {victim} /x")))')
    result = await build_untouched(builder, spec, context, victim)
    assert result is not None
    # What the command made is its output; what was made for the mount and moved stays too.
    root = await rootfs(store, result)
    assert os.readlink(root / "x") == str(victim)
    assert (root / "z" / "y").is_dir()


async def test_a_secret_targets_parent_replaced_by_a_symlink(
        builder: Builder, store: DbStore, context: Path, victim: Path) -> None:
    spec = (f'((from busybox) (run (secrets (token (target /s/t)))'
            f' (shell "mv /s /z && ln -s {victim} /s")))')
    result = await build_untouched(builder, spec, context, victim, secrets={"token": b"value"})
    assert result is not None
    root = await rootfs(store, result)
    assert os.readlink(root / "s") == str(victim)
    assert (root / "z" / "t").read_bytes() == b""


async def test_etc_replaced_by_a_symlink_on_an_image_without_etc_hosts(
        builder: Builder, store: DbStore, context: Path, victim: Path,
        busybox_rootfs: Path) -> None:
    # /etc/hosts is a mount point the sandbox makes (and must remove) in this image.
    assert not (busybox_rootfs / "etc" / "hosts").exists()
    spec = f'((from busybox) (run (shell "mv /etc /etc.real && ln -s {victim} /etc")))'
    result = await build_untouched(builder, spec, context, victim)
    if result is not None:
        # overlayfs cannot rename a directory of the image (EXDEV): there the step fails.
        root = await rootfs(store, result)
        assert os.readlink(root / "etc") == str(victim)


@pytest.mark.parametrize("target, is_dir", [("/x/y", True), ("/x/t", False)],
                         ids=["cache", "secret"])
async def test_a_mount_point_replaced_by_a_symlink_is_the_commands_output(
        builder: Builder, store: DbStore, context: Path, victim: Path, target: str,
        is_dir: bool) -> None:
    # A mount point cannot be removed from inside (EBUSY), but its parent can be moved away and
    # a symlink put in its place.
    name = os.path.basename(target)
    replace = f"mv /x /x.old && mkdir /x && ln -s {victim}/{name} {target}"
    mount = (f"(cache (c (target {target})))" if is_dir
             else f"(secrets (token (target {target})))")
    spec = f'((from busybox) (run {mount} (shell "{replace}")))'
    result = await build_untouched(builder, spec, context, victim, secrets={"token": b"v"})
    assert result is not None
    root = await rootfs(store, result)
    assert os.readlink(root / target.lstrip("/")) == f"{victim}/{name}"
    assert (root / "x.old" / name).is_dir() == is_dir


@pytest.mark.parametrize("link", ["absolute", "relative"])
async def test_a_symlink_in_the_image_leads_to_a_mount_point_inside_the_rootfs(
        builder: Builder, store: DbStore, context: Path, victim: Path, link: str) -> None:
    target = str(victim) if link == "absolute" else "../" * 12 + str(victim).lstrip("/")
    spec = f"""((from busybox)
 (run (shell "ln -s {target} /x"))
 (run (cache (c (target /x/new))) (shell "echo cached > /x/new/file; ls /x")))"""
    result = await build_untouched(builder, spec, context, victim)
    assert result is not None
    # The mount point was made (and removed) at the victim's path inside the rootfs.
    root = await rootfs(store, result)
    assert os.readlink(root / "x") == target
    assert not (root / str(victim).lstrip("/")).exists()
    async with store.cache("c", 0, 0) as cache:
        assert (cache / "file").read_text() == "cached\n"


# --- copy and user look-up ------------------------------------------------------------------------


@pytest.mark.parametrize("dst", ["/dst/f", "/dst/d/f", "/dst/"])
async def test_copy_through_a_planted_symlink_stays_in_the_rootfs(
        builder: Builder, store: DbStore, context: Path, victim: Path, dst: str) -> None:
    spec = f"""((from busybox)
 (run (shell "ln -s {victim} /dst"))
 (copy (src f) (dst {dst})))"""
    result = await build_untouched(builder, spec, context, victim)
    assert result is not None
    root = await rootfs(store, result)
    inside = root / str(victim).lstrip("/") / dst.removeprefix("/dst/").removesuffix("/")
    assert (inside if dst != "/dst/" else inside / "f").read_text() == "copied\n"


async def test_copy_onto_a_planted_symlink_replaces_it(
        builder: Builder, store: DbStore, context: Path, victim: Path) -> None:
    spec = f"""((from busybox)
 (run (shell "ln -s {victim}/f /dst"))
 (copy (src f) (dst /dst)))"""
    result = await build_untouched(builder, spec, context, victim)
    assert result is not None
    assert (await rootfs(store, result) / "dst").read_text() == "copied\n"


async def test_a_user_is_looked_up_in_the_rootfs_only(
        builder: Builder, context: Path, victim: Path) -> None:
    spec = f"""((from busybox)
 (run (shell "mv /etc/passwd /etc/passwd.real && ln -s {victim}/passwd /etc/passwd"))
 (user (name intruder)) (run (shell "id")))"""
    with pytest.raises(BuildError, match=r"cannot look up user 'intruder': no /etc/passwd$"):
        await build(builder, spec, context)
    # A symlink within the rootfs is followed as the command would see it.
    spec = """((from busybox)
 (run (shell "mv /etc/passwd /etc/passwd.real && ln -s passwd.real /etc/passwd"))
 (user (name opam)) (run (shell "id -u")))"""
    _, output = await build(builder, spec, context)
    assert "\n1000\n" in output


async def test_a_fifo_as_etc_passwd_fails_the_step(builder: Builder, context: Path) -> None:
    spec = """((from busybox)
 (run (shell "rm /etc/passwd && mkfifo /etc/passwd"))
 (user (name opam)) (run (shell "id")))"""
    with pytest.raises(BuildError, match=r"'opam': /etc/passwd is not a regular file$"):
        await build(builder, spec, context)


async def test_a_malformed_uid_in_etc_passwd_is_one_line_of_error(
        builder: Builder, context: Path) -> None:
    spec = """((from busybox)
 (run (shell "echo 'odd:x:²:0::/:/bin/sh' >> /etc/passwd"))
 (user (name odd)) (run (shell "id")))"""
    with pytest.raises(BuildError, match=r"'odd': bad uid or gid in /etc/passwd$"):
        await build(builder, spec, context)


# --- the confined walks ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, victim: Path) -> Iterator[int]:
    """A rootfs-like tree holding links that point out of it; its descriptor."""
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (root / "absolute").symlink_to(victim)
    (root / "climbing").symlink_to("../../../../../../.." + str(victim))
    (root / "inside").symlink_to("/etc")
    (root / "loop").symlink_to("loop")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_resolve_follows_links_as_if_the_tree_were_the_root(tree: int, victim: Path) -> None:
    inside_victim = str(victim).lstrip("/")
    assert confined.resolve(tree, "/absolute/y") == f"{inside_victim}/y"
    assert confined.resolve(tree, "climbing/d/keep") == f"{inside_victim}/d/keep"
    assert confined.resolve(tree, "/inside/passwd") == "etc/passwd"
    assert confined.resolve(tree, "/../../inside/../etc/./passwd") == "etc/passwd"
    assert confined.resolve(tree, "/new/../etc/new") == "etc/new"
    assert confined.resolve(tree, "/") == ""


def test_resolve_refuses_loops_and_files_as_directories(tree: int) -> None:
    with pytest.raises(OSError) as info:
        confined.resolve(tree, "/loop/x")
    assert info.value.errno == errno.ELOOP
    with pytest.raises(NotADirectoryError):
        confined.resolve(tree, "/etc/passwd/x")


def test_open_dir_never_leaves_the_tree(tree: int, victim: Path) -> None:
    fd = confined.open_dir(tree, "/inside", follow_in_root=True)
    try:
        assert os.listdir(os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)) == ["passwd"]
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        confined.open_dir(tree, "/absolute", follow_in_root=True)
    for path in ("/absolute", "/inside", "/climbing"):
        with pytest.raises(OSError) as info:
            confined.open_dir(tree, path, follow_in_root=False)
        assert info.value.errno == errno.ELOOP
    with pytest.raises(NotADirectoryError):
        confined.open_dir(tree, "/etc/passwd", follow_in_root=False)


# --- secrets --------------------------------------------------------------------------------------


async def test_a_secret_is_readable_by_the_step_user_only_at_its_target(
        builder: Builder, store: DbStore, context: Path) -> None:
    value = secrets.token_hex(16)
    spec = """((from busybox) (user (uid 1000) (gid 1000))
 (run (secrets (token (target /home/opam/token)))
      (shell "stat -c '%a %u:%g' /home/opam/token; cat /home/opam/token; echo")))"""
    result, output = await build(builder, spec, context, secrets={"token": value.encode()})
    assert f"\n400 1000:1000\n{value}\n" in output
    assert not (await rootfs(store, result) / "home" / "opam" / "token").exists()


def files_holding(value: bytes, *tops: Path) -> list[Path]:
    """The files under `tops` holding `value`, on the same file systems (loop-mounted images,
    larger than any secret file, are left out)."""
    found = []
    for top in tops:
        device = top.stat().st_dev
        for directory, subdirectories, files in os.walk(top):
            subdirectories[:] = [d for d in subdirectories
                                 if _device(os.path.join(directory, d)) == device]
            for name in files:
                path = Path(directory, name)
                try:
                    info = path.lstat()
                    small_file = info.st_size < (64 << 20) and stat.S_ISREG(info.st_mode)
                    if small_file and value in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue  # another process's file, gone meanwhile
    return found


def _device(path: str) -> int | None:
    try:
        return os.lstat(path).st_dev
    except OSError:
        return None  # another process's file, gone meanwhile


@pytest.mark.parametrize("kind", ["rsync", "btrfs"])
async def test_a_killed_build_leaves_its_secrets_nowhere(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, busybox_images: Path,
        context: Path) -> None:
    store = await make_store(kind, request, tmp_path)
    value = f"secret-{secrets.token_hex(16)}".encode()
    secret_file = tmp_path / "secret-input"
    secret_file.write_bytes(value)
    spec = tmp_path / "spec"
    spec.write_text('((from busybox) (run (secrets (token (target /run/token)))'
                    ' (shell "cat /run/token >/dev/null && echo started | tr a-z A-Z'
                    ' && sleep 600")))')
    process = await asyncio.create_subprocess_exec(
        Path(sys.executable).parent / "pipeline", "obuilder", "build", "-f", str(spec),
        str(context), "--store", f"{kind}:{store.root}", "--image-dir", str(busybox_images),
        "--secret", f"token:{secret_file}",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = b""
    async with asyncio.timeout(HANG_GUARD):
        # The marker as printed by the step (its header holds it in lower case).
        while b"STARTED" not in output:
            chunk = await process.stdout.read(4096)
            assert chunk, output.decode()
            output += chunk
    process.send_signal(signal.SIGKILL)
    await process.wait()
    secret_file.unlink()
    state = store.root / "state" / "sandbox"
    try:
        assert files_holding(value, Path("/dev/shm"), Path("/tmp"), store.root, state) == []
    finally:
        # The builder's death does not stop the container: stop it here.
        for container in os.listdir(state / "runc"):
            subprocess.run(["runc", "--root", str(state / "runc"), "kill", "--all", container,
                            "KILL"], check=False, capture_output=True)
