"""How a submission orders its events, with an in-memory event source standing in for Dask's
events topic (the real topic is in test_cluster_client.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from pipeline.cluster.client import ClusterBuild, LogGap, new_request
from pipeline.cluster.protocol import BuildEvent, event_from_message, event_message


def request_and_build() -> ClusterBuild:
    return ClusterBuild(new_request("spec", source=None, pool="pool", cache_hint=None,
                                    urgent=False, client="test"))


def chunks(build: ClusterBuild, count: int) -> list[BuildEvent]:
    return [BuildEvent(build.request.request_id, "log", "w", seq, f"chunk {seq}\n".encode())
            for seq in range(count)]


async def drain(build: ClusterBuild) -> list[BuildEvent]:
    return [event async for event in build]


async def test_chunks_arriving_in_any_order_come_out_in_order_with_none_lost() -> None:
    build = request_and_build()
    sent = chunks(build, 200)
    shuffled = random.Random(15).sample(sent, len(sent))
    build.deliver(BuildEvent(build.request.request_id, "started", "w1"))
    for event in shuffled:
        build.deliver(event)
    await build.settle(0.1)
    build.end("result")
    events = await drain(build)
    assert events[0].kind == "started" and build.worker == "w1"
    assert events[1:] == sent
    assert await build.result() == "result"


async def test_a_chunk_delivered_twice_is_passed_on_once() -> None:
    build = request_and_build()
    first, second = chunks(build, 2)
    for event in (first, first, second, first, second):
        build.deliver(event)
    build.end("result")
    assert await drain(build) == [first, second]


async def test_a_gap_that_fills_while_settling_is_no_error() -> None:
    build = request_and_build()
    zero, one, two = chunks(build, 3)
    build.deliver(zero)
    build.deliver(two)
    asyncio.get_running_loop().call_later(0.05, build.deliver, one)
    await build.settle(5)
    build.end("result")
    assert await drain(build) == [zero, one, two]


async def test_a_gap_that_never_fills_fails_naming_the_missing_chunks() -> None:
    build = request_and_build()
    sent = chunks(build, 6)
    for event in sent[:2] + sent[4:]:
        build.deliver(event)
    with pytest.raises(LogGap, match=r"lost chunks 2\.\.3"):
        await build.settle(0.05)


async def test_a_resubmission_counts_its_chunks_from_zero_again() -> None:
    build = request_and_build()
    build.deliver(chunks(build, 3)[2])  # an early chunk of a submission that is then lost
    build.resubmitted(new_request("spec", source=None, pool="pool", cache_hint=None,
                                  urgent=False, client="test"))
    again = chunks(build, 2)
    for event in again:
        build.deliver(event)
    await build.settle(0.05)
    build.end("result")
    assert await drain(build) == again


def test_an_event_travels_as_a_message_dask_can_carry_and_comes_back_whole() -> None:
    event = BuildEvent("r", "log", "worker-1", 4, b"data")
    message = event_message(event)
    # The scheduler puts the sender's address in a message's top-level "worker".
    carried = {**message, "worker": "tcp://127.0.0.1:1"}
    assert event_from_message(carried) == event
