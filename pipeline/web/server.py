"""The aiohttp application: pages, live updates (server-sent events), actions, metrics.

The application runs on the engine's event loop and reads the engine directly; everything it
shares between requests is stored on the application under the keys below.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import pipeline as p
from pipeline.cache.storage import Entry
from pipeline.obuilder.log_format import MARK, parse_outcome
from pipeline.web import webhooks
from pipeline.web.ansi import AnsiConverter
from pipeline.web.auth import LOGIN_COOKIE, Access, Role, check_host
from pipeline.web.diagram import DiagramCache
from pipeline.web.metrics import Metrics

HERE = Path(__file__).parent
EVENT_INTERVAL = 0.1
"""Seconds between two diagram-change events to one browser: at most ten a second."""
QUERY_LIMIT = 500
"""The most cache entries /query lists."""
_EVENT_ID = re.compile(r"([0-9]{1,18}):([0-9]{1,18})")
"""A log stream's event id, OFFSET:LINE (ASCII digits: `str.isdigit` also accepts '²')."""
_MARK = MARK.decode()
"""Ends each line the builder writes itself, in a log decoded to text."""
REBUILD_WAIT = 10.0
"""Seconds a Rebuild waits for the key's new job, to take the browser to it."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

ENGINE = web.AppKey("engine", p.Engine)
ACCESS = web.AppKey("access", Access)
DIAGRAMS = web.AppKey("diagrams", DiagramCache)
METRICS = web.AppKey("metrics", Metrics)
STREAMS = web.AppKey("streams", set)
NAV_LINKS = web.AppKey("nav_links", str)
"""The nav bar's links to pages a pipeline added, as HTML."""

# Job actions: the URL's last segment -> (its name in engine.job_actions, which is also the
# button's element id; the engine method; the button's label).
_ACTIONS = {"rebuild": ("rebuild", "rebuild", "Rebuild"), "cancel": ("cancel", "cancel", "Cancel"),
            "start": ("start-now", "start_now", "Start now")}


def _template(name: str) -> string.Template:
    return string.Template((HERE / "templates" / name).read_text())


TEMPLATES = {name: _template(f"{name}.html")
             for name in ("base", "index", "job", "jobs", "query", "login")}


class ChangeFeed:
    """A revision number that grows whenever the engine evaluated something; awaitable."""

    def __init__(self, engine: p.Engine) -> None:
        """Follow `engine`'s rounds of evaluation."""
        self.engine = engine
        self.revision = 0
        self._evaluations = engine.evaluations
        self._changed = asyncio.Event()
        engine.on_change(self._on_round)

    def _on_round(self) -> None:
        if self.engine.evaluations == self._evaluations:
            return
        self._evaluations = self.engine.evaluations
        self.revision += 1
        # A fresh event per revision: waiters of the old one all wake, later waiters block.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, seen: int) -> None:
        """Return once the revision is no longer `seen`."""
        while self.revision == seen:
            await self._changed.wait()


CHANGES = web.AppKey("changes", ChangeFeed)


# Building blocks


def escape(value: object) -> str:
    """`value` as HTML text (quotes escaped too, for attributes); None as nothing."""
    return html.escape("" if value is None else str(value))


def page(request: web.Request, title: str, body: str, *, status: int = 200) -> web.Response:
    """An HTML page in the UI's layout (nav bar, stylesheet): `body` is HTML, `title` text.

    Pages that a pipeline adds (`extra_routes`) use it too, so that they look like the rest.
    """
    access = request.app[ACCESS]
    role = access.role(request)
    if role >= Role.BUILDER:
        login = f"{role.name.lower()} {_post_button(request, '/logout', 'Log out', 'logout')}" \
            if access.admin_token is not None else "builder (loopback)"
    else:
        login = 'viewer <a id="login-link" href="/login">Log in</a>'
    text = TEMPLATES["base"].substitute(title=escape(title), body=body, role=login,
                                        links=request.app[NAV_LINKS])
    return web.Response(text=text, content_type="text/html", status=status)


