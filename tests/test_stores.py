"""The stores and the result database, on real filesystems: btrfs and xfs (reflink=1) on loop
images, overlayfs on tmpfs, rsync (both modes) on the test's own directory; and the docker store
on real podman (`any_kind` tests: those that read no result's rootfs, which a docker result
keeps in an image; `test_docker_backend.py` has the rest of its tests).

Every store test runs once per kind on a fresh directory of its filesystem. Builds, caches and
pruning are ordered with events and a fake clock, never by waiting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from obuilder_fixtures import DOCKER_ENGINE, STORE_FILESYSTEMS, new_store_root

from pipeline.obuilder import stores
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.full_store import store_spec
from pipeline.obuilder.protocols import STATE_DIR, BuildError, MissingTool, Store
from pipeline.obuilder.stores import open_store
from pipeline.obuilder.stores.btrfs import BtrfsStore
from pipeline.obuilder.stores.rsync import RsyncStore
from pipeline.obuilder.stores.xfs import XfsStore

KINDS = ["btrfs", "xfs", "overlayfs", "rsync-copy", "rsync-hardlink"]
IMAGE_KINDS = ["docker"]
"""Stores whose results are images, not directories holding `rootfs/`."""
any_kind = pytest.mark.parametrize("kind", [*KINDS, *IMAGE_KINDS], indirect=True)
"""For a test that holds for every store, results as images included."""
REPO = Path(__file__).resolve().parents[1]
# Only a guard against a hang turning into a stuck test run; no test relies on it for timing.
HANG_GUARD = 60.0
FAR_FUTURE = datetime(3000, 1, 1, tzinfo=UTC)


def open_kind(kind: str, root: Path) -> Store:
    name, _, mode = kind.partition("-")
    if name in IMAGE_KINDS:
        return open_store(f"{name}:{root.name}", engine=DOCKER_ENGINE)
    return open_store(f"{name}:{root}", rsync_mode=mode or "copy")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_root(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return new_store_root(kind, request, tmp_path)


@pytest.fixture
def store(kind: str, store_root: Path) -> Store:
    return open_kind(kind, store_root)


class Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about the files under `root`: type, mode, owner, and for
    non-directories the mtime and content (or link target)."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            entry: tuple[object, ...] = (info.st_mode, info.st_uid, info.st_gid)
            if stat.S_ISREG(info.st_mode):
                entry += (info.st_mtime_ns, path.read_bytes())
            elif stat.S_ISLNK(info.st_mode):
                entry += (info.st_mtime_ns, os.readlink(path))
            found[str(path.relative_to(root))] = entry
    return found


def entries(root: Path) -> set[str]:
    """The paths under a store's root, except its state directory (the database's files)."""
    return {str(Path(dirpath, name).relative_to(root))
            for dirpath, dirnames, filenames in os.walk(root)
            for name in dirnames + filenames
            if Path(dirpath, name).relative_to(root).parts[0] != "state"}


def writes(files: dict[str, str], log: str = "") -> Callable[[Path], Awaitable[None]]:
    """A build step writing `files` (relative to rootfs/) and the step's log."""

    async def step(tmpdir: Path) -> None:
        for name, text in files.items():
            path = tmpdir / "rootfs" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (tmpdir / "log").write_text(log)

    return step


async def read_cache(store: Store, name: str) -> dict[str, str]:
    async with store.cache(name, 0, 0) as copy:
        return {p.name: p.read_text() for p in copy.iterdir()}


def test_every_kind_of_store_is_tested() -> None:
    assert {kind.partition("-")[0] for kind in KINDS} == set(stores.DIRECTORY_KINDS) == set(
        STORE_FILESYSTEMS)
    assert set(stores.KINDS) == {*stores.DIRECTORY_KINDS, *IMAGE_KINDS}


async def test_store_names_its_kind_and_keeps_a_private_state_dir(
        kind: str, store: Store, store_root: Path) -> None:
    assert isinstance(store, Store)
    assert store.kind == kind.partition("-")[0]
    assert store.root == store_root
    assert store_spec(store) == f"{store.kind}:{store_root}"
    assert store.state_dir == store_root / STATE_DIR
    assert stat.S_IMODE(store.state_dir.stat().st_mode) == 0o700


# Builds and results.


