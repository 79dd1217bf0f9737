"""Static analysis: the pipeline as a networkx graph, with each node's live state if running.

Without an engine the graph is the static structure: a `bind` not yet evaluated shows a dashed
placeholder for its sub-graph, and a `list_map` with no items shows its per-item sub-pipeline
applied to a placeholder item. With an engine, the sub-graphs that exist are drawn instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import networkx as nx

from pipeline import term as t
from pipeline.nodes import Node, error_message
from pipeline.output import Failed

if TYPE_CHECKING:
    from pipeline.engine import Engine

STATE_ORDER = ("ok", "pending", "blocked", "ready", "running", "waiting-for-confirmation",
               "failed")
"""Diagram states from best to worst: a collapsed group shows its worst member's state."""

_placeholders: weakref.WeakKeyDictionary[t.Term[Any], t.Term[Any]] = weakref.WeakKeyDictionary()


def _placeholder_sub(term: t.ListMap[Any] | t.OptionMap[Any]) -> t.Term[Any]:
    """The per-item sub-pipeline applied to a placeholder item (built once per term)."""
    sub = _placeholders.get(term)
    if sub is None:
        item: t.Term[Any] = t.Item(None, f"{term.label} (each item)")
        try:
            sub = term.f(item)
        except Exception as exc:
            sub = t.Fail(error_message(exc), label=f"{term.label}: {error_message(exc)}")
        if not isinstance(sub, t.Term):
            sub = t.Fail("not a Term", label=f"{term.label}: not a Term")
        _placeholders[term] = sub
    return sub


class _Builder:
    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine
        self.graph = nx.DiGraph()
        self.ids: dict[t.Term[Any], str] = {}
        self.collapses: list[t.Collapse[Any]] = []
        self.unlinked_items: list[str] = []

    def visit(self, root: t.Term[Any], *, placeholder: bool = False) -> str:
        stack: list[tuple[t.Term[Any], int]] = [(root, 0)]
        while stack:
            term, i = stack[-1]
            if i < len(term.inputs):
                stack[-1] = (term, i + 1)
                if term.inputs[i] not in self.ids:
                    stack.append((term.inputs[i], 0))
                continue
            stack.pop()
            if term not in self.ids:
                self._add(term, placeholder)
        return self.ids[root]

    def _add(self, term: t.Term[Any], placeholder: bool) -> None:
        node_id = f"n{len(self.ids)}"
        self.ids[term] = node_id
        live = self.engine.node_for(term) if self.engine is not None else None
        self.graph.add_node(node_id, **_attributes(term, live, placeholder))
        for index, source in enumerate(term.inputs):
            gate = isinstance(term, t.Gate) and index == 1
            self.graph.add_edge(self.ids[source], node_id, style="dashed" if gate else "solid")
        if isinstance(term, t.Collapse):
            self.collapses.append(term)
        if isinstance(term, t.Item):
            self.unlinked_items.append(node_id)
        if isinstance(term, t.Bind | t.ListMap | t.OptionMap):
            self._add_dynamic(term, live, node_id, placeholder)

    def _add_dynamic(self, term: t.Term[Any], live: Node | None, node_id: str,
                     placeholder: bool) -> None:
        subs = live.sub_terms() if live is not None else []
        source = self.ids[term.inputs[0]]
        if subs:
            for _key, sub in subs:
                sub_id = self.visit(sub, placeholder=placeholder)
                self._link_items(source)
                self.graph.add_edge(sub_id, node_id, style="solid")
            return
        if isinstance(term, t.Bind):
            sub_id = f"{node_id}_sub"
            self.graph.add_node(sub_id, label="…", state="pending", kind="placeholder",
                                placeholder=True, job_id=None, refreshing=None, error=None)
            self.graph.add_edge(source, sub_id, style="dashed")
        else:
            sub_id = self.visit(_placeholder_sub(term), placeholder=True)  # type: ignore[arg-type]
            self._link_items(source)
        self.graph.add_edge(sub_id, node_id, style="dashed" if isinstance(term, t.Bind)
                            else "solid")

    def _link_items(self, source: str) -> None:
        # Items have no static inputs: draw where their values come from.
        for node_id in self.unlinked_items:
            self.graph.add_edge(source, node_id, style="solid")
        self.unlinked_items.clear()

    def collapse(self, expand: Collection[str]) -> None:
        for group in self.collapses:
            if group.expand_id in expand or group not in self.ids:
                continue
            output_id = self.ids[group.inputs[0]]
            input_id = self.ids.get(group.group_input)
            outside = (nx.ancestors(self.graph, input_id) | {input_id}) if input_id else set()
            members = (nx.ancestors(self.graph, output_id) | {output_id}) - outside
            box = self.ids[group]
            states = [self.graph.nodes[m]["state"] for m in members] + [
                self.graph.nodes[box]["state"]]
            worst = max(states, key=STATE_ORDER.index)
            for member in members:
                for pred in list(self.graph.predecessors(member)):
                    if pred not in members:
                        self.graph.add_edge(pred, box, style="solid")
                self.graph.remove_node(member)
            self.graph.nodes[box].update(state=worst, collapsed=group.expand_id, job_id=None)


def _attributes(term: t.Term[Any], live: Node | None, placeholder: bool) -> dict[str, Any]:
    state = live.state if live is not None else "pending"
    error = live.output.message if live is not None and isinstance(live.output, Failed) else None
    return {
        "label": term.label,
        "kind": term.kind,
        "state": state,
        "job_id": live.job_id if live is not None else None,
        "refreshing": live.refreshing if live is not None else None,
        "cached": bool(getattr(live, "cached", False)),
        "placeholder": placeholder,
        "error": error,
    }


def pipeline_graph(
    root: t.Term[Any], engine: Engine | None = None, *, expand: Collection[str] = ()
) -> nx.DiGraph:
    """The pipeline under `root` as a directed graph (edges run from input to reader).

    Node attributes: `label`, `kind`, `state` (ok, ready, running, waiting-for-confirmation,
    failed, blocked, pending), `job_id`, `refreshing` (the new state of a latched node re-running),
    `cached`, `placeholder` (a part not evaluated yet), `error`, and `collapsed` (the expand id
    of a collapsed group). Groups made with `collapse` are one node unless their id is in `expand`.
    Node ids (`n0`, `n1`, ...) follow a depth-first walk, so equal pipelines give equal graphs.
    """
    builder = _Builder(engine)
    builder.visit(t.as_term(root))
    builder.collapse(expand)
    return builder.graph
