"""The store's cross-process locks (`pipeline/obuilder/locks.py`) on real files, with real
processes for what only death shows, and how the result table uses them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.locks import FileLock, LockDir, Owner, if_free, is_live_owner
from pipeline.obuilder.stores.rsync import RsyncStore

FAR_FUTURE = datetime(3000, 1, 1, tzinfo=UTC)
HOLDER = """
import sys, time
from pathlib import Path
from pipeline.obuilder.locks import FileLock, Owner
lock = FileLock(Path(sys.argv[1]))
assert lock.try_acquire()
owner = Owner(Path(sys.argv[2]))
print(owner.token, flush=True)
time.sleep(1000)
"""


def test_exclusive_excludes_everyone_shared_excludes_only_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    first, second = FileLock(path), FileLock(path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert not FileLock(path, shared=True).try_acquire()
    first.release()
    assert not path.exists(), "an exclusive holder removes the file on release"
    readers = [FileLock(path, shared=True) for _ in range(2)]
    assert all(reader.try_acquire() for reader in readers)
    assert not second.try_acquire()
    for reader in readers:
        reader.release()
    assert path.exists(), "shared holders leave the file"
    assert second.try_acquire()
    second.release()


async def test_a_waiter_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    holder, waiter = FileLock(tmp_path / "lock"), FileLock(tmp_path / "lock")
    await holder.acquire()
    waiting = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    holder.release()
    await asyncio.wait_for(waiting, 60)
    assert waiter.held
    # The file the waiter holds is the one at the path (not the one the holder removed).
    assert not FileLock(tmp_path / "lock").try_acquire()
    waiter.release()


async def test_cancelling_a_waiter_leaves_nothing_held(tmp_path: Path) -> None:
    holder, waiter = FileLock(tmp_path / "lock"), FileLock(tmp_path / "lock")
    await holder.acquire()
    waiting = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not waiter.held
    holder.release()
    assert LockDir(tmp_path).is_free("lock")


def test_if_free_holds_only_a_free_lock(tmp_path: Path) -> None:
    locks = LockDir(tmp_path)
    holder = locks.lock("x")
    assert holder.try_acquire()
    with if_free(locks.lock("x")) as free:
        assert not free
    holder.release()
    with if_free(locks.lock("x")) as free:
        assert free
        assert not locks.is_free("x")
    assert locks.is_free("x")


def test_a_dead_process_holds_nothing(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "lock"),
                                str(owners)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        token = process.stdout.readline().strip()
        assert token
        assert not LockDir(tmp_path).is_free("lock")
        assert is_live_owner(owners, token)
    finally:
        process.kill()
        process.wait()
    assert LockDir(tmp_path).is_free("lock")
    assert not is_live_owner(owners, token)
    assert not (owners / token).exists(), "asking removed the dead owner's file"


def test_owner_tokens_are_distinct_and_released(tmp_path: Path) -> None:
    first, second = Owner(tmp_path), Owner(tmp_path)
    assert first.token != second.token
    assert is_live_owner(tmp_path, first.token) and is_live_owner(tmp_path, second.token)
    first.release()
    assert not is_live_owner(tmp_path, first.token)
    assert is_live_owner(tmp_path, second.token)
    second.release()


async def made(tmp: Path) -> None:
    (tmp / "rootfs").mkdir()


async def test_prune_and_clean_leave_alone_what_another_process_holds(tmp_path: Path) -> None:
    db = DbStore(RsyncStore(tmp_path))
    await db.clean()
    for id in ("a", "b"):
        async with db.lock(id):
            await db.build(None, id, made)
    # Another process (another lock object) holds "a": building on it, say.
    other = FileLock(tmp_path / "state" / "lock" / "step" / "a", shared=True)
    assert other.try_acquire()
    assert await db.prune(FAR_FUTURE) == ["b"]
    assert await db.result("a") is not None
    other.release()
    assert await db.prune(FAR_FUTURE) == ["a"]

    # A result committed but not yet recorded by a live process: start-up keeps it.
    committing = db.lock("c")
    await committing.acquire()
    await db.store.build(None, "c", made)
    await db.clean()
    assert await db.result("c") is not None
    committing.release()
    # Once nobody holds it, it is what a crash left: deleted.
    await db.clean()
    assert await db.result("c") is None
    db.close()
