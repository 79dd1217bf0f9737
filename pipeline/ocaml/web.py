"""Pages in the style of ocaml-ci's site, and a status badge per branch.

- `/ocaml`: the repositories; `/ocaml/REPO`: its branches, each with its head's result;
- `/ocaml/REPO/BRANCH`: the branch's head and its history (the last commits built);
- `/ocaml/REPO/commit/HASH`: a commit: its message, author, date and branches, and the matrix
  of its jobs (a row per platform, a column per kind of job), each cell with its state, how
  long it was queued and ran, its reason when skipped or failed, and a link to its log; for
  builders, "Rebuild failed" and "Rebuild all" (`POST /ocaml/REPO/commit/HASH/rebuild`);
- `/ocaml/REPO/BRANCH/badge.svg`: the head's result as a shields-style badge.

A branch named `commit/HASH`, or ending in `/badge.svg`, is hidden by those routes.

They read the status files the pipeline publishes (see `pipeline.ocaml.status`), so they show
what was last published, also for branches of an earlier run. Names in URLs are only ever looked
up among the files present: nothing a request says becomes part of a path.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

import pipeline as p
from pipeline.ocaml.status import COMMITS, STATUS_DIR
from pipeline.output import NodeState
from pipeline.web.auth import Role
from pipeline.web.server import ACCESS, ENGINE, duration_text, escape, page

NO_BUILDS = "no-builds"
# A result or job state -> its colour: the class of the node state of that colour (app.css has
# one per node state), or a class of its own.
_COLOURS: dict[str, str] = {
    "passed": NodeState.OK, "failed": NodeState.FAILED, "error": NodeState.FAILED,
    "pending": NodeState.RUNNING, "skipped": NodeState.BLOCKED, NO_BUILDS: NO_BUILDS,
}
_LABELS = {NO_BUILDS: "no builds"}
"""A result's words, where they differ from its name."""
COLUMNS = ("build", "lint-opam", "lint-fmt", "lint-doc")
"""The commit page's columns: the kinds of a platform's jobs."""
_HASH = "{commit:[0-9a-f]{40}|[0-9a-f]{64}}"

# The badge: shields.io's flat style, its colours, and a character width that fits Verdana 11.
_BADGE_COLOURS = {"passed": "#4c1", "failed": "#e05d44", "error": "#e05d44",
                  "pending": "#dfb317", NO_BUILDS: "#9f9f9f"}
_BADGE_CHAR = 7
_BADGE_TITLE = "ocaml-ci"
# GitHub's image proxy keeps a badge as long as its headers let it: not at all.
BADGE_HEADERS = {"Cache-Control": "no-cache, no-store, must-revalidate, max-age=0",
                 "Expires": "0"}


def routes(state_dir: Path) -> list[web.RouteDef]:
    """The pages, for `web_routes` of a pipeline file (see the module's docstring)."""
    pages = StatusPages(state_dir / STATUS_DIR)
    return [
        web.get("/ocaml", pages.repositories),
        web.get("/ocaml/{repo}", pages.branches),
        web.get(f"/ocaml/{{repo}}/commit/{_HASH}", pages.commit),
        web.post(f"/ocaml/{{repo}}/commit/{_HASH}/rebuild", pages.rebuild),
        # Branch names may hold slashes ("feature/x"): the rest of the path is the branch.
        web.get("/ocaml/{repo}/{branch:.+}/badge.svg", pages.badge),
        web.get("/ocaml/{repo}/{branch:.+}", pages.branch),
    ]


def commit_url(repo: str, commit: str) -> str:
    """The path of the page of `commit` (a full hash) of the repository named `repo`."""
    return f"{_url(repo)}/commit/{quote(commit, safe='')}"


