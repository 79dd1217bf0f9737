"""Golden-file tests of pipeline diagrams, in the style of OCurrent's `test/expected/*.dot`.

Each scenario builds a pipeline, evaluates it step by step, and writes the DOT of its diagram
(`to_dot(pipeline_graph(root, engine))`) after each step into one text, each step preceded by a
comment line `// step N: description`. The text is compared with `tests/expected/NAME.dot`.

Job ids are random and contain the date, so job links are replaced by `/job/JOB` before
comparing; nothing else is rewritten.

To accept new diagrams after an intended change, run

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_diagrams.py

which rewrites the golden files instead of comparing; then read the diff of `tests/expected/`
before committing it: a golden file that records a bug is worse than none.

Builders here wait on `Gates`, so that a test decides when each job finishes and can draw the
pipeline while a job is running. No test depends on timing.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from golden import assert_golden

from pipeline import (
    COLOURS,
    DiagramError,
    Engine,
    Failed,
    Job,
    NodeState,
    Term,
    Variable,
    all_labelled,
    bind,
    builder,
    collapse,
    const,
    gate,
    list_map,
    map,
    pipeline_graph,
    to_dot,
    to_svg,
)
from pipeline.diagram import dot_to_svg

EXPECTED_DIR = Path(__file__).parent / "expected"
JOB_URL = re.compile(r'/job/[^"]+')

# Fill colours from the README's table of states, written out here so that the table in
# pipeline.diagram is checked rather than trusted.
SPEC_FILL = {
    "ok": 'fillcolor="#90ee90"',
    "running": 'fillcolor="#ffa500"',
    "failed": 'fillcolor="#ff4500"',
    "blocked": 'fillcolor="#d3d3d3"',
    "pending": 'fillcolor="#ffffff"',
}


def diagram(root: Term[Any], engine: Engine | None = None, *, expand: Collection[str] = ()) -> str:
    """The DOT of `root`'s diagram, with job links made stable."""
    return JOB_URL.sub("/job/JOB", to_dot(pipeline_graph(root, engine, expand=expand)))


class Golden:
    """The diagrams of one scenario, step by step, checked against `tests/expected/NAME.dot`."""

    def __init__(self, name: str) -> None:
        self.path = EXPECTED_DIR / f"{name}.dot"
        self.steps: list[str] = []

    def step(self, description: str, root: Term[Any], engine: Engine | None = None, *,
             expand: Collection[str] = ()) -> str:
        """Record the diagram now; returns its DOT for extra assertions."""
        dot = diagram(root, engine, expand=expand)
        self.steps.append(f"// step {len(self.steps) + 1}: {description}\n{dot}")
        return dot

    def check(self) -> None:
        """Compare with the golden file, or rewrite it when UPDATE_GOLDEN=1."""
        assert_golden(self.path, "\n".join(self.steps))


class Gates:
    """Holds builder jobs until the test lets them finish.

    A builder calls `await gates.passage(name)`; it returns once `open(name)` has been called, or
    raises `RuntimeError(error)` if the gate was opened with an error. `close(name)` makes the
    next passage wait again. `waiting` holds the names of the jobs now held: a job there is
    running (the engine calls the builder once the job has started).
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._errors: dict[str, str] = {}
        self.waiting: set[str] = set()

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    async def passage(self, name: str) -> None:
        self.waiting.add(name)
        try:
            await self._event(name).wait()
        finally:
            self.waiting.discard(name)
        error = self._errors.get(name)
        if error is not None:
            raise RuntimeError(error)

    def open(self, *names: str, error: str | None = None) -> None:
        for name in names:
            if error is not None:
                self._errors[name] = error
            self._event(name).set()

    def close(self, name: str) -> None:
        self._events[name] = asyncio.Event()
        self._errors.pop(name, None)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let the event loop run until `predicate()` holds (a bounded number of turns, no clock)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def state(engine: Engine, term: Term[Any]) -> str | None:
    """The diagram state of `term`'s live node, or None if it has none."""
    node = engine.node_for(term)
    return node.state if node is not None else None


