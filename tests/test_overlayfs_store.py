"""The overlayfs store on a real tmpfs: layers, merged views, flattening, crashes, caches."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.obuilder.protocols import BuildError, Store
from pipeline.obuilder.stores.overlayfs import MAX_DEPTH, OverlayfsStore


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                           line.split()[4])
            if (point + "/").startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


@pytest.fixture
def root(tmpfs_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the session's tmpfs; views left mounted are unmounted after."""
    directory = tmpfs_mount / f"overlayfs-{request.node.name}"
    directory.mkdir()
    yield directory / "store"
    for point in mounts_under(directory):
        subprocess.run(["umount", "--lazy", point], check=True)
    shutil.rmtree(directory)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def chroot(rootfs: Path, command: str) -> bytes:
    """Run `command` with busybox's sh as root in `rootfs`; its output."""
    process = await asyncio.create_subprocess_exec(
        "chroot", str(rootfs), "/bin/sh", "-c", command, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 0, output
    return output


def lower(root: Path, id: str) -> list[str]:
    """The layers recorded beneath result `id`."""
    return (root / "layer" / id / "lower").read_text().splitlines()


def assert_no_build_left(root: Path) -> None:
    assert listing(root / "result-tmp") == []
    assert listing(root / "layer-tmp") == []
    assert mounts_under(root / "result-tmp") == []
    assert mounts_under(root / "layer-tmp") == []


async def test_build_and_result(root: Path) -> None:
    store = OverlayfsStore(root)
    assert isinstance(store, Store)
    seen: list[list[str]] = []

    async def first(tmp: Path) -> None:
        seen.append(listing(tmp))
        (tmp / "rootfs").mkdir()
        os.chmod(tmp / "rootfs", 0o711)
        write(tmp / "rootfs" / "etc" / "motd", "hello\n")
        write(tmp / "log", "first log\n")
        write(tmp / "env.json", "{}")

    await store.build(None, "a", first)
    assert seen == [[]]  # with no base, tmpdir starts empty
    assert await store.result("missing") is None
    a = await store.result("a")
    assert a == root / "result" / "a"
    assert (a / "rootfs" / "etc" / "motd").read_text() == "hello\n"
    assert store.log_file("a").read_text() == "first log\n"
    assert store.log_file("a") == a / "log"

    async def second(tmp: Path) -> None:
        # A snapshot of the base's result directory: its files and its rootfs.
        seen.append(listing(tmp))
        assert (tmp / "env.json").read_text() == "{}"
        assert (tmp / "rootfs" / "etc" / "motd").read_text() == "hello\n"
        assert (tmp / "rootfs").stat().st_mode & 0o7777 == 0o711
        write(tmp / "rootfs" / "etc" / "motd", "changed\n")
        write(tmp / "rootfs" / "usr" / "new", "new\n")
        write(tmp / "log", "second log\n")

    await store.build("a", "b", second)
    assert seen[1] == ["env.json", "log", "rootfs"]
    b = await store.result("b")
    assert b is not None
    assert (b / "rootfs" / "etc" / "motd").read_text() == "changed\n"
    assert (b / "rootfs" / "usr" / "new").read_text() == "new\n"
    assert (b / "rootfs").stat().st_mode & 0o7777 == 0o711
    assert store.log_file("b").read_text() == "second log\n"
    # The base is unchanged, and b's layer holds only what b changed.
    assert (a / "rootfs" / "etc" / "motd").read_text() == "hello\n"
    assert not (a / "rootfs" / "usr").exists()
    assert listing(root / "layer" / "b" / "diff") == ["etc", "usr"]
    assert lower(root, "b") == ["a"]
    assert_no_build_left(root)


async def test_looking_a_result_up_mounts_nothing(root: Path) -> None:
    store = OverlayfsStore(root)

    async def make(tmp: Path) -> None:
        write(tmp / "rootfs" / "f", "f\n")

    await store.build(None, "a", make)
    await store.build("a", "b", make)
    assert await store.has_result("b") and not await store.has_result("missing")
    assert mounts_under(root) == []
    # `result` mounts the view, to make the rootfs readable.
    b = await store.result("b")
    assert b is not None and (b / "rootfs" / "f").read_text() == "f\n"
    assert mounts_under(root) == [str(b / "rootfs")]
    store.close()
    assert mounts_under(root) == []


async def test_chain_deletes_and_replaces(root: Path, busybox_rootfs: Path) -> None:
    """Layer 3 deletes a file of layer 1, replaces a directory with a directory and another
    with a file, all by commands run in the merged rootfs; each result shows its own state."""
    store = OverlayfsStore(root)

    async def one(tmp: Path) -> None:
        await asyncio.to_thread(shutil.copytree, busybox_rootfs, tmp / "rootfs", symlinks=True)
        await chroot(tmp / "rootfs", "echo one > /etc/f1 && mkdir -p /d/sub /e && "
                     "echo x > /d/x && echo y > /d/sub/y && echo e > /e/e && echo k > /keep")

    async def two(tmp: Path) -> None:
        await chroot(tmp / "rootfs", "echo two > /etc/f2 && echo changed > /keep")

    async def three(tmp: Path) -> None:
        await chroot(tmp / "rootfs", "rm /etc/f1 && rm -r /d && mkdir /d && echo z > /d/z && "
                     "rm -r /e && echo file > /e")

    await store.build(None, "one", one)
    await store.build("one", "two", two)
    await store.build("two", "three", three)

    r1, r2, r3 = [await store.result(id) for id in ("one", "two", "three")]
    assert r1 is not None and r2 is not None and r3 is not None
    fs3 = r3 / "rootfs"
    assert not (fs3 / "etc" / "f1").exists()
    assert (fs3 / "etc" / "f2").read_text() == "two\n"
    assert listing(fs3 / "d") == ["z"]
    assert (fs3 / "e").read_text() == "file\n"
    assert (fs3 / "keep").read_text() == "changed\n"
    assert await chroot(fs3, "cat /d/z /keep; ls /d") == b"z\nchanged\nz\n"
    # The bases are unchanged.
    fs2, fs1 = r2 / "rootfs", r1 / "rootfs"
    assert (fs2 / "etc" / "f1").read_text() == "one\n"
    assert listing(fs2 / "d") == ["sub", "x"]
    assert (fs2 / "e" / "e").read_text() == "e\n"
    assert not (fs1 / "etc" / "f2").exists()
    assert (fs1 / "keep").read_text() == "k\n"
    # Layer three is a diff: none of busybox is in it.
    assert not (root / "layer" / "three" / "diff" / "bin").exists()
    assert lower(root, "three") == ["two", "one"]


def step_id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


async def build_chain(store: OverlayfsStore, ids: list[str]) -> None:
    """Build `ids` one on the other; step n adds n/N and rewrites `count` to n."""
    for n, id in enumerate(ids):
        async def step(tmp: Path, n: int = n) -> None:
            (tmp / "rootfs" / "n").mkdir(parents=True, exist_ok=True)
            write(tmp / "rootfs" / "n" / str(n), "")
            write(tmp / "rootfs" / "count", str(n))

        await store.build(ids[n - 1] if n else None, id, step)


async def check_chain(store: OverlayfsStore, ids: list[str]) -> None:
    for n, id in enumerate(ids):
        result = await store.result(id)
        assert result is not None
        assert (result / "rootfs" / "count").read_text() == str(n)
        assert listing(result / "rootfs" / "n") == sorted(str(i) for i in range(n + 1))


async def test_chain_of_60_builds(root: Path) -> None:
    """Deeper than MAX_DEPTH: the build on a base that deep is flattened, and every result
    (including those beyond) shows the whole history."""
    store = OverlayfsStore(root)
    ids = [step_id(n) for n in range(60)]
    await build_chain(store, ids)
    await check_chain(store, ids)
    depths = [len(lower(root, id)) + 1 for id in ids]
    assert max(depths) == MAX_DEPTH
    assert [n for n, depth in enumerate(depths) if depth == 1] == [0, MAX_DEPTH]
    # The flattened layer is a full copy; the next one is a diff on it again.
    assert len(listing(root / "layer" / ids[MAX_DEPTH] / "diff" / "n")) == MAX_DEPTH + 1
    assert listing(root / "layer" / ids[MAX_DEPTH + 1] / "diff" / "n") == [str(MAX_DEPTH + 1)]


async def test_long_ids_are_flattened_before_the_options_overflow(root: Path) -> None:
    """With 200-character ids, a page of mount options holds fewer than MAX_DEPTH layers: the
    store flattens earlier rather than let the kernel truncate the options (which it does
    silently, losing layers)."""
    store = OverlayfsStore(root)
    ids = [f"{n:03d}" * 66 + "id" for n in range(30)]
    await build_chain(store, ids)
    await check_chain(store, ids)
    depths = [len(lower(root, id)) + 1 for id in ids]
    assert max(depths) < MAX_DEPTH
    assert depths.count(1) >= 2


@pytest.mark.parametrize("with_base", [False, True])
async def test_failure_is_not_saved(root: Path, with_base: bool) -> None:
    store = OverlayfsStore(root)
    base = None
    if with_base:
        base = "base"
        await store.build(None, base, lambda tmp: asyncio.to_thread(
            write, tmp / "rootfs" / "file", "base\n"))

    async def failing(tmp: Path) -> None:
        write(tmp / "rootfs" / "file", "broken\n")
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        await store.build(base, "step", failing)
    assert await store.result("step") is None
    assert_no_build_left(root)
    assert not (root / "layer" / "step").exists()

    started = asyncio.Event()

    async def hanging(tmp: Path) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(store.build(base, "step", hanging))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.result("step") is None
    assert_no_build_left(root)

    # A later attempt can succeed; the base is untouched.
    async def working(tmp: Path) -> None:
        write(tmp / "rootfs" / "other", "ok\n")

    await store.build(base, "step", working)
    result = await store.result("step")
    assert result is not None
    assert (result / "rootfs" / "other").read_text() == "ok\n"
    if base is not None:
        base_dir = await store.result(base)
        assert base_dir is not None
        assert (base_dir / "rootfs" / "file").read_text() == "base\n"
        assert (result / "rootfs" / "file").read_text() == "base\n"


async def test_missing_base_is_an_error(root: Path) -> None:
    store = OverlayfsStore(root)
    with pytest.raises(BuildError, match="nope does not exist"):
        await store.build("nope", "step", lambda tmp: asyncio.sleep(0))
    assert_no_build_left(root)


CRASH = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from pipeline.obuilder.stores.overlayfs import OverlayfsStore

    async def main() -> None:
        store = OverlayfsStore(Path(sys.argv[1]))

        async def crash(tmp: Path) -> None:
            (tmp / "rootfs" / "half").write_text("written before the crash")
            os._exit(3)

        async with store.cache("c", 0, 0) as copy:
            (copy / "half").write_text("never released")
            await store.build("base", "child", crash)

    asyncio.run(main())
""")


async def test_clean_after_a_crash_with_mounts_left(root: Path) -> None:
    store = OverlayfsStore(root)
    await store.build(None, "base", lambda tmp: asyncio.to_thread(
        write, tmp / "rootfs" / "file", "base\n"))
    crashed = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASH, str(root))
    assert await crashed.wait() == 3
    # The crash left a mounted build, its layer and a cache copy; and say an earlier crash
    # came between the two renames of a commit (a layer with no result).
    assert mounts_under(root / "result-tmp") == [str(root / "result-tmp" / "child" / "rootfs")]
    assert listing(root / "layer-tmp") == ["child"]
    assert len(listing(root / "cache-tmp")) == 1
    (root / "layer" / "orphan" / "diff").mkdir(parents=True)

    restarted = OverlayfsStore(root)
    await restarted.clean()
    assert_no_build_left(root)
    assert listing(root / "cache-tmp") == []
    assert listing(root / "layer") == ["base"]
    base = await restarted.result("base")
    assert base is not None and (base / "rootfs" / "file").read_text() == "base\n"

    await restarted.build("base", "child", lambda tmp: asyncio.sleep(0))
    child = await restarted.result("child")
    assert child is not None
    assert listing(child / "rootfs") == ["file"]
    async with restarted.cache("c", 0, 0) as copy:
        assert listing(copy) == []


async def test_delete(root: Path) -> None:
    store = OverlayfsStore(root)
    await build_chain(store, ["a", "b", "c"])
    b = await store.result("b")
    assert b is not None and (b / "rootfs" / "count").read_text() == "1"

    await store.delete("c")  # never mounted
    await store.delete("b")  # mounted: unmounted first
    assert await store.result("b") is None
    assert await store.result("c") is None
    assert mounts_under(root / "result") == []
    assert listing(root / "result") == ["a"]
    assert listing(root / "layer") == ["a"]
    assert listing(root / "view") == []
    assert listing(root / "result-tmp") == []
    await store.delete("b")  # deleting what is gone does nothing

    # A result whose base was deleted cannot be mounted: the caller deletes descendants.
    await store.build("a", "b", lambda tmp: asyncio.sleep(0))
    await store.build("b", "c", lambda tmp: asyncio.sleep(0))
    await store.delete("b")
    with pytest.raises(BuildError, match="built on b, which was deleted"):
        await store.result("c")
    await store.delete("c")
    a = await store.result("a")
    assert a is not None and (a / "rootfs" / "count").read_text() == "0"


async def test_writes_into_a_view_reach_no_result(root: Path) -> None:
    store = OverlayfsStore(root)
    await build_chain(store, ["a"])
    a = await store.result("a")
    assert a is not None
    write(a / "rootfs" / "scratch", "not part of a\n")
    (a / "rootfs" / "count").unlink()

    seen: list[list[str]] = []

    async def step(tmp: Path) -> None:
        seen.append(listing(tmp / "rootfs"))

    await store.build("a", "b", step)
    b = await store.result("b")
    assert b is not None
    assert seen == [["count", "n"]]
    assert listing(b / "rootfs") == ["count", "n"]
    assert listing(root / "layer" / "a" / "diff") == ["count", "n"]


async def test_concurrent_views_and_builds(root: Path) -> None:
    store = OverlayfsStore(root)
    await build_chain(store, ["a"])
    results = await asyncio.gather(*(store.result("a") for _ in range(5)))
    assert set(results) == {root / "result" / "a"}
    assert mounts_under(root / "result") == [str(root / "result" / "a" / "rootfs")]

    both_running = asyncio.Barrier(2)

    async def step(tmp: Path, name: str) -> None:
        await both_running.wait()
        write(tmp / "rootfs" / name, name)

    await asyncio.gather(store.build("a", "b", lambda t: step(t, "b")),
                         store.build("a", "c", lambda t: step(t, "c")))
    b, c = await store.result("b"), await store.result("c")
    assert b is not None and c is not None
    assert listing(b / "rootfs") == ["b", "count", "n"]
    assert listing(c / "rootfs") == ["c", "count", "n"]


async def test_cache_ownership_and_persistence(root: Path) -> None:
    store = OverlayfsStore(root)
    async with store.cache("opam", 1000, 1000) as copy:
        info = copy.stat()
        assert (info.st_uid, info.st_gid) == (1000, 1000)
        assert listing(copy) == []
        write(copy / "archive", "v1")
        os.chown(copy / "archive", 1000, 1000)
    assert listing(root / "cache-tmp") == []

    # Still there for a later build, and for a later process; ownership is the cache's own.
    again = OverlayfsStore(root)
    async with again.cache("opam", 0, 0) as copy:
        assert (copy / "archive").read_text() == "v1"
        assert copy.stat().st_uid == 1000
        assert (copy / "archive").stat().st_uid == 1000


async def test_cache_last_writer_wins(root: Path) -> None:
    store = OverlayfsStore(root)
    async with store.cache("c", 0, 0) as copy:
        write(copy / "version", "0")
    first_in, second_in = asyncio.Event(), asyncio.Event()
    first_out = asyncio.Event()

    async def writer(name: str, entered: asyncio.Event, wait: asyncio.Event) -> None:
        async with store.cache("c", 0, 0) as copy:
            assert (copy / "version").read_text() == "0"  # both start from what they saw
            write(copy / "version", name)
            write(copy / name, "")
            entered.set()
            await wait.wait()

    first = asyncio.create_task(writer("first", first_in, second_in))
    await first_in.wait()
    second = asyncio.create_task(writer("second", second_in, first_out))
    await second_in.wait()
    await first  # releases first
    first_out.set()
    await second  # releases last
    async with store.cache("c", 0, 0) as copy:
        assert (copy / "version").read_text() == "second"
        assert listing(copy) == ["second", "version"]


async def test_cache_exception_discards_and_delete(root: Path) -> None:
    store = OverlayfsStore(root)
    async with store.cache("c", 0, 0) as copy:
        write(copy / "kept", "")
    with pytest.raises(RuntimeError):
        async with store.cache("c", 0, 0) as copy:
            write(copy / "discarded", "")
            raise RuntimeError("failed step")
    async with store.cache("c", 0, 0) as copy:
        assert listing(copy) == ["kept"]
        # Deleted while in use: this copy is discarded on release.
        await store.delete_cache("c")
        write(copy / "late", "")
    assert listing(root / "cache") == []
    assert listing(root / "cache-tmp") == []
    async with store.cache("c", 0, 0) as copy:
        assert listing(copy) == []


async def test_refuses_a_filesystem_without_overlayfs_upper_layers(tmpfs_mount: Path) -> None:
    """A store inside an overlay (a container's root filesystem, say) cannot work."""
    base = tmpfs_mount / "overlay-root"
    for name in ("lower", "upper", "work", "merged"):
        (base / name).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
                    str(base / "merged")], check=True)
    try:
        with pytest.raises(BuildError, match=r"is on overlay; .*mkfs.ext4.*mount -t tmpfs"):
            OverlayfsStore(base / "merged" / "store")
        assert not (base / "merged" / "store").exists()
    finally:
        subprocess.run(["umount", str(base / "merged")], check=True)
        shutil.rmtree(base)


async def test_df(root: Path) -> None:
    usage = await OverlayfsStore(root).df()
    assert usage.total > 0
    assert 0 <= usage.free <= usage.total
