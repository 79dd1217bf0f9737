"""Live nodes: one per term in use, holding its current output.

A node is evaluated when one of its inputs' outputs changed; it computes its own output from its
inputs' and hands it to the engine, which propagates only real changes. Nodes never do I/O: jobs
and monitor reads run in tasks that feed their results back through the engine.
"""

from __future__ import annotations

import builtins
import dataclasses
import heapq
import itertools
import operator
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline import term as t
from pipeline import usercode
from pipeline.output import Active, Failed, NodeState, Ok, Output

if TYPE_CHECKING:
    from pipeline.engine import Engine
    from pipeline.monitor import Watcher

_UNSET: Any = object()


def error_message(exc: BaseException, *, with_type: bool = True) -> str:
    """The message of an exception raised by user code: `Type: text`, or only its text
    `with_type=False` (the type's name when it has no text).

    The type is half of what a bug says (`KeyError: 'x'`); a monitor's read reports the world
    (a missing repository) in a message written for people, which is then shown alone.
    """
    text = str(exc)
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type else text


class Node:
    """The live instance of a term in an engine."""

    __slots__ = ("dead", "dependents", "dirty", "engine", "height", "inputs", "output", "refcount",
                 "term", "uid")

    def __init__(self, engine: Engine, term: t.Term[Any], inputs: Sequence[Node], uid: int) -> None:
        self.engine = engine
        self.term = term
        self.inputs = tuple(inputs)
        self.uid = uid
        self.dependents: set[Node] = set()
        self.height = 1 + max((i.height for i in inputs), default=-1)
        # Not evaluated yet: drawn as pending until the first evaluation.
        self.output: Output = Active(NodeState.RUNNING)
        self.refcount = 0
        self.dirty = False
        self.dead = False

    def attach(self) -> None:
        """Connect to the outside world (variables, monitors) once the node is registered."""

    def evaluate(self) -> None:
        """Recompute the output from the inputs and hand it to the engine."""
        raise NotImplementedError

    def input_changed(self, node: Node) -> None:
        """`node`, an input or a dynamic dependency, has a new output."""
        self.engine.schedule(self)

    def destroy(self) -> None:
        """Release what the node holds: sub-graphs, watches, jobs. The node is no longer used."""

    def own(self, output: Output) -> Output:
        """`output` with its origin set to this node when it has none yet."""
        if isinstance(output, Failed | Active) and output.origin == -1:
            return dataclasses.replace(output, origin=self.uid)
        return output

    def fail(self, message: str) -> None:
        """Fail here, with `message`."""
        self.engine.set_output(self, Failed(message, self.uid))

    @property
    def state(self) -> NodeState:
        """The diagram state: its job's (ready, running, waiting for confirmation) if its output
        arose here, pending if it waits for an input; failed or blocked likewise for an error."""
        out = self.output
        if isinstance(out, Ok):
            return NodeState.OK
        if isinstance(out, Failed):
            return NodeState.FAILED if out.origin == self.uid else NodeState.BLOCKED
        return out.state if out.origin == self.uid else NodeState.PENDING

    @property
    def job_id(self) -> str | None:
        """The job that produced (or is producing) this node's value, if any."""
        return None

    @property
    def refreshing(self) -> NodeState | None:
        """For a latched node showing its old value while re-running: the new job's state."""
        return None

    def sub_terms(self) -> list[tuple[Hashable, t.Term[Any]]]:
        """The dynamic sub-graphs this node has built, by key (for diagrams)."""
        return []


class ConstNode(Node):
    """A constant."""

    __slots__ = ()
    term: t.Const[Any]

    def evaluate(self) -> None:
        self.engine.set_output(self, Ok(self.term.value))


class FailNode(Node):
    """A constant error."""

    __slots__ = ()
    term: t.Fail

    def evaluate(self) -> None:
        self.fail(self.term.message)


class MapNode(Node):
    """A pure function of one input."""

    __slots__ = ()
    term: t.Map[Any]

    def evaluate(self) -> None:
        out = self.inputs[0].output
        if not isinstance(out, Ok):
            self.engine.set_output(self, out)
            return
        try:
            value = usercode.call(self.term, self.term.f, out.value)
        except Exception as exc:
            self.fail(error_message(exc))
        else:
            self.engine.set_output(self, Ok(value))


def combine(names: Iterable[str], outputs: Sequence[Output]) -> Output | None:
    """The output of a combination when some input is not ok, or None when all are ok.

    Failures win over pending inputs; the message groups the failed inputs by error
    ("alpine, debian failed: disk full").
    """
    failures: dict[str, list[str]] = {}
    first_failed: Failed | None = None
    first_active: Active | None = None
    for name, out in zip(names, outputs, strict=True):
        if isinstance(out, Failed):
            failures.setdefault(out.message, []).append(name)
            first_failed = first_failed or out
        elif isinstance(out, Active) and first_active is None:
            first_active = out
    if first_failed is not None:
        message = "; ".join(f"{', '.join(who)} failed: {msg}" for msg, who in failures.items())
        return Failed(message, first_failed.origin)
    return first_active