async def reach(engine: Engine, term: Term[Any], wanted: str) -> None:
    """Wait until `term`'s node is in state `wanted`.

    Only for states a node cannot have before its first evaluation (a new node claims to be
    "running" until then): use `held` to wait for a running job.
    """
    await until(lambda: state(engine, term) == wanted, f"{term.label} {wanted}")


async def held(engine: Engine, gates: Gates, name: str, term: Term[Any]) -> None:
    """Wait until the job of `term` is running and held at gate `name`, and drawn so."""
    await until(lambda: name in gates.waiting and state(engine, term) == "running",
                f"{term.label} running at gate {name}")


def node_line(dot: str, label: str) -> str:
    """The DOT line declaring the node labelled `label`."""
    quoted = re.escape(label) if re.fullmatch(r"\w+", label) else re.escape(f'"{label}"')
    lines = [line for line in dot.splitlines() if re.search(rf"\[label={quoted} ", line)]
    assert len(lines) == 1, f"expected one node labelled {label!r} in:\n{dot}"
    return lines[0]


def assert_state(dot: str, label: str, wanted: str) -> None:
    assert SPEC_FILL[wanted] in node_line(dot, label), f"{label} should be {wanted}:\n{dot}"


@builder("deploy")
async def deploy(job: Job, image: str) -> str:
    """The last step of the gate and collapse pipelines."""
    return f"deployed {image}"


def chain_ops(gates: Gates) -> tuple[Any, Any, Any]:
    """fetch, build and test builders, each job held at its gate ("fetch", "build", "test")."""

    @builder("fetch")
    async def fetch(job: Job, repo: str) -> str:
        await gates.passage("fetch")
        return f"{repo}#abc123"

    @builder("build")
    async def build(job: Job, commit: str) -> str:
        await gates.passage("build")
        return f"image of {commit}"

    @builder("test")
    async def test(job: Job, image: str) -> str:
        await gates.passage("test")
        return f"tested {image}"

    return fetch, build, test


# 1. A chain of builders