class StatusPages:
    """The pages' handlers, reading the status files under `root` on every request."""

    def __init__(self, root: Path) -> None:
        """Serve the status files under `root` (which need not exist yet)."""
        self.root = root

    def _repositories(self) -> dict[str, Path]:
        if not self.root.is_dir():
            return {}
        return {entry.name: entry for entry in sorted(self.root.iterdir())
                if entry.is_dir() and not entry.is_symlink()}

    def _repository(self, request: web.Request) -> tuple[str, Path]:
        name = request.match_info["repo"]
        directory = self._repositories().get(name)
        if directory is None:
            raise web.HTTPNotFound(text=f"no repository {name}")
        return name, directory

    def _branch(self, request: web.Request) -> tuple[str, str, dict[str, Any]]:
        """The repository's name, the branch's and its status file; 404 if there is none."""
        name, directory = self._repository(request)
        branch = request.match_info["branch"]
        path = _files(directory).get(branch)
        if path is None:
            raise web.HTTPNotFound(text=f"no branch {branch} in {name}")
        return name, branch, _read(path)

    def _commit(self, request: web.Request) -> tuple[str, Path, dict[str, Any]]:
        """The repository's name and directory and the commit's file; 404 if there is none."""
        name, directory = self._repository(request)
        commit = request.match_info["commit"]
        path = _files(directory / COMMITS).get(commit)
        if path is None:
            raise web.HTTPNotFound(text=f"no commit {commit} in {name}")
        return name, directory, _read(path)

    async def repositories(self, request: web.Request) -> web.Response:
        """Every repository with a status file, with how many of its branches are in each
        result."""
        rows = []
        for name, directory in self._repositories().items():
            results: dict[str, int] = {}
            for status in map(_read, _files(directory).values()):
                results[status["result"]] = results.get(status["result"], 0) + 1
            counts = " ".join(f"{_result(result)} {n}" for result, n in sorted(results.items()))
            rows.append(f'<tr data-repo="{escape(name)}"><td><a href="{escape(_url(name))}">'
                        f"{escape(name)}</a></td><td>{counts}</td></tr>")
        body = ('<h1>Repositories</h1>\n<table id="repositories">'
                "<tr><th>Repository</th><th>Branches</th></tr>\n" + "\n".join(rows) + "</table>"
                if rows else "<h1>Repositories</h1>\n<p>No repository has been built yet.</p>")
        return page(request, "OCaml CI", body)

    async def branches(self, request: web.Request) -> web.Response:
        """A repository's branches, each with its head commit and that commit's result."""
        name, directory = self._repository(request)
        rows = []
        for branch, path in _files(directory).items():
            status = _read(path)
            rows.append(
                f'<tr data-branch="{escape(branch)}"><td><a href="{escape(_url(name, branch))}">'
                f"{escape(branch)}</a></td><td>{_commit_link(name, status['commit'])}</td>"
                f"<td>{_result(status['result'])}</td></tr>")
        body = (f"<h1>{_crumbs(name)}</h1>\n"
                '<table id="branches"><tr><th>Branch</th><th>Commit</th><th>Result</th></tr>\n'
                + "\n".join(rows) + "</table>")
        return page(request, name, body)

    async def branch(self, request: web.Request) -> web.Response:
        """A branch: its head commit's result and the history of the commits built."""
        name, branch, status = self._branch(request)
        rows = []
        for entry in status["history"]:
            commit = str(entry.get("commit") or "")
            rows.append(f'<tr data-commit="{escape(commit)}"><td>{_commit_link(name, commit)}'
                        f'</td><td>{escape(entry.get("message"))}</td>'
                        f'<td>{_result(entry.get("result"))}</td>'
                        f'<td>{escape(_moment(entry.get("published")))}</td></tr>')
        badge = escape(_url(name, branch) + "/badge.svg")
        body = (f"<h1>{_crumbs(name, branch)}</h1>\n<dl>"
                f'<dt>Head</dt><dd id="head">{_commit_link(name, status["commit"])} '
                f'{escape(_first_line(status["message"]))}</dd>'
                f'<dt>Result</dt><dd id="result">{_result(status["result"])} '
                f"{escape(status['reason'])}</dd>"
                f'<dt>Badge</dt><dd><img id="badge" src="{badge}" alt="ocaml-ci status"></dd>'
                "</dl>\n<h2>History</h2>\n"
                '<table id="history"><tr><th>Commit</th><th>Message</th><th>Result</th>'
                "<th>Published</th></tr>\n" + "\n".join(rows) + "</table>")
        return page(request, f"{name} {branch}", body)

    async def commit(self, request: web.Request) -> web.Response:
        """A commit: what git says of it, its branches, its result and its jobs' matrix."""
        name, directory, status = self._commit(request)
        commit = status["commit"]
        engine = request.app[ENGINE]

        def live(job: dict[str, Any]) -> dict[str, Any]:
            return _with_live_job(engine, job)

        analysis = next((job for job in status["jobs"] if job.get("kind") == "analysis"), {})
        info = "".join(f'<dt>{label}</dt><dd id="{label.lower()}">{escape(text)}</dd>'
                       for label, text in (("Author", status["author"]),
                                           ("Date", _moment(status["date"]))) if text)
        body = (f"<h1>{_crumbs(name)} / commit {escape(commit[:12])}</h1>\n"
                f'<pre id="message">{escape(status["message"])}</pre>\n<dl>'
                f'<dt>Commit</dt><dd><code id="commit">{escape(commit)}</code></dd>{info}'
                f'<dt>Branches</dt><dd id="branches">{_branches_of(name, directory, commit)}</dd>'
                f'<dt>Result</dt><dd id="result">{_result(status["result"])} '
                f"{escape(status['reason'])}</dd>"
                f'<dt>Analysis</dt><dd id="analysis">{_cell(live(analysis))}</dd></dl>\n'
                f"{_rebuild_form(request, name, status)}"
                f"{_matrix([live(job) for job in status['jobs']])}")
        return page(request, f"{name} {commit[:12]}", body)

    async def rebuild(self, request: web.Request) -> web.Response:
        """Rebuild a commit's failed jobs, or all its platform jobs (builder role); back to the
        commit's page."""
        if request.app[ACCESS].role(request) < Role.BUILDER:
            raise web.HTTPForbidden(text="rebuilding needs the builder role: log in at /login")
        name, _directory, status = self._commit(request)
        which = (await request.post()).get("jobs")
        if which not in ("failed", "all"):
            raise web.HTTPBadRequest(text="jobs must be failed or all")
        engine = request.app[ENGINE]
        for job in _platform_jobs(status["jobs"]):
            if job.get("job_id") and (which == "all" or job.get("state") == "failed"):
                engine.rebuild(str(job["job_id"]))
        raise web.HTTPSeeOther(commit_url(name, status["commit"]))

    async def badge(self, request: web.Request) -> web.Response:
        """The branch head's result as an SVG badge, never kept by caches."""
        _name, _branch, status = self._branch(request)
        return web.Response(text=badge_svg(status["result"]), content_type="image/svg+xml",
                            headers=BADGE_HEADERS)


