"""Each combinator, evaluated by the real engine, and incremental re-evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pipeline as p
from pipeline.output import Active, Failed, Ok


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


async def settle(engine: p.Engine) -> Any:
    await engine.wait_idle()
    return engine.root_output()


async def value_of(root: p.Term[Any], state_dir: Path) -> Any:
    async with p.Engine(root, state_dir=state_dir) as engine:
        return await settle(engine)


class Counter:
    """A pure function that counts its calls."""

    def __init__(self, f: Any = lambda x: x) -> None:
        self.calls: list[Any] = []
        self.f = f
        self.__name__ = "counted"

    def __call__(self, x: Any) -> Any:
        self.calls.append(x)
        return self.f(x)


async def test_const_and_map(state_dir: Path) -> None:
    assert await value_of(p.const(20).map(lambda x: x + 1), state_dir) == Ok(21)


async def test_map_exception_fails_at_that_node_and_blocks_downstream(state_dir: Path) -> None:
    broken = p.const(1).map(lambda x: 1 // 0, label="divide")
    after = broken.map(str, label="show")
    async with p.Engine(after, state_dir=state_dir) as engine:
        out = await settle(engine)
        assert isinstance(out, Failed)
        assert "ZeroDivisionError" in out.message
        assert engine.node_for(broken).state == "failed"
        assert engine.node_for(after).state == "blocked"


async def test_pair(state_dir: Path) -> None:
    assert await value_of(p.pair(p.const("a"), p.const(2)), state_dir) == Ok(("a", 2))


async def test_all_names_the_failed_inputs(state_dir: Path) -> None:
    root = p.all_labelled({
        "alpine": p.fail("disk full"),
        "debian": p.fail("disk full"),
        "ubuntu": p.const(3),
        "fedora": p.fail("timeout"),
    })
    out = await value_of(root, state_dir)
    assert out == Failed("alpine, debian failed: disk full; fedora failed: timeout", out.origin)


async def test_all_uses_term_labels(state_dir: Path) -> None:
    root = p.all(p.const(1), p.fail("no").map(str, label="debian"))
    out = await value_of(root, state_dir)
    assert isinstance(out, Failed) and out.message == "debian failed: no"
    assert await value_of(p.all(p.const(1), p.const(2)), state_dir) == Ok([1, 2])


async def test_pair_prefers_failure_over_pending(state_dir: Path) -> None:
    pending = p.Variable(label="waiting")
    pending.output = Active("running")
    out = await value_of(p.pair(pending, p.fail("broken")), state_dir)
    assert isinstance(out, Failed)


async def test_bind_builds_and_tears_down_subgraphs(state_dir: Path) -> None:
    source = p.Variable(1, label="source")
    built: list[p.Term[Any]] = []

    def make(n: int) -> p.Term[int]:
        sub = p.const(n).map(lambda x: x * 10, label=f"times-ten-{n}")
        built.append(sub)
        return sub

    root = p.bind(make, source, label="dynamic")
    async with p.Engine(root, state_dir=state_dir) as engine:
        assert await settle(engine) == Ok(10)
        first = built[-1]
        assert engine.node_for(first) is not None
        source.set(2)
        assert await settle(engine) == Ok(20)
        assert engine.node_for(first) is None, "the old sub-graph is torn down"
        assert len(built) == 2
        source.set(2)
        await settle(engine)
        assert len(built) == 2, "an unchanged value does not rebuild"


async def test_bind_returning_a_non_term_fails(state_dir: Path) -> None:
    out = await value_of(p.bind(lambda x: x, p.const(3), label="oops"), state_dir)
    assert isinstance(out, Failed) and "not a Term" in out.message


async def test_list_map_creates_one_subpipeline_per_key_and_reuses_it(state_dir: Path) -> None:
    items = p.Variable(["a", "b"], label="items")
    made: list[str] = []
    calls = Counter(str.upper)

    def per_item(item: p.Term[str]) -> p.Term[str]:
        made.append("sub")
        return item.map(calls, label="upper")

    root = p.list_map(per_item, items)
    async with p.Engine(root, state_dir=state_dir) as engine:
        assert await settle(engine) == Ok(["A", "B"])
        assert len(made) == 2
        items.set(["b", "c", "a"])
        assert await settle(engine) == Ok(["B", "C", "A"])
        assert len(made) == 3, "only the new key gets a new sub-pipeline"
        assert calls.calls == ["a", "b", "c"], "unchanged items are not re-evaluated"
        items.set(["c"])
        assert await settle(engine) == Ok(["C"])
        live_items = [n for n in engine.nodes() if n.term.kind == "item"]
        assert len(live_items) == 1, "sub-pipelines of removed keys are torn down"


async def test_list_map_with_key_function_updates_item_in_place(state_dir: Path) -> None:
    items = p.Variable([("a", 1), ("b", 1)], label="items")
    made: list[int] = []

    def per_item(item: p.Term[tuple[str, int]]) -> p.Term[str]:
        made.append(1)
        return item.map(lambda it: f"{it[0]}{it[1]}", label="show")

    root = p.list_map(per_item, items, key=lambda it: it[0])
    async with p.Engine(root, state_dir=state_dir) as engine:
        assert await settle(engine) == Ok(["a1", "b1"])
        items.set([("a", 1), ("b", 2)])
        assert await settle(engine) == Ok(["a1", "b2"])
        assert len(made) == 2, "a changed item keeps its sub-pipeline"


async def test_list_map_duplicate_keys_fail(state_dir: Path) -> None:
    root = p.list_map(lambda item: item, p.const(["x", "x"]), label="dups")
    out = await value_of(root, state_dir)
    assert isinstance(out, Failed) and "duplicate key 'x'" in out.message


async def test_list_map_failure_names_items(state_dir: Path) -> None:
    def check(item: p.Term[str]) -> p.Term[str]:
        return item.map(lambda s: s if s != "bad" else 1 // 0, label="check")

    out = await value_of(p.list_map(check, p.const(["ok", "bad"])), state_dir)
    assert isinstance(out, Failed) and out.message.startswith("bad failed: ZeroDivisionError")


async def test_option_map(state_dir: Path) -> None:
    source: p.Variable[str | None] = p.Variable(None, label="maybe")
    root = p.option_map(lambda t: t.map(str.upper, label="upper"), source)
    async with p.Engine(root, state_dir=state_dir) as engine:
        assert await settle(engine) == Ok(None)
        source.set("x")
        assert await settle(engine) == Ok("X")
        source.set(None)
        assert await settle(engine) == Ok(None)
        assert not [n for n in engine.nodes() if n.term.kind == "item"]


async def test_gate_holds_until_on_is_ok(state_dir: Path) -> None:
    approval = p.Variable(label="approval", unset=True)
    root = p.gate(p.const("deploy"), on=approval)
    async with p.Engine(root, state_dir=state_dir) as engine:
        out = await settle(engine)
        assert isinstance(out, Failed) and out.message == "Variable not set"
        assert engine.node_for(root).state == "blocked"
        approval.set(True)
        assert await settle(engine) == Ok("deploy")


async def test_component_and_collapse_pass_values(state_dir: Path) -> None:
    source = p.const(2)
    inner = source.map(lambda x: x + 1)
    root = p.component("named", p.collapse("k", "v", input=source, output=inner))
    assert await value_of(root, state_dir) == Ok(3)


async def test_state_and_catch(state_dir: Path) -> None:
    broken = p.fail("nope")
    assert await value_of(p.state(broken), state_dir) == Ok(Failed("nope", 0))
    caught = await value_of(p.catch(broken), state_dir)
    assert isinstance(caught, Ok) and isinstance(caught.value, Failed)
    assert caught.value.message == "nope"
    assert await value_of(p.catch(p.const(1)), state_dir) == Ok(Ok(1))


async def test_catch_stays_pending_while_input_is(state_dir: Path) -> None:
    pending = p.Variable(label="pending")
    pending.output = Active("running")
    assert isinstance(await value_of(p.catch(pending), state_dir), Active)


async def test_cutoff_stops_propagation(state_dir: Path) -> None:
    source = p.Variable(10, label="n")
    downstream = Counter()
    root = p.cutoff(source, lambda a, b: a // 10 == b // 10).map(downstream, label="after")
    async with p.Engine(root, state_dir=state_dir) as engine:
        await settle(engine)
        source.set(15)
        assert await settle(engine) == Ok(10), "equal under eq: the old value stays"
        source.set(25)
        assert await settle(engine) == Ok(25)
        assert downstream.calls == [10, 25]


async def test_equal_values_stop_propagation(state_dir: Path) -> None:
    source = p.Variable(3, label="n")
    parity = source.map(lambda x: x % 2, label="parity")
    after = Counter()
    root = parity.map(after, label="after")
    async with p.Engine(root, state_dir=state_dir) as engine:
        await settle(engine)
        source.set(5)
        await settle(engine)
        assert after.calls == [1], "parity did not change, so `after` was not re-run"


async def test_change_reevaluates_only_downstream(state_dir: Path) -> None:
    left = p.Variable(1, label="left")
    right_calls = Counter()
    right = p.const(5).map(right_calls, label="right")
    root = p.pair(left.map(lambda x: x + 1, label="inc"), right)
    async with p.Engine(root, state_dir=state_dir) as engine:
        await settle(engine)
        before = engine.evaluations
        left.set(2)
        assert await settle(engine) == Ok((3, 5))
        assert engine.evaluations - before == 3, "left, inc and pair; not right"
        assert right_calls.calls == [5]


async def test_shared_term_is_one_node(state_dir: Path) -> None:
    calls = Counter()
    shared = p.const(1).map(calls, label="shared")
    root = p.pair(shared.map(str), shared.map(float))
    assert await value_of(root, state_dir) == Ok(("1", 1.0))
    assert calls.calls == [1]


async def test_variable_fail(state_dir: Path) -> None:
    var = p.Variable(1, label="v")
    async with p.Engine(var, state_dir=state_dir) as engine:
        await settle(engine)
        var.fail("gone")
        out = await settle(engine)
        assert isinstance(out, Failed) and out.message == "gone"
        assert engine.node_for(var).state == "failed"


async def test_cycle_through_bind_is_reported_with_its_location(state_dir: Path) -> None:
    source = p.const(1)
    holder: dict[str, p.Term[Any]] = {}
    looped = p.bind(lambda _: holder["after"], source, label="loop")
    holder["after"] = looped.map(lambda x: x, label="after")
    async with p.Engine(holder["after"], state_dir=state_dir) as engine:
        with pytest.raises(p.CycleError) as info:
            await engine.wait_idle()
    assert f"{__file__}:" in str(info.value)
    assert "'loop' depends on 'after'" in str(info.value)


def test_non_term_input_is_rejected() -> None:
    with pytest.raises(TypeError, match="expected a Term"):
        p.pair(p.const(1), 2)  # type: ignore[arg-type]


async def test_long_chain_does_not_hit_recursion_limit(state_dir: Path) -> None:
    term: p.Term[int] = p.const(0)
    for _ in range(5000):
        term = term.map(lambda x: x + 1, label="inc")
    assert await value_of(term, state_dir) == Ok(5000)