async def test_build_is_saved_and_found(store: Store) -> None:
    seen: list[list[Path]] = []

    async def step(tmpdir: Path) -> None:
        seen.append(list(tmpdir.iterdir()))
        await writes({"etc/motd": "hello"}, log="step output\n")(tmpdir)

    assert await store.result("a") is None
    await store.build(None, "a", step)
    result = await store.result("a")
    assert seen == [[]]
    assert result is not None
    assert (result / "rootfs" / "etc" / "motd").read_text() == "hello"
    assert store.log_file("a") == result / "log"
    assert store.log_file("a").read_text() == "step output\n"
    assert await store.result("b") is None


async def test_build_on_base_sees_it_and_leaves_it_unchanged(store: Store) -> None:
    async def base_step(tmpdir: Path) -> None:
        rootfs = tmpdir / "rootfs"
        await writes({"same": "same", "edited": "one\n", "removed": "x", "touched": "t",
                      "dir/nested": "n"}, log="base log")(tmpdir)
        (rootfs / "link").symlink_to("same")
        os.utime(rootfs / "touched", (1000, 1000))
        os.utime(rootfs / "same", (1000, 1000))
        os.chown(rootfs / "dir", 1000, 1000)

    async def child_step(tmpdir: Path) -> None:
        rootfs = tmpdir / "rootfs"
        assert (rootfs / "dir" / "nested").read_text() == "n"
        assert os.readlink(rootfs / "link") == "same"
        assert (rootfs / "dir").stat().st_uid == 1000
        with open(rootfs / "edited", "a") as f:  # in place, as `>>` does
            f.write("two\n")
        (rootfs / "removed").unlink()
        os.utime(rootfs / "touched", (2000, 2000))
        (rootfs / "added").write_text("new")
        (tmpdir / "log").write_text("child log")

    async def grandchild_step(tmpdir: Path) -> None:
        rootfs = tmpdir / "rootfs"
        # Overwrite a file the child did not change, in place, keeping its size and mtime:
        # in hardlink mode the child shares it with the base.
        with open(rootfs / "same", "r+") as f:
            f.write("SAME")
        os.utime(rootfs / "same", (1000, 1000))
        os.chmod(rootfs / "dir" / "nested", 0o600)
        (tmpdir / "log").write_text("grandchild log")

    await store.build(None, "base", base_step)
    base = await store.result("base")
    assert base is not None
    base_before = snapshot(base)
    await store.build("base", "child", child_step)
    child = await store.result("child")
    assert child is not None
    child_before = snapshot(child)
    await store.build("child", "grandchild", grandchild_step)
    grandchild = await store.result("grandchild")
    assert grandchild is not None

    assert snapshot(base) == base_before
    assert snapshot(child) == child_before
    assert (child / "rootfs" / "edited").read_text() == "one\ntwo\n"
    assert not (child / "rootfs" / "removed").exists()
    assert (child / "rootfs" / "touched").stat().st_mtime == 2000
    assert (child / "rootfs" / "added").read_text() == "new"
    assert store.log_file("child").read_text() == "child log"
    assert (grandchild / "rootfs" / "same").read_text() == "SAME"
    assert stat.S_IMODE((grandchild / "rootfs" / "dir" / "nested").stat().st_mode) == 0o600
    assert (grandchild / "rootfs" / "added").read_text() == "new"
    assert store.log_file("base").read_text() == "base log"


async def test_failed_build_is_not_saved(store: Store, store_root: Path) -> None:
    await store.build(None, "base", writes({"f": "base"}))
    base = await store.result("base")
    assert base is not None
    base_before, before = snapshot(base), entries(store_root)

    async def failing(tmpdir: Path) -> None:
        await writes({"f": "changed", "junk": "junk"})(tmpdir)
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        await store.build("base", "x", failing)
    assert await store.result("x") is None
    assert entries(store_root) == before
    assert snapshot(base) == base_before
    # Nothing was recorded, so the step can be tried again.
    await store.build("base", "x", writes({"g": "g"}))
    result = await store.result("x")
    assert result is not None
    assert sorted(p.name for p in (result / "rootfs").iterdir()) == ["f", "g"]


@any_kind
async def test_cancelled_build_is_not_saved(store: Store, store_root: Path) -> None:
    before = entries(store_root)
    started = asyncio.Event()

    async def hanging(tmpdir: Path) -> None:
        await writes({"partial": "x"})(tmpdir)
        started.set()
        await asyncio.Event().wait()

    build = asyncio.create_task(store.build(None, "x", hanging))
    await asyncio.wait_for(started.wait(), HANG_GUARD)
    build.cancel()
    with pytest.raises(asyncio.CancelledError):
        await build
    assert await store.result("x") is None
    assert entries(store_root) == before