def _post_button(request: web.Request, action: str, label: str, element_id: str, *,
                 hidden: bool = False) -> str:
    """A form posting to `action` with the CSRF token: one button."""
    csrf = request.app[ACCESS].csrf_token(request)
    return (f'<form class="action" method="post" action="{escape(action)}"'
            f'{" hidden" if hidden else ""}>'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<button id="{escape(element_id)}" type="submit">{escape(label)}</button></form>')


def _job_link(job_id: str) -> str:
    return f'<a href="/job/{escape(job_id)}">{escape(job_id)}</a>'


def _require(request: web.Request, role: Role) -> None:
    if request.app[ACCESS].role(request) < role:
        raise web.HTTPForbidden(text=f"this needs the {role.name.lower()} role: log in at /login "
                                "or send the admin token as a bearer header")


def overall_state(engine: p.Engine) -> p.NodeState:
    """The state of the pipeline as a whole: that of the root's output."""
    output = engine.root_output()
    if isinstance(output, p.Ok):
        return p.NodeState.OK
    if isinstance(output, p.Failed):
        return p.NodeState.FAILED
    if isinstance(output, p.Active):
        return output.state
    return p.NodeState.PENDING


def summary(engine: p.Engine, revision: int) -> dict[str, Any]:
    """What the main page shows besides the diagram."""
    counts = engine.state_counts()
    return {"revision": revision, "state": overall_state(engine),
            "counts": {state: counts.get(state, 0) for state in p.NodeState}}


def _expand(request: web.Request) -> list[str]:
    return request.query.getall("expand", [])


async def _sse(request: web.Request) -> web.StreamResponse:
    """Start a server-sent event stream; it is ended when the application shuts down."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    task = asyncio.current_task()
    if task is not None:
        streams = request.app[STREAMS]
        streams.add(task)
        task.add_done_callback(streams.discard)
    return response


def sse_event(event: str, data: object, event_id: str = "") -> bytes:
    """One server-sent event whose data is `data` in JSON, on one line.

    JSON escapes every control character, so no byte of `data` (a log's text, say) can end the
    data field: EventSource ends a line at CR as well as at LF.
    """
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id else [])
    lines.append("data: " + json.dumps(data, ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode()


async def _send(response: web.StreamResponse, event: str, data: object,
                event_id: str = "") -> None:
    await response.write(sse_event(event, data, event_id))


def _gone() -> contextlib.suppress:
    """Around an event stream: a browser that went away (a closed tab) ends it quietly.

    Writing to its connection raises ConnectionResetError (aiohttp's ClientConnectionResetError),
    which aiohttp would otherwise log with a traceback.
    """
    return contextlib.suppress(ConnectionResetError)


# The pipeline


async def index(request: web.Request) -> web.Response:
    """The diagram, the overall state and the counts per state."""
    engine = request.app[ENGINE]
    info = summary(engine, request.app[CHANGES].revision)
    drawing = await request.app[DIAGRAMS].drawing(_expand(request))
    svg = drawing.svg.decode()
    counts = "".join(
        f'<li data-state="{escape(state)}"><span class="state state-{escape(state)}">'
        f'{escape(state)}</span> <span class="count">{n}</span></li>'
        for state, n in info["counts"].items())
    body = TEMPLATES["index"].substitute(
        state=escape(info["state"]), counts=counts,
        # An older drawing makes the page's script fetch the current one at its first event.
        revision=info["revision"] if drawing.current else -1, svg=svg[svg.find("<svg"):])
    return page(request, "Pipeline", body)


async def pipeline_svg(request: web.Request) -> web.Response:
    """The diagram as SVG (`?expand=KEY=VALUE` opens a collapsed group; may be repeated).

    Gzip-compressed when the client accepts it. While a newer drawing is being made, the
    previous one is served with `X-Diagram: stale` (the page's script asks again a little later);
    otherwise `X-Diagram: current`.
    """
    drawing = await request.app[DIAGRAMS].drawing(_expand(request))
    headers = {"X-Diagram": "current" if drawing.current else "stale",
               "Vary": "Accept-Encoding", "Cache-Control": "no-cache"}
    if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=drawing.gzip, content_type="image/svg+xml", headers=headers)
    return web.Response(body=drawing.svg, content_type="image/svg+xml", headers=headers)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (a `q=0` refuses it)."""
    for coding in accept_encoding.lower().split(","):
        name, _, params = coding.partition(";")
        if name.strip() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


async def pipeline_dot(request: web.Request) -> web.Response:
    """The diagram in DOT."""
    dot = await request.app[DIAGRAMS].dot(_expand(request))
    return web.Response(text=dot, content_type="text/vnd.graphviz")


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent `changed` events (the summary, as JSON) whenever the pipeline changes."""
    changes = request.app[CHANGES]
    engine = request.app[ENGINE]
    response = await _sse(request)
    seen = -1
    with _gone():
        while True:
            await changes.wait(seen)
            seen = changes.revision
            await _send(response, "changed", summary(engine, seen), str(seen))
            await asyncio.sleep(EVENT_INTERVAL)
    return response


# Jobs


def _job_id(request: web.Request) -> str:
    """The job id of the URL; 404 unless this engine has or had such a job."""
    engine = request.app[ENGINE]
    job_id = f"{request.match_info['day']}/{request.match_info['rest']}"
    try:
        path = engine.jobs.log_path(job_id)
    except ValueError:
        raise web.HTTPNotFound(text=f"no job {job_id}") from None
    if engine.jobs.get(job_id) is None and engine.cache.db.entry(job_id) is None \
            and not path.exists():
        raise web.HTTPNotFound(text=f"no job {job_id}")
    return job_id


def _history(engine: p.Engine, job_id: str, entry: Entry | None) -> list[Entry]:
    """The stored runs of the key of `job_id` (running, or stored as `entry`), newest first."""
    key = _key_of(engine, job_id, entry)
    return engine.cache.db.history(*key) if key is not None else []


@dataclass(frozen=True)
class _Run:
    """What a job page shows of a job, running in this process or stored."""

    state: str
    """The job's state; "skipped" for one that succeeded with nothing to do (`Job.skip`)."""
    label: str
    error: str | None
    skipped: str | None
    queued: datetime | None
    started: datetime | None
    finished: datetime | None


def _run_of(engine: p.Engine, job_id: str, entry: Entry | None) -> _Run:
    """The job `job_id`, from this process's jobs if it is there, else from its stored `entry`."""
    job = engine.jobs.get(job_id)
    if job is not None:
        skipped = job.skipped if job.state is p.JobState.OK else None
        return _Run("skipped" if skipped is not None else str(job.state), job.label, job.error,
                    skipped, job.created, job.started, job.finished)
    if entry is not None:
        return _Run(entry.state, entry.op, entry.error, entry.skipped, entry.queued,
                    entry.started, entry.finished)
    return _Run("unknown", "", None, None, None, None, None)


def duration_text(duration: timedelta) -> str:
    """A duration for people: "0.4 s", "12 s", "3 min 4 s", "2 h 5 min"."""
    seconds = duration.total_seconds()
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _time_text(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S %Z}".rstrip() if moment is not None else ""


def _timings(run: _Run) -> dict[str, str]:
    """When the job was queued, started and finished, and how long it waited and ran, as text
    (empty when not known yet), keyed by the suffix of their elements' ids (`job-KEY`)."""
    # A job cancelled before it started waited until it finished.
    waited_until = run.started or run.finished
    return {
        "queued": _time_text(run.queued), "started": _time_text(run.started),
        "finished": _time_text(run.finished),
        "queued-for": duration_text(waited_until - run.queued)
        if run.queued is not None and waited_until is not None else "",
        "ran-for": duration_text(run.finished - run.started)
        if run.started is not None and run.finished is not None else "",
    }


def _key_of(engine: p.Engine, job_id: str, entry: Entry | None) -> tuple[str, str] | None:
    """The (operation, key digest) `job_id` ran, if known."""
    instance = engine.cache.find(job_id)
    if instance is not None:
        return instance.op.id, instance.key_digest
    return (entry.op, entry.key_digest) if entry is not None else None


def _newer_run(engine: p.Engine, job_id: str, entry: Entry | None) -> str | None:
    """The newest job of the key of `job_id`, running or finished, if it is not `job_id`."""
    key = _key_of(engine, job_id, entry)
    if key is None:
        return None
    instance = engine.cache.live(*key)
    # The jobs this process ran for the key are newer than any stored by an earlier one.
    if instance is not None and instance.job_ids:
        newest = instance.job_ids[-1]
        return newest if newest != job_id else None
    history = [run.job_id for run in engine.cache.db.history(*key)]
    return history[0] if job_id in history[1:] else None


_REBUILD_NOTICES = {
    "marked": "The key of this job is not in use now: it is rebuilt the next time the "
              "pipeline wants it.",
    "waiting": "Rebuild requested: the new job has not started yet.",
}
"""What the job page says after a Rebuild that found no new job to go to (`?rebuild=...`)."""


async def job_page(request: web.Request) -> web.Response:
    """A job: state (or why it skipped), timings, actions, a link to a newer run of its key, its
    live log and the other runs of its key."""
    engine = request.app[ENGINE]
    job_id = _job_id(request)
    entry = engine.cache.db.entry(job_id)
    run = _run_of(engine, job_id, entry)
    label = f"{run.label} {entry.key_pp}" if entry is not None else run.label
    allowed = engine.job_actions(job_id)
    # Rebuild is there, hidden, while the job runs: the page shows it when the job ends.
    actions = "".join(
        _post_button(request, f"/job/{job_id}/{action}", label, name,
                     hidden=name not in allowed)
        for action, (name, _method, label) in _ACTIONS.items()
        if name in allowed or name == "rebuild")
    notices = []
    if (notice := _REBUILD_NOTICES.get(request.query.get("rebuild", ""))) is not None:
        notices.append(f'<p id="rebuild-notice" class="notice">{escape(notice)}</p>')
    if (newer := _newer_run(engine, job_id, entry)) is not None:
        notices.append(f'<p id="newer-run" class="notice">This key has a newer run: '
                       f"{_job_link(newer)}</p>")
    history = "".join(
        f'<li class="{past.state}">{_job_link(past.job_id)} '
        f"{escape(_stored_time(past.finished))} {escape(_outcome_text(past))}"
        f'{" (this job)" if past.job_id == job_id else ""}</li>'
        for past in _history(engine, job_id, entry))
    timings = {key.replace("-", "_"): escape(text) for key, text in _timings(run).items()}
    body = TEMPLATES["job"].substitute(
        job_id=escape(job_id), state=escape(run.state), label=escape(label),
        error=escape(run.error), skipped=escape(run.skipped), actions=actions,
        # Rows with nothing to say are hidden (the page's script shows them if the job ends so).
        error_hidden="" if run.error else " hidden",
        skipped_hidden="" if run.skipped else " hidden",
        notices="".join(notices), history=history, log_url=escape(f"/job/{job_id}/log"),
        raw_log_url=escape(f"/job/{job_id}/log.txt"), **timings)
    return page(request, job_id, body)


def _outcome_text(entry: Entry) -> str:
    """A stored run's outcome in a few words: "ok", "skipped: REASON" or its error."""
    if entry.state == "skipped":
        return f"skipped: {entry.skipped}"
    return "ok" if entry.ok else entry.error or ""


def _line_html(number: int, converter: AnsiConverter, line: str) -> str:
    """One log line as HTML, with its number as an anchor (`#L<number>`).

    The builder's own lines (`pipeline.obuilder.log_format`: each ends with its mark, which no
    command's output can hold) get classes: `step-header`, or `step-end` with the step's id and
    whether it came from the cache. The page's script makes the collapsible sections of steps
    from these classes as lines arrive: the log is streamed in chunks that cut sections anywhere
    (and a browser resumes a stream mid-section), so only the page, which holds the sections
    made so far, can put each line in its section; the server says which lines are the
    builder's because it alone reads the log's bytes, mark included.
    """
    attributes = 'class="line"'
    if line.endswith(_MARK):
        line = line[:-1]
        end = parse_outcome(line)
        attributes = 'class="line step-header"' if end is None else (
            f'class="line step-end" data-step="{end[0]}" data-cached="{str(end[1]).lower()}"')
    # A carriage return starts the line again, as progress lines (`10%\r50%\r100%`) do: show
    # what a terminal ends with, the last text after one. Every part goes through the converter,
    # whose colours carry on.
    parts = [converter.convert(part) for part in line.split("\r")]
    shown = next((part for part in reversed(parts) if part), "")
    return (f'<span {attributes} id="L{number}"><a class="ln" href="#L{number}">{number}</a>'
            f"{shown}</span>\n")


async def job_log(request: web.Request) -> web.StreamResponse:
    """The job's log as server-sent events, each one's data in JSON: `lines` (a string of HTML,
    one element per line, ids `L<n>`, made by `_line_html`), `state` (a string) and `timings`
    (an object, see `_timings`) when the job's state changes, and `end` (an object: state,
    error, skip reason and timings) once the job has finished.

    The log is read in chunks as it grows, never whole. A line shows its text after its last
    carriage return, as a terminal would. Event ids are `OFFSET:LINE`, so a browser that
    reconnects (sending Last-Event-ID) continues where it was; any other Last-Event-ID is 400.
    """
    engine = request.app[ENGINE]
    job_id = _job_id(request)
    offset, number = _resume_point(request.headers.get("Last-Event-ID", ""),
                                   engine.jobs.log_path(job_id))
    response = await _sse(request)
    with _gone():
        await _stream_log(response, engine, job_id, offset, number)
    return response


def _resume_point(last_event_id: str, path: Path) -> tuple[int, int]:
    """The log offset and line number a reconnecting browser's Last-Event-ID names; 400 if it
    is not one this log can have sent (`OFFSET:LINE`, within the log's size)."""
    if not last_event_id:
        return 0, 0
    match = _EVENT_ID.fullmatch(last_event_id)
    size = path.stat().st_size if path.exists() else 0
    if match is None or int(match[1]) > size or int(match[2]) > int(match[1]):
        raise web.HTTPBadRequest(text="Last-Event-ID must be OFFSET:LINE of this job's log")
    return int(match[1]), int(match[2])


async def _stream_log(response: web.StreamResponse, engine: p.Engine, job_id: str,
                      offset: int, number: int) -> None:
    """Send the log of `job_id` from `offset` (line `number`) on, then how the job ended."""
    path = engine.jobs.log_path(job_id)
    job = engine.jobs.get(job_id)
    converter = AnsiConverter()
    state: p.JobState | None = None
    pending = b""
    # A live job's log may not be written yet; a job stored by an earlier process may have lost
    # its log: there is nothing to follow.
    if job is not None:
        chunks = job.follow(offset)
    elif path.exists():
        chunks = p.follow_log(path, done=lambda: True, start=offset)
    else:
        chunks = _nothing()
    async for chunk in chunks:
        data = pending + chunk
        # Only whole lines are sent: a partial one waits for the rest (or the end of the job).
        cut = data.rfind(b"\n") + 1
        complete, pending = data[:cut], data[cut:]
        if complete:
            lines = complete.decode(errors="replace").split("\n")[:-1]
            fragment = "".join(_line_html(number + i, converter, line)
                               for i, line in enumerate(lines, start=1))
            offset += len(complete)
            number += len(lines)
            await _send(response, "lines", fragment, f"{offset}:{number}")
        if job is not None and job.state != state:
            state = job.state
            run = _run_of(engine, job_id, None)
            await _send(response, "state", run.state)
            await _send(response, "timings", _timings(run))
    if pending:
        await _send(response, "lines",
                    _line_html(number + 1, converter, pending.decode(errors="replace")))
    await _send(response, "end", _outcome(engine, job_id))


def _outcome(engine: p.Engine, job_id: str) -> dict[str, str | None]:
    """How a finished job ended, for the job page's script: state ("skipped" for a job that
    had nothing to do), error, skip reason and the timings (`_timings`)."""
    run = _run_of(engine, job_id, engine.cache.db.entry(job_id))
    return {"state": run.state, "error": run.error, "skipped": run.skipped, **_timings(run)}


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield


async def job_action(request: web.Request) -> web.Response:
    """Rebuild, cancel or start a job now (builder role); then to the job's page, or for a
    rebuild to the new job's (see `_rebuilt`)."""
    _require(request, Role.BUILDER)
    engine = request.app[ENGINE]
    job_id = _job_id(request)
    name, method, _label = _ACTIONS[request.match_info["action"]]
    if name not in engine.job_actions(job_id):
        raise web.HTTPConflict(text=f"cannot {name} job {job_id} now")
    if name == "rebuild":
        raise web.HTTPSeeOther(await _rebuilt(request.app, job_id))
    if not getattr(engine, method)(job_id):
        raise web.HTTPConflict(text=f"cannot {name} job {job_id} now")
    raise web.HTTPSeeOther(f"/job/{job_id}")


async def _rebuilt(app: web.Application, job_id: str) -> str:
    """Rebuild the key of `job_id`; the page to go to then: the new job's, once the engine has
    made it (waiting up to REBUILD_WAIT seconds, woken by each round of evaluation), else the
    old job's, saying that the key is not in use (so the rebuild waits for its next use) or that
    no new job has started yet."""
    engine = app[ENGINE]
    entry = engine.cache.db.entry(job_id)
    key = _key_of(engine, job_id, entry)
    before = _newer_run(engine, job_id, entry)
    if key is None or not engine.rebuild(job_id):
        raise web.HTTPConflict(text=f"cannot rebuild job {job_id} now")
    if engine.cache.live(*key) is None:
        return f"/job/{job_id}?rebuild=marked"
    changes = app[CHANGES]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REBUILD_WAIT):
            while True:
                seen = changes.revision
                newer = _newer_run(engine, job_id, entry)
                if newer is not None and newer != before:
                    return f"/job/{newer}"
                await changes.wait(seen)
    return f"/job/{job_id}?rebuild=waiting"


async def job_raw_log(request: web.Request) -> web.StreamResponse:
    """The job's log as it is now, as a text file to save; read and sent in chunks, never
    whole. The same access as the job's page."""
    engine = request.app[ENGINE]
    job_id = _job_id(request)
    path = engine.jobs.log_path(job_id)
    name = job_id.replace("/", "-")
    response = web.StreamResponse(headers={
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{name}.log"',
    })
    await response.prepare(request)
    # A job that has written nothing yet has no log file: its log is empty.
    chunks = p.follow_log(path, done=lambda: True) if path.exists() else _nothing()
    with _gone():
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
    return response


async def jobs_page(request: web.Request) -> web.Response:
    """The jobs that are running, queued or waiting for confirmation."""
    rows = "".join(
        f'<tr data-state="{escape(job.state)}"><td>{_job_link(job.id)}</td>'
        f"<td>{escape(job.label)}</td>"
        f'<td class="state state-{escape(job.state)}">{escape(job.state)}</td>'
        f"<td>{escape(job.started)}</td></tr>"
        for job in request.app[ENGINE].jobs.active())
    return page(request, "Jobs", TEMPLATES["jobs"].substitute(rows=rows))


def _query_filter(request: web.Request) -> dict[str, Any]:
    """The filters of /query, as arguments of the records' `query`; 400 for a bad one."""
    filters: dict[str, Any] = {}
    if op := request.query.get("op"):
        filters["op"] = op
    ok = request.query.get("ok", "")
    if ok not in ("", "true", "false"):
        raise web.HTTPBadRequest(text="ok must be true or false")
    if ok:
        filters["ok"] = ok == "true"
    if since := request.query.get("since"):
        try:
            filters["since"] = date.fromisoformat(since)
        except ValueError:
            raise web.HTTPBadRequest(text="since must be a date, YYYY-MM-DD") from None
    return filters


def _stored_time(moment: datetime | None) -> str | None:
    """A stored time as the records' queries have always shown it (ISO 8601)."""
    return moment.isoformat() if moment is not None else None


def _options(values: Iterable[tuple[str, str]], selected: str) -> str:
    return "".join(f'<option value="{escape(v)}"{" selected" if v == selected else ""}>{escape(t)}'
                   "</option>" for v, t in values)


async def query_page(request: web.Request) -> web.Response:
    """Cache entries filtered by operation, outcome and date, with "rebuild selected"."""
    db = request.app[ENGINE].cache.db
    entries = db.query(**_query_filter(request), limit=QUERY_LIMIT)
    rows = "".join(
        f'<tr><td><input type="checkbox" name="job" value="{escape(entry.job_id)}"></td>'
        f"<td>{_job_link(entry.job_id)}</td><td>{escape(entry.op)}</td><td>{escape(entry.key_pp)}</td>"
        f'<td class="{entry.state}">{escape(_outcome_text(entry))}'
        f"</td><td>{escape(_stored_time(entry.finished))}</td></tr>"
        for entry in entries)
    ops = db.ops()
    body = TEMPLATES["query"].substitute(
        ops=_options(((op, op) for op in ops), request.query.get("op", "")),
        outcomes=_options((("", "(any)"), ("true", "ok"), ("false", "failed")),
                          request.query.get("ok", "")),
        since=escape(request.query.get("since", "")), rows=rows,
        csrf=escape(request.app[ACCESS].csrf_token(request)))
    return page(request, "Query", body)


async def query_rebuild(request: web.Request) -> web.Response:
    """Rebuild every checked entry (builder role); back to /query."""
    _require(request, Role.BUILDER)
    engine = request.app[ENGINE]
    for job_id in (await request.post()).getall("job", []):
        engine.rebuild(str(job_id))
    raise web.HTTPSeeOther("/query")


# Access


async def login_page(request: web.Request) -> web.Response:
    """The login form."""
    return _login_form(request, "Enter the admin token to rebuild, cancel and start jobs.")


def _login_form(request: web.Request, message: str, status: int = 200) -> web.Response:
    access = request.app[ACCESS]
    if access.admin_token is None:
        message = "No admin token is configured: anyone on this machine may act."
    body = TEMPLATES["login"].substitute(message=escape(message),
                                         csrf=escape(access.csrf_token(request)))
    return page(request, "Log in", body, status=status)


async def login(request: web.Request) -> web.Response:
    """Check the token; on success, a cookie gives this browser's session the admin role."""
    access = request.app[ACCESS]
    form = await request.post()
    if not access.check_token(str(form.get("token", ""))):
        return _login_form(request, "Wrong token.", status=403)
    response = web.HTTPSeeOther("/")
    access.log_in(request, response)
    raise response


async def logout(request: web.Request) -> web.Response:
    """Forget the login cookie."""
    response = web.HTTPSeeOther("/")
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


# Machines


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# The application


@web.middleware
async def _guard(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """Check the CSRF token of POSTs; give a browser without a session its session cookie.

    Every POST but a webhook's (which checks its delivery's signature) carries the CSRF token of
    its session, or the bearer token (which a browser cannot be made to send).
    """
    access = request.app[ACCESS]
    if request.method == "POST" and not webhooks.is_webhook(request) \
            and not access.has_bearer(request):
        form = await request.post()
        if not access.check_csrf(request, str(form.get("csrf", ""))):
            raise web.HTTPForbidden(text="bad or missing CSRF token: reload the page")
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        access.remember(request, exc)
        raise
    # Cookies must be set before the response is prepared (event streams are, but make none).
    if not response.prepared:
        access.remember(request, response)
    return response


async def _headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


async def _end_streams(app: web.Application) -> None:
    # Event streams never end on their own; without this the server would wait for them.
    for task in list(app[STREAMS]):
        task.cancel()
    # A drawing under way would otherwise outlive the event loop.
    app[DIAGRAMS].close()


def make_app(engine: p.Engine, *, admin_token: str | None = None,
             webhook_secret: bytes | None = None,
             extra_routes: Iterable[web.AbstractRouteDef] = (),
             extra_links: Sequence[tuple[str, str]] = ()) -> web.Application:
    """The web UI of a started `engine`.

    `admin_token` is needed for actions (None: anyone on loopback may act); `webhook_secret` is
    the secret that webhooks check their deliveries' signatures against (`pipeline.web.webhooks`;
    None: they are off). Metrics count from now. `extra_routes` are pages and webhooks a
    pipeline adds (a list of route definitions or a `RouteTableDef`): they get the same security
    headers and, but for webhooks, CSRF checks; `extra_links` are (URL, label) pairs added to the
    nav bar.
    """
    app = web.Application(middlewares=[_guard])
    app[ENGINE] = engine
    app[ACCESS] = Access(admin_token)
    app[DIAGRAMS] = DiagramCache(engine)
    app[METRICS] = Metrics(engine)
    app[CHANGES] = ChangeFeed(engine)
    app[STREAMS] = set()
    app[webhooks.SECRET] = webhook_secret
    app[webhooks.DELIVERIES] = webhooks.Deliveries()
    app[NAV_LINKS] = "".join(f'<a href="{escape(url)}">{escape(label)}</a>\n'
                             for url, label in extra_links)
    app.on_response_prepare.append(_headers)
    app.on_shutdown.append(_end_streams)
    job = "/job/{day}/{rest}"
    app.add_routes([
        web.get("/", index),
        web.get("/pipeline.svg", pipeline_svg),
        web.get("/pipeline.dot", pipeline_dot),
        web.get("/events", events),
        web.get(job, job_page),
        web.get(job + "/log", job_log),
        web.get(job + "/log.txt", job_raw_log),
        web.post(job + "/{action:rebuild|cancel|start}", job_action),
        web.get("/jobs", jobs_page),
        web.get("/query", query_page),
        web.post("/query/rebuild", query_rebuild),
        web.get("/login", login_page),
        web.post("/login", login),
        web.post("/logout", logout),
        web.get("/metrics", metrics),
        web.static("/static", HERE / "static"),
    ])
    # Added after the UI's own, which aiohttp tries first: a pipeline cannot replace them.
    app.add_routes(extra_routes)
    return app


async def start_server(engine: p.Engine, *, host: str, port: int,
                       admin_token: str | None = None,
                       webhook_secret: bytes | None = None,
                       extra_routes: Iterable[web.AbstractRouteDef] = (),
                       extra_links: Sequence[tuple[str, str]] = ()) -> web.AppRunner:
    """Serve the web UI of `engine` on host:port; `await runner.cleanup()` stops it.

    `extra_routes` and `extra_links` are passed to `make_app`.

    Raises ValueError for a non-loopback `host` without `admin_token`, OSError if the port
    cannot be bound.
    """
    check_host(host, admin_token)
    app = make_app(engine, admin_token=admin_token, webhook_secret=webhook_secret,
                   extra_routes=extra_routes, extra_links=extra_links)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner listens on (useful when it was started on port 0)."""
    return int(runner.addresses[0][1])
