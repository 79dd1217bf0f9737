"""Drawing a pipeline graph with graphviz: DOT text and SVG, left to right, coloured by state."""

from __future__ import annotations

import graphviz
import networkx as nx

COLOURS = {
    "ok": "#90ee90",
    "ready": "#ffff00",
    "running": "#ffa500",
    "waiting-for-confirmation": "#4975ff",
    "failed": "#ff4500",
    "blocked": "#d3d3d3",
    "pending": "#ffffff",
}
"""Fill colour of each node state (DESIGN.md §3); `pending` is a node waiting for its inputs."""


class DiagramError(Exception):
    """The diagram could not be drawn (e.g. graphviz is not installed)."""


def to_dot(graph: nx.DiGraph, *, job_url: str = "/job/{job_id}", expand_url: str = "?expand={id}"
           ) -> str:
    """The graph in DOT. Job nodes link to `job_url`, collapsed groups to `expand_url`."""
    dot = graphviz.Digraph(
        "pipeline",
        graph_attr={"rankdir": "LR"},
        node_attr={"shape": "box", "fontname": "sans-serif"},
    )
    for node_id, attrs in graph.nodes(data=True):
        state = attrs["state"]
        fill = COLOURS[state]
        if attrs.get("refreshing"):
            fill = f"{fill}:{COLOURS[attrs['refreshing']]}"
        style = ["rounded", "filled"]
        if attrs.get("placeholder"):
            style.append("dashed")
        extra: dict[str, str] = {}
        if attrs.get("collapsed"):
            extra["URL"] = expand_url.format(id=attrs["collapsed"])
            style.append("bold")
        elif attrs.get("job_id"):
            extra["URL"] = job_url.format(job_id=attrs["job_id"])
        if attrs.get("error"):
            extra["tooltip"] = attrs["error"]
        dot.node(node_id, label=attrs["label"], fillcolor=fill, style=",".join(style), **extra)
    for source, target, attrs in graph.edges(data=True):
        if attrs.get("style", "solid") != "solid":
            dot.edge(source, target, style=attrs["style"])
        else:
            dot.edge(source, target)
    return dot.source


def dot_to_svg(dot: str) -> str:
    """Render DOT text to SVG with graphviz's `dot`."""
    try:
        return graphviz.Source(dot).pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound as exc:
        raise DiagramError(
            "graphviz's `dot` program was not found: install the Debian package graphviz"
        ) from exc


def to_svg(graph: nx.DiGraph, **links: str) -> str:
    """The graph drawn as SVG (see `to_dot` for the links)."""
    return dot_to_svg(to_dot(graph, **links))