CRASHING_BUILD = """
import asyncio, sys
from pathlib import Path
from pipeline.obuilder.stores import open_store

async def main():
    kind, _, mode = sys.argv[1].partition("-")
    # A docker store's PATH is its prefix (its root's name); it keeps the engine it was made on.
    path = Path(sys.argv[2]).name if kind == "docker" else sys.argv[2]
    store = open_store(f"{kind}:{path}", rsync_mode=mode or "copy")

    async def step(tmpdir):
        (tmpdir / "partial").write_text("x")
        async with store.cache("c", 0, 0) as cache:
            (cache / "partial").write_text("x")
            print("ready", flush=True)
            await asyncio.Event().wait()

    await store.build("base", "crashed", step)

asyncio.run(main())
"""


@any_kind
async def test_clean_removes_what_a_killed_process_left(
        kind: str, store: Store, store_root: Path) -> None:
    await store.build(None, "base", writes({"f": "base"}))
    async with store.cache("c", 0, 0) as cache:
        (cache / "kept").write_text("kept")
    before = entries(store_root)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_BUILD, kind, str(store_root), cwd=REPO,
        stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), HANG_GUARD)
    process.kill()
    await process.wait()
    assert line == b"ready\n"
    assert entries(store_root) != before  # the killed build and cache copy left something

    restarted = open_kind(kind, store_root)
    await restarted.clean()
    assert entries(store_root) == before
    assert await restarted.result("crashed") is None
    assert await read_cache(restarted, "c") == {"kept": "kept"}
    await restarted.build("base", "crashed", writes({"g": "g"}))
    assert await restarted.result("crashed") is not None


@any_kind
async def test_results_lists_committed_results_only(store: Store) -> None:
    assert await store.results() == []
    await store.build(None, "b", writes({"f": "b"}))
    await store.build("b", "a", writes({"f": "a"}))
    started = asyncio.Event()

    async def hanging(tmpdir: Path) -> None:
        started.set()
        await asyncio.Event().wait()

    build = asyncio.create_task(store.build("a", "in-progress", hanging))
    await asyncio.wait_for(started.wait(), HANG_GUARD)
    assert await store.results() == ["a", "b"]
    build.cancel()
    with pytest.raises(asyncio.CancelledError):
        await build
    await store.delete("b")
    assert await store.results() == ["a"]


@any_kind
async def test_backends_keep_no_record_of_use(store: Store, store_root: Path) -> None:
    await store.build(None, "a", writes({"f": "a"}))
    before = snapshot(store_root)
    await store.mark_used(["a", "unknown"])
    assert snapshot(store_root) == before


async def test_delete(store: Store) -> None:
    await store.build(None, "a", writes({"f": "a"}))
    await store.build(None, "x", writes({"f": "x"}))
    await store.delete("a")
    assert await store.result("a") is None
    x = await store.result("x")
    assert x is not None
    assert (x / "rootfs" / "f").read_text() == "x"
    await store.delete("a")  # already gone: nothing to do
    await store.build(None, "a", writes({"f": "again"}))
    a = await store.result("a")
    assert a is not None
    assert (a / "rootfs" / "f").read_text() == "again"


async def test_df(store: Store, store_root: Path) -> None:
    usage = await store.df()
    assert usage.total == shutil.disk_usage(store_root).total
    assert 0 < usage.free <= usage.total


# Caches.


@any_kind
async def test_cache_is_created_owned_by_its_user_and_persists(store: Store) -> None:
    async with store.cache("opam", 1000, 1001) as copy:
        assert list(copy.iterdir()) == []
        assert (copy.stat().st_uid, copy.stat().st_gid) == (1000, 1001)
        (copy / "archive").write_text("v1")
        os.chown(copy / "archive", 1000, 1001)
    assert not copy.exists()
    # An existing cache keeps its owner whoever uses it next.
    async with store.cache("opam", 0, 0) as again:
        assert (again.stat().st_uid, again.stat().st_gid) == (1000, 1001)
        assert (again / "archive").read_text() == "v1"
        assert (again / "archive").stat().st_uid == 1000
        (again / "index").write_text("i")
    assert await read_cache(store, "opam") == {"archive": "v1", "index": "i"}
    assert await read_cache(store, "other") == {}


