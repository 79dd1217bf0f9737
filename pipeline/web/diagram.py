"""The pipeline's diagram for the web UI, drawn again only when the pipeline changed.

Graphviz is the expensive part (up to a second for a thousand nodes), so the SVG is kept until
the DOT text changes, and the DOT text is made again only after the engine evaluated something.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Any

import pipeline as p
from pipeline.diagram import dot_to_svg

_KEPT_VIEWS = 16
"""How many different `expand` sets keep a drawing (each browser may open other groups)."""
_GZIP_LEVEL = 6
"""zlib's default: a 942 KB drawing shrinks to about 150 KB in some 30 ms (in a worker thread)."""


class _FrozenNode:
    """What a diagram reads of a live node, copied on the event loop's thread."""

    __slots__ = ("cached", "job_id", "output", "refreshing", "state", "subs")

    def __init__(self, node: Any) -> None:
        self.state, self.output, self.job_id = node.state, node.output, node.job_id
        self.refreshing, self.cached = node.refreshing, bool(getattr(node, "cached", False))
        self.subs = node.sub_terms()

    def sub_terms(self) -> list[tuple[Hashable, p.Term[Any]]]:
        """The node's dynamic sub-graphs when it was copied."""
        return self.subs


class _Frozen:
    """An engine's nodes as they were at one moment: `pipeline_graph` reads it off the loop.

    The engine is not thread-safe (it changes on the loop's thread), so a drawing made in another
    thread reads this copy, taken on the loop in a few milliseconds, instead of the engine.
    """

    def __init__(self, engine: p.Engine) -> None:
        """Copy what the diagram shows of `engine`'s live nodes."""
        self.root = engine.root
        self._nodes = {node.term: _FrozenNode(node) for node in engine.nodes()}

    def node_for(self, term: p.Term[Any]) -> _FrozenNode | None:
        """The copy of `term`'s live node, if it had one."""
        return self._nodes.get(term)


def _to_dot(frozen: _Frozen, expand: Collection[str]) -> str:
    # Runs in a worker thread: `frozen` is never changed once made.
    return p.to_dot(p.pipeline_graph(frozen.root, frozen, expand=expand))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Drawing:
    """The SVG of a diagram, plain and gzip-compressed, and whether it shows the current state."""

    svg: bytes
    gzip: bytes
    current: bool


class _View:
    """One expand set's latest drawing, and the drawing under way."""

    def __init__(self) -> None:
        self.evaluations = -1
        """The engine's evaluation count that `drawing` shows."""
        self.dot = ""
        self.drawing: Drawing | None = None
        self.task: asyncio.Task[None] | None = None
        self.failed: tuple[int, BaseException] | None = None
        """The evaluation count whose drawing failed, and why (not tried again until it changes)."""


class DiagramCache:
    """DOT and SVG of an engine's pipeline per set of expanded groups.

    Nothing slow runs on the event loop: the graph and its DOT text are made in a worker thread
    from a copy of the engine's nodes, graphviz runs in a subprocess (awaited in a worker
    thread), and the SVG is compressed in a worker thread. While the next drawing is made,
    requests get the previous one (marked as not current), so a thousand-node redraw never holds
    a request up.
    """

    def __init__(self, engine: p.Engine) -> None:
        """Draw `engine`'s pipeline."""
        self.engine = engine
        self._views: OrderedDict[frozenset[str], _View] = OrderedDict()

    def _view(self, expand: Collection[str]) -> _View:
        key = frozenset(expand)
        view = self._views.pop(key, None) or _View()
        self._views[key] = view
        while len(self._views) > _KEPT_VIEWS:
            self._views.popitem(last=False)
        return view

    async def dot(self, expand: Collection[str] = ()) -> str:
        """The diagram in DOT, with the nodes' current states."""
        return await asyncio.to_thread(_to_dot, _Frozen(self.engine), expand)

    async def drawing(self, expand: Collection[str] = ()) -> Drawing:
        """The latest SVG drawing; the first one is awaited, later ones are made in the
        background while the previous one is returned (with `current` false)."""
        view = self._view(expand)
        evaluations = self.engine.evaluations
        if view.evaluations != evaluations and view.task is None:
            if view.failed is not None and view.failed[0] == evaluations:
                raise view.failed[1]
            view.task = asyncio.create_task(self._draw(view, expand))
        if view.drawing is None and view.task is not None:
            # Shielded: a browser that goes away must not cancel a drawing others wait for.
            await asyncio.shield(view.task)
        if view.drawing is None:
            assert view.failed is not None
            raise view.failed[1]
        current = view.evaluations == self.engine.evaluations
        return view.drawing if current else dataclasses.replace(view.drawing, current=False)

    async def _draw(self, view: _View, expand: Collection[str]) -> None:
        # Every change of a node's state or job goes through an evaluation, so an unchanged
        # count means an unchanged diagram; an unchanged DOT text needs no graphviz run.
        evaluations = self.engine.evaluations
        try:
            dot = await asyncio.to_thread(_to_dot, _Frozen(self.engine), expand)
            if dot != view.dot or view.drawing is None:
                svg = (await asyncio.to_thread(dot_to_svg, dot)).encode()
                compressed = await asyncio.to_thread(gzip.compress, svg, _GZIP_LEVEL)
                view.dot, view.drawing = dot, Drawing(svg, compressed, True)
            view.evaluations, view.failed = evaluations, None
        except Exception as exc:
            view.failed = (evaluations, exc)
        finally:
            view.task = None

    def close(self) -> None:
        """Stop the drawings under way (the server is shutting down)."""
        for view in self._views.values():
            if view.task is not None:
                view.task.cancel()