def badge_svg(result: str) -> str:
    """A shields-style badge: "ocaml-ci" on grey, then the result's words on its colour."""
    words = "running" if result == "pending" else _LABELS.get(result, result)
    colour = _BADGE_COLOURS.get(result, "#9f9f9f")
    left = len(_BADGE_TITLE) * _BADGE_CHAR + 10
    right = len(words) * _BADGE_CHAR + 10
    width = left + right
    title, text = escape(_BADGE_TITLE), escape(words)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
            f'aria-label="{title}: {text}"><title>{title}: {text}</title>'
            f'<rect width="{left}" height="20" fill="#555"/>'
            f'<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
            '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,'
            'sans-serif" font-size="11">'
            f'<text x="{left / 2}" y="14">{title}</text>'
            f'<text x="{left + right / 2}" y="14">{text}</text></g></svg>\n')


def _with_live_job(engine: p.Engine, job: dict[str, Any]) -> dict[str, Any]:
    """A pending job with the id and times of the job that runs it now, if one does (the status
    file has them only once it finished), its times as far as they go: `now` ends them."""
    op, key = job.get("op"), job.get("key")
    if job.get("state") != "pending" or not isinstance(op, str) or not isinstance(key, str):
        return job
    instance = engine.cache.live(op, key)
    running = instance.job if instance is not None else None
    if running is None:
        return job
    now = datetime.now(UTC).isoformat()
    return {**job, "job_id": running.id, "queued": running.created.isoformat(),
            "started": running.started.isoformat() if running.started else now,
            "finished": now if running.started else None}


def _platform_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of a commit but its analysis: its platforms' builds and lints."""
    return [job for job in jobs if job.get("kind") in COLUMNS]


def _matrix(jobs: list[dict[str, Any]]) -> str:
    """The table of a commit's platform jobs: a row per platform, a column per kind."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for job in _platform_jobs(jobs):
        cells.setdefault(str(job.get("platform")), {})[str(job["kind"])] = job
    if not cells:
        return "<p>No platform jobs (yet).</p>"
    rows = []
    for platform, row in cells.items():
        experimental = (" (experimental)"
                        if any(job.get("experimental") for job in row.values()) else "")
        rows.append(f'<tr data-platform="{escape(platform)}"><th>{escape(platform)}'
                    f"{experimental}</th>"
                    + "".join(f'<td data-kind="{kind}">{_cell(row[kind]) if kind in row else ""}'
                              "</td>" for kind in COLUMNS) + "</tr>")
    return ('<table id="matrix"><tr><th>Platform</th>'
            + "".join(f"<th>{kind}</th>" for kind in COLUMNS) + "</tr>\n"
            + "\n".join(rows) + "</table>")


def _cell(job: dict[str, Any]) -> str:
    """A job's state, durations, log link and reason."""
    if not job:
        return ""
    job_id = job.get("job_id")
    # A job that has not run yet has no page.
    link = (f' <a class="log" href="{escape("/job/" + quote(str(job_id), safe="/"))}">'
            "log</a>" if job_id else "")
    durations = _durations(job)
    reason = job.get("reason")
    return (_result(job.get("state")) + link
            + (f' <span class="durations">{escape(durations)}</span>' if durations else "")
            + (f'<div class="reason">{escape(_first_line(reason))}</div>' if reason else ""))