async def test_chain(tmp_path: Path) -> None:
    gates = Gates()
    fetch, build, test = chain_ops(gates)
    repo = const("https://example.org/repo.git", label="repo")
    commit = fetch(repo)
    image = build(commit)
    root = test(image)
    golden = Golden("chain")
    golden.step("static structure, before evaluation", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await held(engine, gates, "fetch", commit)
        dot = golden.step("fetch running", root, engine)
        assert_state(dot, "fetch", "running")
        assert_state(dot, "build", "pending")

        gates.open("fetch")
        await held(engine, gates, "build", image)
        dot = golden.step("fetch ok, build running", root, engine)
        assert_state(dot, "fetch", "ok")
        assert_state(dot, "test", "pending")

        gates.open("build")
        await held(engine, gates, "test", root)
        golden.step("build ok, test running", root, engine)

        gates.open("test")
        await engine.wait_idle()
        dot = golden.step("all ok", root, engine)
        assert_state(dot, "test", "ok")
        assert dot.count('URL="/job/JOB"') == 3
    golden.check()


def test_every_node_state_has_a_colour_and_a_rank() -> None:
    assert set(COLOURS) == set(NodeState)
    for state, fill in SPEC_FILL.items():
        assert f'fillcolor="{COLOURS[NodeState(state)]}"' == fill
    ranked = sorted(NodeState, key=lambda state: state.severity)
    assert ranked[0] == "ok" and ranked[-1] == "failed"
    assert ranked.index(NodeState.PENDING) < ranked.index(NodeState.RUNNING), \
        "a group with a running member shows it running, not pending"


def test_dot_that_graphviz_refuses_is_a_diagram_error_with_its_complaint() -> None:
    with pytest.raises(DiagramError, match=r"dot failed: .*syntax error"):
        dot_to_svg("digraph { a -> }")


def test_static_diagram_renders_to_svg() -> None:
    fetch, build, test = chain_ops(Gates())
    root = test(build(fetch(const("https://example.org/repo.git", label="repo"))))
    svg = to_svg(pipeline_graph(root))
    assert svg.startswith("<?xml") or "<svg" in svg


# 2. A matrix with one failure


async def test_matrix_failure(tmp_path: Path) -> None:
    gates = Gates()

    @builder("build")
    async def build(job: Job, platform: str) -> str:
        await gates.passage(f"build {platform}")
        return f"image for {platform}"

    @builder("test")
    async def test(job: Job, image: str) -> str:
        return f"tested {image}"

    platforms = ("debian", "alpine", "fedora")
    builds = {p: build(const(p, label=p), label=f"build {p}") for p in platforms}
    tests = {p: test(b, label=f"test {p}") for p, b in builds.items()}
    matrix = all_labelled(tests, label="matrix")
    root = map(len, matrix, label="count")
    golden = Golden("matrix")
    golden.step("static structure, before evaluation", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        for p, b in builds.items():
            await held(engine, gates, f"build {p}", b)
        golden.step("every build running", root, engine)

        gates.open("build debian", error="disk full")
        await reach(engine, builds["debian"], "failed")
        dot = golden.step("debian failed, the others still running", root, engine)
        assert_state(dot, "build debian", "failed")
        assert_state(dot, "test debian", "blocked")
        assert_state(dot, "matrix", "blocked")
        assert_state(dot, "build alpine", "running")

        gates.open("build alpine", "build fedora")
        await engine.wait_idle()
        dot = golden.step("alpine and fedora ok, debian failed", root, engine)
        for p in ("alpine", "fedora"):
            assert_state(dot, f"build {p}", "ok")
            assert_state(dot, f"test {p}", "ok")
        assert_state(dot, "build debian", "failed")
        for label in ("test debian", "matrix", "count"):
            assert_state(dot, label, "blocked")
        assert engine.root_output() == Failed(
            "debian failed: RuntimeError: disk full", engine.node_for(builds["debian"]).uid
        )
        assert 'tooltip="debian failed: RuntimeError: disk full"' in node_line(dot, "matrix")
    golden.check()


# 3. A bind: a sub-graph that depends on a value


async def test_bind(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("build", "test")
    _fetch, build, test = chain_ops(gates)
    version = Variable("1.0", label="version")

    def stages(v: str) -> Term[str]:
        return test(build(const(f"release-{v}", label=f"source {v}")))

    root = bind(stages, version, label="stages")
    golden = Golden("bind")
    dot = golden.step("static structure: a placeholder for the sub-graph", root)
    assert 'label="…"' in dot and "style=dashed" in dot
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        dot = golden.step("evaluated with version 1.0", root, engine)
        assert "source 1.0" in dot and "…" not in dot
        assert_state(dot, "stages", "ok")

        version.set("2.0")
        await engine.wait_idle()
        dot = golden.step("version changed to 2.0: the 1.0 sub-graph is gone", root, engine)
        assert "source 2.0" in dot and "source 1.0" not in dot
        assert dot.count("label=build ") == 1
    golden.check()


# 4. A list_map with items added and removed


async def test_list_map(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("build", "test")
    _fetch, build, test = chain_ops(gates)
    branches: Variable[list[str]] = Variable([], label="branches")
    root = list_map(lambda branch: test(build(branch)), branches, label="per branch")
    golden = Golden("list_map")
    golden.step("static structure: the per-item pipeline on a placeholder item", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        dot = golden.step("no items: still the placeholder", root, engine)
        assert '"per branch (each item)"' in dot

        for items in (["main", "dev"], ["main", "dev", "feature"], ["dev"]):
            branches.set(items)
            await engine.wait_idle()
            dot = golden.step(f"items {', '.join(items)}", root, engine)
            assert "(each item)" not in dot
            assert dot.count("label=build ") == len(items)
            for item in items:
                assert f'"per branch {item}"' in dot
        assert '"per branch main"' not in dot
    golden.check()


# 5. A gate


async def test_gate(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("fetch", "build")
    fetch, build, test = chain_ops(gates)

    image = build(fetch(const("https://example.org/repo.git", label="repo")))
    tested = test(image)
    gated = gate(image, on=tested, label="when tested")
    root = deploy(gated)
    golden = Golden("gate")
    golden.step("static structure", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await held(engine, gates, "test", tested)
        dot = golden.step("test running: the image is held at the gate", root, engine)
        assert_state(dot, "build", "ok")
        assert_state(dot, "when tested", "pending")
        assert_state(dot, "deploy", "pending")

        gates.open("test")
        await engine.wait_idle()
        dot = golden.step("test ok: the gate lets the image through", root, engine)
        assert_state(dot, "when tested", "ok")
        assert_state(dot, "deploy", "ok")
    golden.check()


# 6. A latched builder re-running


async def test_latched_rebuild(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("build")

    @builder("fetch", latched=True)
    async def fetch(job: Job, repo: str) -> str:
        await gates.passage("fetch")
        return f"{repo}#abc123"

    @builder("build")
    async def build(job: Job, commit: str) -> str:
        await gates.passage("build")
        return f"image of {commit}"

    commit = fetch(const("https://example.org/repo.git", label="repo"))
    root = build(commit)
    golden = Golden("latched")
    golden.step("static structure", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        gates.open("fetch")
        await engine.wait_idle()
        golden.step("first run ok", root, engine)
        fetch_node, build_node = engine.node_for(commit), engine.node_for(root)
        assert fetch_node is not None and build_node is not None
        first_fetch, first_build = fetch_node.job_id, build_node.job_id
        assert first_fetch is not None

        gates.close("fetch")
        assert engine.cache.rebuild(first_fetch)
        await until(lambda: "fetch" in gates.waiting and fetch_node.refreshing == "running",
                    "fetch refreshing")
        dot = golden.step("fetch re-running: old value shown, drawn ok and running", root, engine)
        assert 'fillcolor="#90ee90:#ffa500"' in node_line(dot, "fetch")
        assert_state(dot, "build", "ok")
        assert fetch_node.job_id != first_fetch

        gates.open("fetch")
        await engine.wait_idle()
        dot = golden.step("fetch refreshed with the same value: build not re-run", root, engine)
        assert_state(dot, "fetch", "ok")
        assert build_node.job_id == first_build
    golden.check()


# 7. A collapsed group


async def test_collapse(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("fetch", "test")
    fetch, build, test = chain_ops(gates)

    commit = fetch(const("https://example.org/repo.git", label="repo"))
    image = build(commit)
    group = collapse("stage", "build", input=commit, output=test(image))
    root = deploy(group)
    expanded = ("stage=build",)
    golden = Golden("collapse")
    dot = golden.step("static, collapsed", root)
    assert "label=build " not in dot and 'URL="?expand=stage=build"' in dot
    dot = golden.step("static, expanded", root, expand=expanded)
    assert "label=build " in dot and "?expand" not in dot
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await held(engine, gates, "build", image)
        dot = golden.step("build running, collapsed: the box shows the worst state", root,
                          engine)
        assert_state(dot, "stage: build", "running")
        dot = golden.step("build running, expanded", root, engine, expand=expanded)
        assert_state(dot, "build", "running")

        gates.open("build")
        await engine.wait_idle()
        dot = golden.step("all ok, collapsed", root, engine)
        assert_state(dot, "stage: build", "ok")
        golden.step("all ok, expanded", root, engine, expand=expanded)
    golden.check()


async def test_collapse_keeps_members_read_from_outside(tmp_path: Path) -> None:
    """A member of a group that something outside reads stays visible (as in OCurrent)."""
    fetch, build, test = chain_ops(Gates())

    @builder("push")
    async def push(job: Job, image: str) -> str:
        return f"pushed {image}"

    commit = fetch(const("https://example.org/repo.git", label="repo"))
    image = build(commit)
    group = collapse("stage", "test", input=commit, output=test(image))
    root = gate(push(image), on=group, label="when tested")
    golden = Golden("collapse_shared")
    dot = golden.step("collapsed: build stays, since push reads it; test is in the box", root)
    assert "label=test " not in dot
    box, build_id, push_id = (node_line(dot, label).split()[0]
                              for label in ("stage: test", "build", "push"))
    assert f"{build_id} -> {push_id}\n" in dot
    assert f"{build_id} -> {box}\n" in dot
    golden.step("expanded", root, expand=("stage=test",))
    golden.check()


# A list_map whose per-item pipeline is a bind


async def test_list_map_of_binds(tmp_path: Path) -> None:
    gates = Gates()
    gates.open("build", "test")
    _fetch, build, test = chain_ops(gates)
    branches: Variable[list[str]] = Variable(["main"], label="branches")

    def per_branch(branch: Term[str]) -> Term[str]:
        return bind(lambda name: test(build(const(f"{name}#head", label=f"head of {name}"))),
                    branch, label="stages")

    root = list_map(per_branch, branches, label="per branch")
    golden = Golden("list_map_of_binds")
    golden.step("static structure", root)
    async with Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        dot = golden.step("one item, its bind evaluated", root, engine)
    golden.check()
    item = node_line(dot, "per branch main").split()[0]
    assert f"{item} -> {item}" not in dot
    assert f"{node_line(dot, 'branches').split()[0]} -> {item}\n" in dot


# Hostile labels: drawn as text, never as graphviz markup


HOSTILE_LABELS = {
    # label in the pipeline: the lines the SVG must show
    "<b>bold</b>": ["<b>bold</b>"],
    "<>": ["<>"],
    'say "hi" \\"': ['say "hi" \\"'],
    "ends in \\": ["ends in \\"],
    "\\N \\G \\l \\n \\E \\T \\H \\L": ["\\N \\G \\l \\n \\E \\T \\H \\L"],
    "&amp; &lt;b&gt; &#65; & x": ["&amp; &lt;b&gt; &#65; & x"],
    "two\nlines": ["two", "lines"],
    "x" * 20_000: ["x" * 999 + "…"],
    "undecodable \udcff byte": ["undecodable \ufffd byte"],
    "nul\x00 esc\x1b cr\r del\x7f": ["nul\u2400 esc\u241b cr\u240d del\u2421"],
    "é 漢字 🙂": ["é 漢字 🙂"],
}


def svg_node_texts(svg: str) -> list[list[str]]:
    """Each node's lines of text in `svg` (parsed as XML, so the SVG must be well-formed)."""
    ns = {"svg": "http://www.w3.org/2000/svg"}
    return [[text.text or "" for text in group.iterfind(".//svg:text", ns)]
            for group in ElementTree.fromstring(svg).iterfind(".//svg:g[@class='node']", ns)]


def test_pipeline_diagram_draws_hostile_labels_as_text(tmp_path: Path) -> None:
    file = tmp_path / "hostile.py"
    file.write_text(
        "import pipeline as p\n\n"
        f"LABELS = {list(HOSTILE_LABELS)!r}\n\n"
        "def pipeline(args):\n"
        "    return p.all(*(p.const(i, label=label) for i, label in enumerate(LABELS)),\n"
        "                 label='<i>all</i>')\n")
    out = tmp_path / "hostile.svg"
    for args in ([], ["-o", out]):  # DOT on standard output, then SVG
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "diagram", file, *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (0, "")
    drawn = sorted(svg_node_texts(out.read_text()))
    assert drawn == sorted([*HOSTILE_LABELS.values(), ["<i>all</i>"]])
