"""The pipeline's diagram for the web UI, drawn again only when the pipeline changed.

Graphviz is the expensive part (about a second for a thousand nodes), so the SVG is kept until
the DOT text changes; the DOT text is kept until the engine evaluated something again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection

import pipeline as p

_KEPT_VIEWS = 16
"""How many different `expand` sets keep a drawing (each browser may open other groups)."""


class DiagramError(Exception):
    """Graphviz failed to draw the diagram."""


async def render_svg(dot: str) -> str:
    """Run graphviz's `dot` on `dot` in a subprocess (the event loop keeps serving meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        "dot", "-Tsvg", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(dot.encode())
    if process.returncode != 0:
        raise DiagramError(f"dot failed: {err.decode(errors='replace').strip()}")
    return out.decode()


class _View:
    """One expand set's latest drawing."""

    def __init__(self) -> None:
        self.evaluations = -1
        self.dot = ""
        self.svg: str | None = None
        # Requests arriving while graphviz draws wait for that drawing instead of starting more.
        self.lock = asyncio.Lock()


class DiagramCache:
    """DOT and SVG of an engine's pipeline per set of expanded groups."""

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

    def dot(self, expand: Collection[str] = ()) -> str:
        """The diagram in DOT, with the nodes' current states."""
        return self._dot(self._view(expand), expand)

    def _dot(self, view: _View, expand: Collection[str]) -> str:
        # Every change of a node's state or job goes through an evaluation, so an unchanged
        # count means an unchanged diagram.
        if view.evaluations != self.engine.evaluations:
            view.evaluations = self.engine.evaluations
            dot = p.to_dot(p.pipeline_graph(self.engine.root, self.engine, expand=expand))
            if dot != view.dot:
                view.dot, view.svg = dot, None
        return view.dot

    async def svg(self, expand: Collection[str] = ()) -> str:
        """The diagram as SVG, drawn by graphviz only if it changed since the last time."""
        view = self._view(expand)
        async with view.lock:
            dot = self._dot(view, expand)
            if view.svg is None:
                svg = await render_svg(dot)
                # The pipeline may have changed while graphviz drew: keep the drawing only if
                # it is still that of the current DOT text.
                if view.dot == dot:
                    view.svg = svg
                return svg
            return view.svg