def _durations(job: dict[str, Any]) -> str:
    """"queued 2.0 s, ran 1 min 5 s" from a job's times (what is known of them); a job that
    runs now "has run" so far."""
    queued, started, finished = (_parse_time(job.get(name))
                                 for name in ("queued", "started", "finished"))
    parts = []
    if queued is not None and started is not None:
        parts.append(f"queued {duration_text(started - queued)}")
    if started is not None and finished is not None:
        verb = "has run" if job.get("state") == "pending" else "ran"
        parts.append(f"{verb} {duration_text(finished - started)}")
    return ", ".join(parts)


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


def _moment(text: object) -> str:
    """A stored time for people: to the second, without the 'T'."""
    moment = _parse_time(text)
    return moment.strftime("%Y-%m-%d %H:%M:%S %z").rstrip() if moment else ""


def _rebuild_form(request: web.Request, repo: str, status: dict[str, Any]) -> str:
    """The rebuild buttons, for builders only; "Rebuild failed" only when a job failed."""
    access = request.app[ACCESS]
    if access.role(request) < Role.BUILDER:
        return ""
    jobs = [job for job in _platform_jobs(status["jobs"]) if job.get("job_id")]
    if not jobs:
        return ""
    failed = any(job.get("state") == "failed" for job in jobs)
    action = escape(commit_url(repo, status["commit"]) + "/rebuild")
    return (f'<form class="action" method="post" action="{action}">'
            f'<input type="hidden" name="csrf" value="{escape(access.csrf_token(request))}">'
            + ('<button id="rebuild-failed" type="submit" name="jobs" value="failed">'
               "Rebuild failed</button> " if failed else "")
            + '<button id="rebuild-all" type="submit" name="jobs" value="all">Rebuild all'
            "</button></form>\n")


def _branches_of(repo: str, directory: Path, commit: str) -> str:
    """Links to the branches whose head is `commit` ("head") or whose history holds it."""
    links = []
    for branch, path in _files(directory).items():
        status = _read(path)
        if status["commit"] == commit:
            links.append(f'<a href="{escape(_url(repo, branch))}">{escape(branch)}</a> (head)')
        elif any(entry.get("commit") == commit for entry in status["history"]):
            links.append(f'<a href="{escape(_url(repo, branch))}">{escape(branch)}</a>')
    return ", ".join(links)


def _files(directory: Path) -> dict[str, Path]:
    """The status files in `directory` by name (a branch's, percent-encoded, or a commit's)."""
    # The status publisher's files being written end in .tmp: they are not matched.
    return {unquote(path.stem): path for path in sorted(directory.glob("*.json"))
            if path.is_file() and not path.is_symlink()}


def _read(path: Path) -> dict[str, Any]:
    """A status file, with defaults for what it lacks.

    A file that cannot be read or parsed (say, caught half-written) shows as result "unknown"
    rather than failing the page.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        data = {}

    def dicts(name: str) -> list[dict[str, Any]]:
        items = data.get(name)
        return [item for item in items if isinstance(item, dict)] \
            if isinstance(items, list) else []

    return {**{name: str(data.get(name) or "")
               for name in ("repo", "branch", "commit", "message", "author", "date")},
            "result": str(data.get("result") or "unknown"), "reason": data.get("reason"),
            "jobs": dicts("jobs"), "history": dicts("history")}


def _first_line(text: object) -> str:
    return str(text or "").split("\n", 1)[0]


def _url(repo: str, branch: str | None = None) -> str:
    url = "/ocaml/" + quote(repo, safe="")
    return url if branch is None else url + "/" + quote(branch, safe="/")


def _commit_link(repo: str, commit: str) -> str:
    """The commit's short hash, linking to its page."""
    if not commit:
        return ""
    return (f'<a href="{escape(commit_url(repo, commit))}"><code>{escape(commit[:12])}</code>'
            "</a>")


def _result(result: object) -> str:
    """A result or job state, labelled and coloured as the UI colours node states."""
    text = "unknown" if result is None else str(result)
    colour = _COLOURS.get(text, NodeState.PENDING)
    return (f'<span class="state state-{escape(colour)}" data-result="{escape(text)}">'
            f"{escape(_LABELS.get(text, text))}</span>")


def _crumbs(repo: str, branch: str | None = None) -> str:
    """Where the page is: links back up to the repositories and the repository."""
    crumbs = (f'<a href="/ocaml">Repositories</a> / '
              f'<a href="{escape(_url(repo))}">{escape(repo)}</a>')
    return crumbs if branch is None else f"{crumbs} / {escape(branch)}"
