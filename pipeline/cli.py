"""The `pipeline` command: run a pipeline file, or draw its diagram.

A pipeline file is a Python file defining `pipeline(args: list[str]) -> Term`: it receives the
arguments given after `--` and returns the root term. It may also define
`web_routes(state_dir: Path)`, returning aiohttp route definitions that `pipeline run` adds to the
web UI, and `web_links`, (URL, label) pairs for the web UI's nav bar. Heavy modules are imported
only by the sub-command that needs them, so `pipeline --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import importlib.util
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline import usercode
from pipeline.cluster.cli import UsageParser, port
from pipeline.nodes import error_message
from pipeline.usercode import Interrupted, StopSignals

if TYPE_CHECKING:
    from pipeline.engine import Engine
    from pipeline.term import Term

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEFAULT_PORT = 8080

LEVEL_NAMES = ("harmless", "mostly-harmless", "average", "above-average", "dangerous")

STATE_LOCK = "run.lock"
"""The file in the state directory that `pipeline run` locks for its lifetime; it holds the
process id of the holder."""

_held_state_dirs: dict[Path, int] = {}


class PipelineFileError(Exception):
    """The pipeline file could not give a pipeline; the message names the file and line."""


def load_pipeline(path: Path, args: list[str]) -> Term[Any]:
    """Import the pipeline file at `path` and call its `pipeline(args)`."""
    return _load(path, args)[0]


def _load(path: Path, args: list[str]) -> tuple[Term[Any], ModuleType]:
    """The root term of the pipeline file at `path`, and the file as a module."""
    from pipeline.term import Term

    if not path.is_file():
        raise PipelineFileError(f"{path}: no such file")
    module_name = f"_pipeline_file_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PipelineFileError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # Let the file import modules that sit beside it.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        usercode.call(f"the pipeline file {path}", spec.loader.exec_module, module)
        make = getattr(module, "pipeline", None)
        if not callable(make):
            raise PipelineFileError(f"{path}: defines no function pipeline(args)")
        root = usercode.call(f"pipeline() in {path}", make, args)
    except PipelineFileError:
        raise
    except SyntaxError as exc:
        raise PipelineFileError(f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}") from None
    except (Exception, SystemExit) as exc:
        raise PipelineFileError(_located(exc, path)) from None
    if not isinstance(root, Term):
        line = make.__code__.co_firstlineno
        raise PipelineFileError(
            f"{path}:{line}: pipeline() returned {type(root).__name__}, expected a Term"
        )
    return root, module


def _web_extras(module: ModuleType, path: Path, state_dir: Path
                ) -> tuple[tuple[Any, ...], tuple[tuple[str, str], ...]]:
    """The pages a pipeline file adds to the web UI (its `web_routes(state_dir)`, if any) and its
    nav bar links (its `web_links`, if any)."""
    make = getattr(module, "web_routes", None)
    try:
        routes = tuple(make(state_dir)) if callable(make) else ()
    except (Exception, SystemExit) as exc:
        raise PipelineFileError(_located(exc, path)) from None
    links = getattr(module, "web_links", ())
    if not isinstance(links, list | tuple) or not all(
            isinstance(link, list | tuple) and len(link) == 2 for link in links):
        raise PipelineFileError(f"{path}: web_links must be a list of (URL, label) pairs, "
                                f"not {links!r:.60}")
    return routes, tuple((str(url), str(label)) for url, label in links)


def _located(exc: BaseException, path: Path) -> str:
    """`FILE:LINE: Type: message` (see `error_message`), at the deepest frame of the traceback
    inside the file."""
    frames = traceback.extract_tb(exc.__traceback__)
    target = str(path.resolve())
    inside = [f for f in frames if Path(f.filename).resolve().as_posix() == target]
    frame = inside[-1] if inside else frames[-1]
    if isinstance(exc, SystemExit):
        # Left alone, it would end `pipeline` itself with the file's status and no word why.
        return f"{frame.filename}:{frame.lineno}: called sys.exit({exc.code!r}) while loading"
    return f"{frame.filename}:{frame.lineno}: {error_message(exc)}"


def _split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of `pipeline`."""
    parser = UsageParser(
        prog="pipeline",
        description="Incremental, reactive CI pipelines. A pipeline file defines "
        "`pipeline(args) -> Term`; arguments after `--` are passed to it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a pipeline until interrupted (or once with --once)",
        description="Evaluate the pipeline in FILE and keep it up to date as its inputs change, "
        "until Ctrl-C (which cancels running jobs and saves state). Arguments after `--` go to "
        "the file's pipeline(args).",
    )
    run.add_argument("file", metavar="FILE", type=Path, help="the pipeline file (Python)")
    run.add_argument("--state-dir", metavar="DIR", type=Path, default=Path("var"),
                     help="where cached outcomes and job logs are kept (default: ./var)")
    run.add_argument("--confirm", metavar="LEVEL", choices=LEVEL_NAMES,
                     help="jobs at or above this risk level wait for confirmation; one of "
                     + ", ".join(LEVEL_NAMES) + " (default: never ask)")
    run.add_argument("--once", action="store_true",
                     help="run until nothing is ready or running, print each node's state, label, "
                     "job and error, and exit 0 if the pipeline succeeded or 1 if not")
    web = run.add_argument_group("web UI")
    web.add_argument("--port", metavar="PORT", type=port,
                     help=f"serve the web UI on PORT (default: {DEFAULT_PORT}; with --once the UI "
                     "is served only when --port is given)")
    web.add_argument("--host", metavar="HOST", default="127.0.0.1",
                     help="the address to serve the web UI on (default: 127.0.0.1); any other "
                     "than loopback needs --admin-token-file")
    web.add_argument("--no-web", action="store_true", help="do not serve the web UI")
    web.add_argument("--admin-token-file", metavar="FILE", type=Path,
                     help="a file holding the token that allows actions (rebuild, cancel, start "
                     "now) in the web UI; without it, anyone on this machine may act")
    web.add_argument("--webhook-secret-file", metavar="FILE", type=Path,
                     help="a file holding the secret of GitHub push webhooks (POST /webhooks/git)")

    diagram = commands.add_parser(
        "diagram", help="write the pipeline's diagram without running anything",
        description="Write the static diagram of the pipeline in FILE (no job runs). "
        "Arguments after `--` go to the file's pipeline(args).",
    )
    diagram.add_argument("file", metavar="FILE", type=Path, help="the pipeline file (Python)")
    diagram.add_argument("-o", "--output", metavar="OUT", type=Path,
                         help="write to OUT.svg or OUT.dot (default: DOT on standard output)")
    diagram.add_argument("--expand", metavar="ID", action="append", default=[],
                         help="open the collapsed group ID (key=value); may be repeated")

    commands.add_parser(
        "obuilder", add_help=False,
        help="the sandboxed builder: build, fmt, dockerfile, healthcheck, clean, df, delete, "
        "prune (see pipeline obuilder --help)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the engine's commands, `pipeline run` and `pipeline diagram` (`pipeline.__main__`
    sends `pipeline obuilder` to the builder's command line); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    own, passed = _split_args(args)
    options = build_parser().parse_args(own)
    try:
        with StopSignals() as signals:
            if options.command == "diagram":
                return _diagram(options, passed)
            return _run(options, passed, signals)
    except PipelineFileError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        # Ctrl-C or SIGTERM stopped user code that did not return (see pipeline.usercode).
        print(f"pipeline: {exc}", file=sys.stderr)
        return exc.status


def _diagram(options: argparse.Namespace, args: list[str]) -> int:
    from pipeline.analysis import pipeline_graph
    from pipeline.diagram import DiagramError, dot_to_svg, to_dot

    out: Path | None = options.output
    if out is not None and out.suffix not in (".svg", ".dot"):
        print(f"pipeline: {out}: the output must end in .svg or .dot", file=sys.stderr)
        return EXIT_USAGE
    root = load_pipeline(options.file, args)
    graph = pipeline_graph(root, expand=options.expand)
    unknown = [group for group in options.expand if group not in graph.graph["groups"]]
    if unknown:
        groups = ", ".join(sorted(graph.graph["groups"])) or "none"
        print(f"pipeline: --expand {unknown[0]}: no such group (groups: {groups})",
              file=sys.stderr)
        return EXIT_USAGE
    dot = to_dot(graph)
    if out is None:
        sys.stdout.write(dot)
        return EXIT_OK
    try:
        text = dot_to_svg(dot) if out.suffix == ".svg" else dot
    except DiagramError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        out.write_text(text)
    except OSError as exc:
        print(f"pipeline: {out}: cannot write: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


@dataclass(frozen=True)
class WebOptions:
    """Where and how to serve the web UI."""

    host: str
    port: int
    admin_token: str | None
    webhook_secret: bytes | None
    extra_routes: tuple[Any, ...] = ()
    """Pages the pipeline file adds (aiohttp route definitions)."""
    extra_links: tuple[tuple[str, str], ...] = ()
    """(URL, label) pairs for the nav bar."""


class UsageError(Exception):
    """A bad option; the message says which and why."""


def _web_options(options: argparse.Namespace) -> WebOptions | None:
    """The web UI's settings, or None if it is not served (--no-web, or --once without --port)."""
    if options.no_web or (options.once and options.port is None):
        return None

    def secret(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            value = path.read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the {what}: {exc.strerror}") from None
        if not value:
            raise UsageError(f"{path}: the {what} file is empty")
        return value

    token = secret(options.admin_token_file, "admin token")
    ui = WebOptions(
        host=options.host, port=DEFAULT_PORT if options.port is None else options.port,
        admin_token=token.decode(errors="replace") if token is not None else None,
        webhook_secret=secret(options.webhook_secret_file, "webhook secret"))
    from pipeline.web.auth import check_host

    try:
        check_host(ui.host, ui.admin_token)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ui


def _check_state_dir(path: Path) -> None:
    """Make the state directory if it is missing; UsageError unless it is a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write is the only sure test: root passes every permission check, yet not on a
        # read-only file system.
        tempfile.TemporaryFile(dir=path).close()
    except FileExistsError:
        raise UsageError(f"--state-dir {path}: not a directory") from None
    except OSError as exc:
        raise UsageError(f"--state-dir {path}: cannot write there: {exc.strerror}") from None


def _lock_state_dir(state_dir: Path) -> None:
    """Take `state_dir`'s lock for the rest of this process's life (the kernel drops it when the
    process ends, however it ends); UsageError if another process holds it.

    Two runs on one state directory would run the same jobs at once on the same files.
    """
    if state_dir.resolve() in _held_state_dirs:
        return  # taken by an earlier `main` in this process (tests call it more than once)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # Not inherited by jobs' commands, which must not keep the lock after we end.
        fd = os.open(state_dir / STATE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"{state_dir}: cannot use it as the state directory: "
                         f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        holder = f"process {pid}" if pid.isdecimal() else "another process"
        raise UsageError(f"state directory {state_dir} is in use by {holder} (another pipeline "
                         "run); use another --state-dir or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_state_dirs[state_dir.resolve()] = fd


def _run(options: argparse.Namespace, args: list[str], signals: StopSignals) -> int:
    from pipeline.engine import PipelineError, tune_gc
    from pipeline.level import Level

    try:
        ui = _web_options(options)
        root, module = _load(options.file, args)
        # After loading: a mistyped pipeline file must not leave a state directory behind.
        _check_state_dir(options.state_dir)
        _lock_state_dir(options.state_dir)
    except UsageError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ui is not None:
        routes, links = _web_extras(module, options.file, options.state_dir)
        ui = replace(ui, extra_routes=routes, extra_links=links)
    confirm = Level.parse(options.confirm) if options.confirm else None
    tune_gc()
    try:
        status = asyncio.run(_serve(root, options.state_dir, confirm, options.once, ui, signals))
    except PipelineError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if signals.interrupted is not None:
        raise signals.interrupted  # now that jobs are cancelled and the state saved
    return status


async def _serve(root: Term[Any], state_dir: Path, confirm: Any, once: bool,
                 ui: WebOptions | None, signals: StopSignals) -> int:
    from pipeline.engine import Engine
    from pipeline.output import Ok

    engine = Engine(root, state_dir=state_dir, confirm=confirm)
    stop = asyncio.Event()
    signals.attach(asyncio.get_running_loop(), stop.set)
    runner = None
    try:
        if ui is not None:
            from pipeline.web.server import bound_port, start_server

            try:
                runner = await start_server(engine, host=ui.host, port=ui.port,
                                            admin_token=ui.admin_token,
                                            webhook_secret=ui.webhook_secret,
                                            extra_routes=ui.extra_routes,
                                            extra_links=ui.extra_links)
            except OSError as exc:
                # The port is taken, or the host is not an address of this machine.
                print(f"pipeline: cannot serve the web UI on {ui.host}:{ui.port}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return EXIT_USAGE
            host = f"[{ui.host}]" if ":" in ui.host else ui.host
            print(f"Web UI: http://{host}:{bound_port(runner)}/", flush=True)
        # Only now, with the port bound: a port in use must stop us before any job runs. No
        # request is served in between, as nothing from here to the engine's start awaits.
        await engine.start()
        if once:
            await _until(engine.wait_idle(), stop)
            print_states(engine)
        else:
            engine.jobs.on_change(_print_job)
            engine.on_change(lambda: stop.set() if engine.fatal is not None else None)
            await stop.wait()
            if engine.fatal is not None:
                raise engine.fatal
            print("Stopping: cancelling running jobs", flush=True)
            return EXIT_OK
        if stop.is_set():
            return signals.status
        return EXIT_OK if isinstance(engine.root_output(), Ok) else EXIT_FAILED
    finally:
        # The server first: no request may act on an engine that is stopping.
        if runner is not None:
            await runner.cleanup()
        await engine.stop(reason="Cancelled: pipeline stopped")
        signals.detach()


async def _until(work: Any, stop: asyncio.Event) -> None:
    """Run `work` unless `stop` is set first (Ctrl-C)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task in done:
        task.result()
    else:
        task.cancel()


def _print_job(job: Any) -> None:
    print(f"{job.state:<24} {job.label:<24} {job.id}", flush=True)


def print_states(engine: Engine) -> None:
    """One line per node, inputs first: state, label, job id ("(cached)" if not run here), and
    for a node that failed (not one blocked by an input), its error."""
    import networkx as nx

    from pipeline.analysis import pipeline_graph
    from pipeline.output import NodeState

    graph = pipeline_graph(engine.root, engine)
    order = {node_id: i for i, node_id in enumerate(graph)}
    for node_id in nx.lexicographical_topological_sort(graph, key=order.__getitem__):
        attrs = graph.nodes[node_id]
        job = attrs["job_id"] or ""
        if job and attrs["cached"]:
            job += " (cached)"
        error = attrs["error"] if attrs["state"] == NodeState.FAILED else None
        if error:
            # One line per node, whatever the message holds.
            job = f"{job} {' '.join(error.split())}".lstrip()
        print(f"{attrs['state']:<24} {attrs['label']:<30} {job}".rstrip())
