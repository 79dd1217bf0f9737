"""Static analysis: the pipeline as a networkx graph, with each node's live state if running.

Without an engine the graph is the static structure: a `bind` not yet evaluated shows a dashed
placeholder for its sub-graph, and a `list_map` with no items shows its per-item sub-pipeline
applied to a placeholder item. With an engine, the sub-graphs that exist are drawn instead: a
dashed edge runs from a bind's input to the nodes of its sub-graph that have no inputs, and a
solid one from a list_map's input to each of its items.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import networkx as nx

from pipeline import term as t
from pipeline.nodes import Node, error_message
from pipeline.output import Failed, NodeState

if TYPE_CHECKING:
    from pipeline.engine import Engine

def _placeholder_sub(term: t.ListMap[Any] | t.OptionMap[Any]) -> t.Term[Any]:
    """The per-item sub-pipeline applied to a placeholder item.

    Built afresh for each graph: terms have `__slots__` without `__weakref__`, so they cannot key
    a weak cache, and a strong one would keep every list_map ever drawn alive. `f` is pure, so
    this only costs the building of a few terms.
    """
    item: t.Term[Any] = t.Item(None, f"{term.label} (each item)")
    try:
        sub = term.f(item)
    except Exception as exc:
        return t.Fail(error_message(exc), label=f"{term.label}: {error_message(exc)}")
    if not isinstance(sub, t.Term):
        return t.Fail("not a Term", label=f"{term.label}: not a Term")
    return sub


class _Builder:
    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine
        self.graph = nx.DiGraph()
        self.ids: dict[t.Term[Any], str] = {}
        self.added: list[tuple[t.Term[Any], str]] = []
        self.collapses: list[t.Collapse[Any]] = []
        # Items seen since the innermost list_map being drawn started its sub-graphs.
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
        self.added.append((term, node_id))
        live = self.engine.node_for(term) if self.engine is not None else None
        self.graph.add_node(node_id, **_attributes(term, live, placeholder))
        for index, source in enumerate(term.inputs):
            gate = isinstance(term, t.Gate) and index == 1
            self.graph.add_edge(self.ids[source], node_id, style="dashed" if gate else "solid")
        if isinstance(term, t.Collapse):
            self.collapses.append(term)
        if isinstance(term, t.Item):
            self.unlinked_items.append(node_id)
        if isinstance(term, t.Bind):
            self._add_bind(term, live, node_id, placeholder)
        elif isinstance(term, t.ListMap | t.OptionMap):
            self._add_list_map(term, live, node_id, placeholder)

    def _add_bind(self, term: t.Bind[Any], live: Node | None, node_id: str,
                  placeholder: bool) -> None:
        source = self.ids[term.inputs[0]]
        subs = live.sub_terms() if live is not None else []
        if not subs:
            sub_id = f"{node_id}_sub"
            self.graph.add_node(sub_id, label="…", state=NodeState.PENDING, kind="placeholder",
                                placeholder=True, job_id=None, refreshing=None, error=None)
            self.graph.add_edge(source, sub_id, style="dashed")
            self.graph.add_edge(sub_id, node_id, style="dashed")
            return
        for _key, sub in subs:
            first = len(self.added)
            sub_id = self.visit(sub, placeholder=placeholder)
            # The sub-graph was built from the input's value: draw that, as the placeholder did,
            # from the input to the sub-graph's new nodes that have no inputs of their own.
            for new_term, new_id in self.added[first:]:
                if not new_term.inputs and not isinstance(new_term, t.Item):
                    self.graph.add_edge(source, new_id, style="dashed")
            self.graph.add_edge(sub_id, node_id, style="solid")

    def _add_list_map(self, term: t.ListMap[Any] | t.OptionMap[Any], live: Node | None,
                      node_id: str, placeholder: bool) -> None:
        source = self.ids[term.inputs[0]]
        subs = live.sub_terms() if live is not None else []
        if not subs:
            subs = [(None, _placeholder_sub(term))]
            placeholder = True
        # Items have no static inputs: draw where their values come from. Only the items first
        # reached from this list_map's sub-graphs are its own; those of an enclosing list_map
        # are linked by it.
        outer, self.unlinked_items = self.unlinked_items, []
        try:
            for _key, sub in subs:
                sub_id = self.visit(sub, placeholder=placeholder)
                for item_id in self.unlinked_items:
                    self.graph.add_edge(source, item_id, style="solid")
                self.unlinked_items.clear()
                self.graph.add_edge(sub_id, node_id, style="solid")
        finally:
            self.unlinked_items = outer

    def collapse(self, expand: Collection[str]) -> None:
        graph = self.graph
        for group in self.collapses:
            if group.expand_id in expand or group not in self.ids:
                continue
            box = self.ids[group]
            output_id = self.ids[group.inputs[0]]
            if box not in graph or output_id not in graph:
                continue  # hidden by another group
            input_id = self.ids.get(group.group_input)
            outside: set[str] = set()
            if input_id is not None and input_id in graph:
                outside = nx.ancestors(graph, input_id) | {input_id}
            hidden = (nx.ancestors(graph, output_id) | {output_id}) - outside
            # A member that something outside the group reads stays visible, with whatever it
            # reads: hiding it would hide that reader's input.
            stack = [m for m in hidden if any(s not in hidden and s != box
                                              for s in graph.successors(m))]
            while stack:
                member = stack.pop()
                if member in hidden:
                    hidden.discard(member)
                    stack.extend(p for p in graph.predecessors(member) if p in hidden)
            states = [graph.nodes[m]["state"] for m in hidden] + [graph.nodes[box]["state"]]
            worst = max(states, key=lambda state: NodeState(state).severity)
            inputs: dict[str, str] = {}
            for member in hidden:
                for pred in graph.predecessors(member):
                    if pred not in hidden:
                        style = graph.edges[pred, member].get("style", "solid")
                        if inputs.get(pred) != "solid":
                            inputs[pred] = style
            graph.remove_nodes_from(hidden)
            for pred, style in inputs.items():
                if not graph.has_edge(pred, box):
                    graph.add_edge(pred, box, style=style)
            graph.nodes[box].update(state=worst, collapsed=group.expand_id, job_id=None,
                                    refreshing=None)


def _attributes(term: t.Term[Any], live: Node | None, placeholder: bool) -> dict[str, Any]:
    state = live.state if live is not None else NodeState.PENDING
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

    Node attributes: `label`, `kind`, `state` (a `NodeState`), `job_id`, `refreshing` (the new
    state of a latched node re-running), `cached`, `placeholder` (a part not evaluated yet),
    `error`, and `collapsed` (the expand id of a collapsed group). Groups made with `collapse`
    are one node unless their id is in `expand`; a member that a node outside the group reads
    stays visible, as in OCurrent. The graph attribute `groups` is the set of the expand ids of
    every group drawn (collapsed or not). Node ids (`n0`, `n1`, ...) follow a depth-first walk,
    so equal pipelines give equal graphs.
    """
    builder = _Builder(engine)
    builder.visit(t.as_term(root))
    builder.collapse(expand)
    builder.graph.graph["groups"] = {group.expand_id for group in builder.collapses
                                     if group in builder.ids}
    return builder.graph