@any_kind
async def test_cache_last_release_wins(store: Store) -> None:
    async with store.cache("c", 0, 0) as copy:
        (copy / "shared").write_text("v0")
    async with AsyncExitStack() as first_stack:
        first = await first_stack.enter_async_context(store.cache("c", 0, 0))
        (first / "shared").write_text("first")
        (first / "first-only").write_text("1")
        async with store.cache("c", 0, 0) as second:
            # Each copy starts from the released version, not from another copy in use.
            assert (second / "shared").read_text() == "v0"
            assert not (second / "first-only").exists()
            (second / "shared").write_text("second")
            (second / "second-only").write_text("2")
        assert await read_cache(store, "c") == {"shared": "second", "second-only": "2"}
    # `first` was taken first but released last: it is what remains.
    assert await read_cache(store, "c") == {"shared": "first", "first-only": "1"}


@any_kind
async def test_cache_copy_is_discarded_when_the_block_raises(store: Store) -> None:
    async with store.cache("c", 0, 0) as copy:
        (copy / "good").write_text("good")
    with pytest.raises(RuntimeError, match="step failed"):
        async with store.cache("c", 0, 0) as copy:
            (copy / "good").write_text("overwritten")
            (copy / "junk").write_text("junk")
            raise RuntimeError("step failed")
    assert not copy.exists()
    assert await read_cache(store, "c") == {"good": "good"}


@any_kind
async def test_delete_cache_discards_copies_in_use(store: Store) -> None:
    async with store.cache("c", 0, 0) as copy:
        (copy / "old").write_text("old")
    async with store.cache("c", 0, 0) as in_use:
        await store.delete_cache("c")
        (in_use / "late").write_text("late")
    # Recreated, empty, owned by its new user.
    async with store.cache("c", 1000, 1000) as fresh:
        assert list(fresh.iterdir()) == []
        assert fresh.stat().st_uid == 1000
    await store.delete_cache("never-made")


# The result database.


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def db(store: Store, clock: Clock) -> AsyncIterator[DbStore]:
    db = DbStore(store, clock=clock)
    await db.clean()
    yield db


@any_kind
async def test_db_store_is_a_store_of_its_backends_kind(store: Store, db: DbStore) -> None:
    assert isinstance(db, Store)
    assert (db.kind, db.root, db.state_dir) == (store.kind, store.root, store.state_dir)
    assert (db.state_dir / "db.sqlite").is_file()
    await db.build(None, "a", writes({}))
    await store.build(None, "unrecorded", writes({}))
    assert await db.results() == ["a", "unrecorded"]


@any_kind
async def test_db_delete_removes_descendants(db: DbStore) -> None:
    await db.build(None, "a", writes({"a": "a"}))
    await db.build("a", "b", writes({"b": "b"}))
    await db.build("b", "c", writes({"c": "c"}))
    await db.build("a", "d", writes({"d": "d"}))
    await db.build(None, "e", writes({"e": "e"}))
    deleted = await db.delete("a")
    assert sorted(deleted) == ["a", "b", "c", "d"]
    assert deleted.index("c") < deleted.index("b") < deleted.index("a")
    assert deleted[-1] == "a"
    for id in "abcd":
        assert await db.result(id) is None
    assert await db.result("e") is not None
    assert await db.delete("a") == []
    # The rows went too: only e is left to prune.
    assert await db.prune(FAR_FUTURE) == ["e"]


@any_kind
async def test_db_prune_least_recently_used_first(db: DbStore, clock: Clock) -> None:
    await db.build(None, "a", writes({}))       # a used at 1
    await db.build("a", "b", writes({}))        # a and b used at 2
    await db.build(None, "x", writes({}))       # x at 3
    await db.mark_used(["b"])                   # b at 4
    # Only results with no children are candidates: x (3) before b (4); a has a child.
    assert await db.prune(FAR_FUTURE, limit=1) == ["x"]
    assert await db.result("x") is None
    # Used at 4, so not used before 4.
    assert await db.prune(datetime.fromtimestamp(4, UTC)) == []
    # Once b is gone, a has no children and goes too.
    assert await db.prune(FAR_FUTURE) == ["b", "a"]
    assert await db.result("a") is None
    assert await db.prune(FAR_FUTURE) == []


