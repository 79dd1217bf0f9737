"""Pool: capacity, FIFO and priority order, cancellation while queued, capacity changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.pool import Pool, PoolSlot


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition` holds (by scheduling steps, never by time)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def queue_in_order(
    pool: Pool, names: list[str], order: list[str], *, high_priority: bool = False
) -> list[asyncio.Task[None]]:
    """Start one acquirer per name, each queued before the next starts; each records its turn."""

    async def acquirer(name: str) -> None:
        with await pool.acquire(high_priority=high_priority):
            order.append(name)

    tasks = []
    for name in names:
        expected = pool.queue_length + 1
        tasks.append(asyncio.create_task(acquirer(name)))
        await until(lambda expected=expected: pool.queue_length == expected)
    return tasks


async def test_free_slot_is_returned_without_queueing() -> None:
    pool = Pool("build", 2)
    slot = await pool.acquire()
    assert isinstance(slot, PoolSlot)
    assert pool.in_use == 1
    assert pool.queue_length == 0
    slot.release()
    assert pool.in_use == 0


async def test_capacity_is_respected_with_many_acquirers() -> None:
    pool = Pool("build", 3)
    holding = 0
    most = 0

    async def worker() -> None:
        nonlocal holding, most
        with await pool.acquire():
            holding += 1
            most = max(most, holding)
            assert pool.in_use <= pool.capacity
            for _ in range(3):
                await asyncio.sleep(0)
            holding -= 1

    await asyncio.gather(*(worker() for _ in range(50)))
    assert most == 3
    assert pool.in_use == 0
    assert pool.queue_length == 0


async def test_waiters_are_served_in_fifo_order() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    order: list[str] = []
    tasks = await queue_in_order(pool, ["a", "b", "c", "d"], order)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d"]


async def test_high_priority_waiters_go_before_earlier_normal_ones() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    order: list[str] = []
    normal = await queue_in_order(pool, ["n1", "n2"], order)
    high = await queue_in_order(pool, ["h1", "h2"], order, high_priority=True)
    assert pool.queue_length == 4
    held.release()
    await asyncio.gather(*normal, *high)
    assert order == ["h1", "h2", "n1", "n2"]


async def test_high_priority_acquirer_does_not_skip_the_queue_when_pool_is_full() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire(high_priority=True))
    await until(lambda: pool.queue_length == 1)
    assert not waiter.done()
    held.release()
    slot = await waiter
    assert pool.in_use == 1
    slot.release()


async def test_cancelled_waiter_leaves_queue_and_takes_no_slot() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    order: list[str] = []
    a, b, c = await queue_in_order(pool, ["a", "b", "c"], order)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert pool.queue_length == 2
    assert pool.in_use == 1
    held.release()
    await asyncio.gather(a, c)
    assert order == ["a", "c"]
    assert pool.in_use == 0
    assert pool.queue_length == 0


async def test_slot_granted_at_moment_of_cancellation_is_handed_back() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 1)
    # The release grants the slot to the waiter, which is cancelled before it can resume.
    held.release()
    assert pool.in_use == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.in_use == 0
    again = await pool.acquire()
    assert pool.in_use == 1
    again.release()


async def test_cancelled_waiter_at_queue_head_is_skipped() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    first = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 1)
    second = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 2)
    # Cancelled but not yet resumed when the slot comes free: the slot must go to `second`.
    first.cancel()
    held.release()
    with pytest.raises(asyncio.CancelledError):
        await first
    slot = await second
    assert pool.in_use == 1
    assert pool.queue_length == 0
    slot.release()


async def test_release_is_idempotent_and_context_manager_releases() -> None:
    pool = Pool("build", 2)
    first = await pool.acquire()
    second = await pool.acquire()
    first.release()
    first.release()
    assert first.released
    assert pool.in_use == 1
    with second as slot:
        assert slot is second
        assert pool.in_use == 1
    assert second.released
    assert pool.in_use == 0


async def test_context_manager_releases_when_the_block_raises() -> None:
    pool = Pool("build", 1)
    with pytest.raises(KeyError), await pool.acquire():
        raise KeyError("boom")
    assert pool.in_use == 0


async def test_growing_capacity_wakes_waiters() -> None:
    pool = Pool("build", 1)
    held = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
    await until(lambda: pool.queue_length == 3)
    pool.set_capacity(3)
    assert pool.in_use == 3
    assert pool.queue_length == 1
    first, second = await waiters[0], await waiters[1]
    assert not waiters[2].done()
    for slot in (held, first, second):
        slot.release()
    (await waiters[2]).release()
    assert pool.in_use == 0


async def test_shrinking_capacity_holds_new_acquirers_until_enough_release() -> None:
    pool = Pool("build", 3)
    slots = [await pool.acquire() for _ in range(3)]
    pool.set_capacity(1)
    assert pool.in_use == 3
    waiter = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 1)
    slots[0].release()
    slots[1].release()
    await asyncio.sleep(0)
    assert pool.queue_length == 1
    assert not waiter.done()
    slots[2].release()
    (await waiter).release()
    assert pool.in_use == 0


async def test_zero_capacity_holds_everyone_until_raised() -> None:
    pool = Pool("paused", 0)
    waiter = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 1)
    pool.set_capacity(1)
    (await waiter).release()


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Pool("build", -1)
    pool = Pool("build", 1)
    with pytest.raises(ValueError, match="capacity"):
        pool.set_capacity(-2)
    assert pool.capacity == 1


async def test_stats_and_repr() -> None:
    pool = Pool("linux-x86_64", 1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await until(lambda: pool.queue_length == 1)
    assert pool.stats() == {
        "name": "linux-x86_64",
        "capacity": 1,
        "in_use": 1,
        "queue_length": 1,
    }
    assert repr(pool) == "<Pool 'linux-x86_64' 1/1 in use, 1 queued>"
    held.release()
    (await waiter).release()