class PairNode(Node):
    """Two inputs as a tuple."""

    __slots__ = ()
    term: t.Pair[Any, Any]

    def evaluate(self) -> None:
        outs = [i.output for i in self.inputs]
        problem = combine((i.term.label for i in self.inputs), outs)
        if problem is not None:
            self.engine.set_output(self, problem)
        else:
            self.engine.set_output(self, Ok(tuple(o.value for o in outs)))  # type: ignore[union-attr]


class AllNode(Node):
    """Any number of inputs as a list."""

    __slots__ = ()
    term: t.All[Any]

    def evaluate(self) -> None:
        outs = [i.output for i in self.inputs]
        problem = combine(self.term.names, outs)
        if problem is not None:
            self.engine.set_output(self, problem)
        else:
            self.engine.set_output(self, Ok([o.value for o in outs]))  # type: ignore[union-attr]


class BindNode(Node):
    """A dynamic sub-graph built from the input's value, rebuilt when the value changes."""

    __slots__ = ("bound", "sub")
    term: t.Bind[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.bound: Any = _UNSET
        self.sub: Node | None = None

    def evaluate(self) -> None:
        out = self.inputs[0].output
        if not isinstance(out, Ok):
            self._drop()
            self.engine.set_output(self, out)
            return
        if self.sub is None or not _same(self.bound, out.value):
            try:
                sub_term = usercode.call(self.term, self.term.f, out.value)
            except Exception as exc:
                self._drop()
                self.fail(error_message(exc))
                return
            if not isinstance(sub_term, t.Term):
                self._drop()
                self.fail(f"{self.term.label}: function returned {type(sub_term).__name__}, "
                          "not a Term")
                return
            old = self.sub
            self.sub = self.engine.acquire(sub_term)
            self.bound = out.value
            if old is not None:
                self.engine.remove_dependency(self, old)
                self.engine.release(old)
            if self.engine.add_dependency(self, self.sub):
                return  # our height rose: evaluate again after the sub-graph
        self.engine.set_output(self, self.sub.output)

    def _drop(self) -> None:
        if self.sub is not None:
            old, self.sub, self.bound = self.sub, None, _UNSET
            self.engine.remove_dependency(self, old)
            self.engine.release(old)

    def destroy(self) -> None:
        self._drop()

    def sub_terms(self) -> list[tuple[Hashable, t.Term[Any]]]:
        return [(None, self.sub.term)] if self.sub is not None else []


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


class ItemNode(Node):
    """The current value of one item of a list_map or option_map, set by its owner."""

    __slots__ = ("value",)
    term: t.Item[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.value: Any = _UNSET

    def set_item(self, value: Any) -> None:
        """Give the item a new value (the owner calls this when the list changes)."""
        if self.value is _UNSET or not _same(self.value, value):
            self.value = value
            self.engine.schedule(self)

    def evaluate(self) -> None:
        self.engine.set_output(self, Ok(self.value))


class _Entry:
    """One item's sub-pipeline in a list_map."""

    __slots__ = ("item", "sub")

    def __init__(self, item: ItemNode, sub: Node) -> None:
        self.item = item
        self.sub = sub


class ListMapNode(Node):
    """A sub-pipeline per item key; the output is the list of their values.

    Keeps the combined output incrementally: when one sub-pipeline changes, only its slot is
    updated, so a change costs the same whatever the length of the list.
    """

    __slots__ = ("_active", "_active_heap", "_bad_items", "_changed", "_entries", "_failed",
                 "_item_list", "_items", "_keys_of", "_order", "_outs", "_pos", "_shared",
                 "_values")
    term: t.ListMap[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._items: Any = _UNSET
        self._item_list: list[Any] = []
        self._bad_items: str | None = None
        self._entries: dict[Hashable, _Entry] = {}
        self._order: list[Hashable] = []
        self._pos: dict[Hashable, int] = {}
        self._keys_of: dict[Node, list[Hashable]] = {}
        self._outs: list[Output] = []
        self._values: list[Any] = []
        # True once _values has been handed out in an output: it must be copied before changing.
        self._shared = False
        self._failed: set[Hashable] = set()
        self._active: set[Hashable] = set()
        # Positions of active items, lowest first (stale entries are skipped when read).
        self._active_heap: list[tuple[int, Hashable]] = []
        self._changed: set[Node] = set()

    def input_changed(self, node: Node) -> None:
        if node is not self.inputs[0]:
            self._changed.add(node)
        self.engine.schedule(self)

    def items_of(self, value: Any) -> list[Any]:
        """The items in the input's value."""
        return list(value)

    def evaluate(self) -> None:
        out = self.inputs[0].output
        if not isinstance(out, Ok):
            self._changed.clear()
            self.engine.set_output(self, out)
            return
        if self._items is _UNSET or not _same(self._items, out.value):
            self._items = out.value
            self._changed.clear()
            self._bad_items = None
            try:
                added = self._update_items(self.items_of(out.value))
            except Exception as exc:
                self._bad_items = error_message(exc)
            else:
                if self._depend_on(added):
                    return
        elif self._changed:
            for node in self._changed:
                for key in self._keys_of.get(node, ()):
                    self._store(key, node.output)
            self._changed.clear()
        if self._bad_items is not None:
            self.fail(self._bad_items)
            return
        self.engine.set_output(self, self._combined())

    def _depend_on(self, subs: list[Node]) -> bool:
        """Read the new sub-pipelines; True if that raised this node's height."""
        raised = False
        for sub in subs:
            raised = self.engine.add_dependency(self, sub) or raised
        return raised

    def _key(self, item: Any) -> Hashable:
        return usercode.call(self.term, self.term.key, item) if self.term.key is not None else item

    def _update_items(self, items: list[Any]) -> list[Node]:
        """Follow the new list of items; returns the sub-pipelines created for new keys."""
        if len(items) == len(self._item_list) and self._update_in_place(items):
            self._item_list = items
            return []
        keyed: dict[Hashable, Any] = {}
        for item in items:
            key = self._key(item)
            if key in keyed:
                raise ValueError(f"duplicate key {key!r} in {self.term.label}")
            keyed[key] = item
        for key in [k for k in self._entries if k not in keyed]:
            self._remove(key)
        added: list[Node] = []
        for key, item in keyed.items():
            entry = self._entries.get(key)
            if entry is None:
                entry = self._add(key)
                added.append(entry.sub)
            entry.item.set_item(item)
        self._order = list(keyed)
        self._pos = {key: i for i, key in enumerate(self._order)}
        self._outs = [self._entries[k].sub.output for k in self._order]
        self._values = [o.value if isinstance(o, Ok) else None for o in self._outs]
        self._shared = False
        self._failed = {k for k, o in zip(self._order, self._outs, strict=True)
                        if isinstance(o, Failed)}
        self._active = {k for k, o in zip(self._order, self._outs, strict=True)
                        if isinstance(o, Active)}
        self._active_heap = sorted((self._pos[k], k) for k in self._active)
        self._item_list = items
        return added

    def _update_in_place(self, items: list[Any]) -> bool:
        """Update the items that changed if no key moved; False (and nothing done) otherwise."""
        # Compared in C, so that one changed item in a long list is found quickly.
        changed = list(itertools.compress(range(len(items)),
                                          builtins.map(operator.ne, self._item_list, items)))
        keys = [self._key(items[i]) for i in changed]
        if any(key != self._order[i] for key, i in zip(keys, changed, strict=True)):
            return False
        for key, i in zip(keys, changed, strict=True):
            self._entries[key].item.set_item(items[i])
        return True

    def _add(self, key: Hashable) -> _Entry:
        item_term = t.Item(key, f"{self.term.label} {key}")
        item = self.engine.acquire(item_term)
        assert isinstance(item, ItemNode)
        sub_term = usercode.call(self.term, self.term.f, item_term)
        if not isinstance(sub_term, t.Term):
            self.engine.release(item)
            raise TypeError(f"{self.term.label}: function returned {type(sub_term).__name__}, "
                            "not a Term")
        sub = self.engine.acquire(sub_term)
        entry = _Entry(item, sub)
        self._entries[key] = entry
        self._keys_of.setdefault(sub, []).append(key)
        sub.dependents.add(self)
        return entry

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        keys = self._keys_of[entry.sub]
        keys.remove(key)
        if not keys:
            del self._keys_of[entry.sub]
            self.engine.remove_dependency(self, entry.sub)
        self.engine.release(entry.sub)
        self.engine.release(entry.item)

    def _store(self, key: Hashable, out: Output) -> None:
        i = self._pos[key]
        self._outs[i] = out
        self._failed.discard(key)
        self._active.discard(key)
        if isinstance(out, Failed):
            self._failed.add(key)
        elif isinstance(out, Active):
            self._active.add(key)
            heapq.heappush(self._active_heap, (i, key))
        elif self._values[i] is not out.value:
            if self._shared:
                self._values = self._values.copy()
                self._shared = False
            self._values[i] = out.value

    def _combined(self) -> Output:
        if self._failed:
            failed = sorted(self._failed, key=self._pos.__getitem__)
            problem = combine((str(k) for k in failed), [self._outs[self._pos[k]] for k in failed])
            assert problem is not None
            return problem
        heap = self._active_heap
        while heap and (heap[0][1] not in self._active or self._pos.get(heap[0][1]) != heap[0][0]
                        or not isinstance(self._outs[heap[0][0]], Active)):
            heapq.heappop(heap)
        if heap:
            return self._outs[heap[0][0]]
        self._shared = True
        return self.result(self._values)

    def result(self, values: list[Any]) -> Output:
        """The output when every sub-pipeline is ok."""
        return Ok(values)

    def destroy(self) -> None:
        for key in list(self._entries):
            self._remove(key)

    def sub_terms(self) -> list[tuple[Hashable, t.Term[Any]]]:
        return [(key, self._entries[key].sub.term) for key in self._order if key in self._entries]


class OptionMapNode(ListMapNode):
    """A sub-pipeline while the input is not None."""

    __slots__ = ()

    def _key(self, item: Any) -> Hashable:
        return "value"

    def items_of(self, value: Any) -> list[Any]:
        return [] if value is None else [value]

    def result(self, values: list[Any]) -> Output:
        return Ok(values[0] if values else None)


class GateNode(Node):
    """The input's output once `on` is ok."""

    __slots__ = ()

    def evaluate(self) -> None:
        on = self.inputs[1].output
        self.engine.set_output(self, self.inputs[0].output if isinstance(on, Ok) else on)


class SameNode(Node):
    """The input's output unchanged (components and collapsed groups)."""

    __slots__ = ()

    def evaluate(self) -> None:
        self.engine.set_output(self, self.inputs[0].output)


class StateNode(Node):
    """The input's output as a value."""

    __slots__ = ()

    def evaluate(self) -> None:
        self.engine.set_output(self, Ok(self.inputs[0].output))


class CatchNode(Node):
    """The input's result as a value once it is finished."""

    __slots__ = ()

    def evaluate(self) -> None:
        out = self.inputs[0].output
        self.engine.set_output(self, out if isinstance(out, Active) else Ok(out))


class CutoffNode(Node):
    """The input's output, held while the custom equality says the value is unchanged."""

    __slots__ = ()
    term: t.Cutoff[Any]

    def evaluate(self) -> None:
        old, new = self.output, self.inputs[0].output
        if isinstance(old, Ok) and isinstance(new, Ok):
            try:
                if usercode.call(self.term, self.term.eq, old.value, new.value):
                    return
            except Exception as exc:
                self.fail(error_message(exc))
                return
        self.engine.set_output(self, new)


class VariableNode(Node):
    """A settable variable's current output."""

    __slots__ = ()
    term: t.Variable[Any]

    def attach(self) -> None:
        self.term.subscribe(self._on_set)

    def _on_set(self) -> None:
        self.engine.schedule(self)

    def evaluate(self) -> None:
        self.engine.set_output(self, self.own(self.term.output))

    def destroy(self) -> None:
        self.term.unsubscribe(self._on_set)


class WatchNode(Node):
    """A monitor's latest reading, through the engine's shared watcher."""

    __slots__ = ("watcher",)
    term: t.Watch[Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.watcher: Watcher | None = None

    def attach(self) -> None:
        self.watcher = self.engine.acquire_watcher(self.term.monitor)
        self.watcher.listeners.add(self._on_read)

    def _on_read(self) -> None:
        self.engine.schedule(self)

    def evaluate(self) -> None:
        assert self.watcher is not None
        self.engine.set_output(self, self.own(self.watcher.output))

    def destroy(self) -> None:
        if self.watcher is not None:
            self.watcher.listeners.discard(self._on_read)
            self.engine.release_watcher(self.watcher)
            self.watcher = None


NODE_CLASSES: dict[type[t.Term[Any]], type[Node]] = {
    t.Const: ConstNode,
    t.Fail: FailNode,
    t.Map: MapNode,
    t.Pair: PairNode,
    t.All: AllNode,
    t.Bind: BindNode,
    t.Item: ItemNode,
    t.ListMap: ListMapNode,
    t.OptionMap: OptionMapNode,
    t.Gate: GateNode,
    t.Collapse: SameNode,
    t.Component: SameNode,
    t.State: StateNode,
    t.Catch: CatchNode,
    t.Cutoff: CutoffNode,
    t.Variable: VariableNode,
    t.Watch: WatchNode,
}
"""The node class of each kind of term. A module defining nodes for its own kind of term adds
them here when imported (the cache's `PrimitiveNode`, for `Primitive` terms)."""
