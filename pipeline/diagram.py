"""Drawing a pipeline graph with graphviz: DOT text and SVG, left to right, coloured by state."""

from __future__ import annotations

import re
import urllib.parse

import graphviz
import networkx as nx

from pipeline.output import NodeState

COLOURS = {
    NodeState.OK: "#90ee90",
    NodeState.READY: "#ffff00",
    NodeState.RUNNING: "#ffa500",
    NodeState.WAITING_FOR_CONFIRMATION: "#4975ff",
    NodeState.FAILED: "#ff4500",
    NodeState.BLOCKED: "#d3d3d3",
    NodeState.PENDING: "#ffffff",
}
"""Fill colour of each node state (the README's table of states)."""


class DiagramError(Exception):
    """Graphviz could not draw the diagram: it is not installed, or `dot` failed."""


MAX_TEXT = 1000
"""Longest label or tooltip drawn, in characters: graphviz refuses quoted strings over 16 KB."""

# Characters an SVG (XML) cannot hold or graphviz cannot read: C0 controls other than tab and
# newline (NUL ends graphviz's strings) and DEL are drawn as their Unicode control pictures,
# lone surrogates (from undecodable bytes) as U+FFFD.
_UNDRAWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def _picture(match: re.Match[str]) -> str:
    char = match[0]
    if char == "\x7f":
        return "\u2421"
    return chr(0x2400 + ord(char)) if char < " " else "\ufffd"


def _drawable(text: str) -> str:
    """`text` shortened to `MAX_TEXT` with each character an SVG can hold and DOT can read."""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 1] + "…"
    return _UNDRAWABLE.sub(_picture, text)


def _label_text(text: str) -> str:
    """`text` as a DOT label that graphviz draws literally.

    Without this, a label `<b>x</b>` is an HTML-like label (or a graphviz syntax error),
    backslashes are escapes (`\\N` is the node's name) and `&lt;` is an entity.
    """
    return graphviz.escape(_drawable(text).replace("&", "&amp;"))


def _tooltip_text(text: str) -> str:
    """`text` as a DOT tooltip that graphviz shows literally.

    Graphviz reads a tooltip's escapes twice (once as `\\n`-style escapes, once as `\\N`-style
    names), so each backslash takes four.
    """
    return graphviz.nohtml(_drawable(text).replace("&", "&amp;").replace("\\", "\\" * 4))


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
            # Graphviz writes URLs into the SVG as they are: a quote would end the attribute.
            extra["URL"] = expand_url.format(id=urllib.parse.quote(attrs["collapsed"], safe="="))
            style.append("bold")
        elif attrs.get("job_id"):
            extra["URL"] = job_url.format(job_id=urllib.parse.quote(attrs["job_id"]))
        if attrs.get("error"):
            extra["tooltip"] = _tooltip_text(attrs["error"])
        dot.node(node_id, label=_label_text(attrs["label"]), fillcolor=fill, style=",".join(style),
                 **extra)
    for source, target, attrs in graph.edges(data=True):
        if attrs.get("style", "solid") != "solid":
            dot.edge(source, target, style=attrs["style"])
        else:
            dot.edge(source, target)
    return dot.source


def dot_to_svg(dot: str) -> str:
    """Render DOT text to SVG with graphviz's `dot`, run as a subprocess (the web UI calls this
    in a worker thread, so that its event loop keeps serving meanwhile).

    Raises DiagramError if `dot` is missing or fails (its complaint is in the message).
    """
    try:
        # Quiet: a failure's complaint goes into the error rather than onto our stderr.
        return graphviz.Source(dot).pipe(format="svg", encoding="utf-8", quiet=True)
    except graphviz.ExecutableNotFound as exc:
        raise DiagramError(
            "graphviz's `dot` program was not found: install the Debian package graphviz"
        ) from exc
    except graphviz.CalledProcessError as exc:
        complaint = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else str(exc.stderr or "")
        raise DiagramError(f"dot failed: {complaint.strip()}") from exc


def to_svg(graph: nx.DiGraph, **links: str) -> str:
    """The graph drawn as SVG (see `to_dot` for the links)."""
    return dot_to_svg(to_dot(graph, **links))