async def test_db_prune_spares_the_base_of_a_running_build(db: DbStore) -> None:
    await db.build(None, "a", writes({"f": "a"}))
    await db.build(None, "x", writes({}))
    started, finish = asyncio.Event(), asyncio.Event()

    async def step(tmpdir: Path) -> None:
        started.set()
        await finish.wait()
        await writes({"g": "c"})(tmpdir)

    build = asyncio.create_task(db.build("a", "c", step))
    await asyncio.wait_for(started.wait(), HANG_GUARD)
    assert await db.prune(FAR_FUTURE) == ["x"]
    assert await db.result("a") is not None
    finish.set()
    await asyncio.wait_for(build, HANG_GUARD)
    c = await db.result("c")
    assert c is not None
    assert (c / "rootfs" / "f").read_text() == "a"
    assert await db.prune(FAR_FUTURE) == ["c", "a"]


@any_kind
async def test_db_open_reconciles_table_and_results(
        kind: str, store: Store, store_root: Path, db: DbStore, clock: Clock) -> None:
    await db.build(None, "a", writes({"f": "a"}))
    await db.build("a", "b", writes({}))
    await db.build("b", "c", writes({}))
    # Behind the database's back: a recorded result vanishes, an unrecorded one appears
    # (as a crash between a commit and its record would leave).
    await store.delete("b")
    await store.build(None, "z", writes({}))

    reopened = DbStore(open_kind(kind, store_root), clock=clock)
    await reopened.clean()
    assert await reopened.result("z") is None
    # What was built on the vanished result goes with it.
    assert await reopened.result("c") is None
    assert await reopened.result("a") is not None
    # b's and c's rows are gone too, so a has no children left.
    assert await reopened.prune(FAR_FUTURE) == ["a"]


# Opening stores.


def test_btrfs_store_refuses_another_filesystem(tmp_path: Path, xfs_mount: Path) -> None:
    with pytest.raises(BuildError, match=r"is on ext4; create one with: truncate -s 10G img "
                                         r"&& mkfs\.btrfs img && .*mount -o loop img"):
        BtrfsStore(tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(BuildError, match=r"needs a btrfs filesystem but .* is on xfs"):
        BtrfsStore(xfs_mount / "not-btrfs")


def test_xfs_store_refuses_another_filesystem(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"needs a xfs filesystem but .* is on ext4; .*"
                                         r"mkfs\.xfs -m reflink=1 img"):
        XfsStore(tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_xfs_store_refuses_xfs_without_reflinks(xfs_noreflink_mount: Path) -> None:
    with pytest.raises(BuildError, match=r"needs reflink support.*mkfs\.xfs -m reflink=1"):
        XfsStore(xfs_noreflink_mount / "store")
    assert list((xfs_noreflink_mount / "store").iterdir()) == []


def test_missing_tool_names_the_package(
        tmp_path: Path, btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool, match="rsync not found: apt-get install rsync"):
        RsyncStore(tmp_path / "store")
    with pytest.raises(MissingTool, match="btrfs not found: apt-get install btrfs-progs"):
        BtrfsStore(btrfs_mount / "store")


@pytest.mark.parametrize(("spec", "message"), [
    ("rsync", "expected KIND:PATH with KIND one of btrfs, overlayfs, xfs, rsync"),
    ("rsync:", "expected KIND:PATH"),
    ("zfs:/tmp", "unknown store kind 'zfs'"),
    ("rsync:/does/not/exist", "store directory /does/not/exist does not exist"),
])
def test_open_store_errors(spec: str, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        open_store(spec)


def test_open_store_rsync_modes(tmp_path: Path) -> None:
    store = open_store(f"rsync:{tmp_path}", rsync_mode="hardlink")
    assert isinstance(store, RsyncStore)
    assert isinstance(store, Store)
    assert store.mode == "hardlink"
    with pytest.raises(BuildError, match="unknown rsync mode 'bogus'"):
        open_store(f"rsync:{tmp_path}", rsync_mode="bogus")


async def test_rsync_hardlink_mode_shares_only_unchanged_files(tmp_path: Path) -> None:
    store = RsyncStore(tmp_path, "hardlink")
    await store.build(None, "base", writes({"same": "same", "edited": "one"}))
    await store.build("base", "child", writes({"edited": "two"}))
    base, child = await store.result("base"), await store.result("child")
    assert base is not None and child is not None
    assert (child / "rootfs" / "same").stat().st_ino == (base / "rootfs" / "same").stat().st_ino
    assert (child / "rootfs" / "edited").stat().st_ino != (
        base / "rootfs" / "edited").stat().st_ino
    assert (base / "rootfs" / "edited").read_text() == "one"
