"""Pages in the style of ocaml-ci's site, and a status badge per branch, for a `Site`: OCaml CI's
(`OCAML_CI`, under `/ocaml`) or opam-repo-ci's (`OPAM_REPO_CI`, under `/opam`, whose branches are
pull requests). Under the site's prefix:

- `/ocaml`: the repositories; `/ocaml/REPO`: its branches, each with its head's result;
- `/ocaml/REPO/BRANCH`: the branch's head and its history (the last commits built);
- `/ocaml/REPO/commit/HASH`: a commit: its message, author, date and branches, its summary jobs
  (the analysis; and opam-repo-ci's lint) and the matrix of its other jobs, each cell with its
  state, how long it was queued and ran, its reason when skipped or failed, and a link to its
  log; for builders, "Rebuild failed" and "Rebuild all" (`POST /ocaml/REPO/commit/HASH/rebuild`:
  the matrix's jobs). OCaml CI's matrix has a row per platform and a column per kind of job
  (build, lint-opam, lint-fmt, lint-doc); opam-repo-ci's a row per package and platform and the
  columns build, test, lower-bounds and revdeps, whose cell holds the job listing the reverse
  dependencies, how many of their builds are in each state and each build (revdep, state, log);
- `/ocaml/REPO/BRANCH/badge.svg`: the head's result as a shields-style badge.

A branch named `commit/HASH`, or ending in `/badge.svg`, is hidden by those routes.

They read the status files the pipeline publishes (see `pipeline.ocaml.status`), so they show
what was last published, also for branches of an earlier run. Names in URLs are only ever looked
up among the files present: nothing a request says becomes part of a path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

import pipeline as p
from pipeline.ocaml.status import COMMITS, DEFAULT_CI, status_dir
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
_COUNTED_STATES = ("passed", "failed", "pending", "skipped")
"""The order of the states in a count of jobs ("3 passed, 1 failed")."""
_HASH = "{commit:[0-9a-f]{40}|[0-9a-f]{64}}"

# The badge: shields.io's flat style, its colours, and a character width that fits Verdana 11.
_BADGE_COLOURS = {"passed": "#4c1", "failed": "#e05d44", "error": "#e05d44",
                  "pending": "#dfb317", NO_BUILDS: "#9f9f9f"}
_BADGE_CHAR = 7
# GitHub's image proxy keeps a badge as long as its headers let it: not at all.
BADGE_HEADERS = {"Cache-Control": "no-cache, no-store, must-revalidate, max-age=0",
                 "Expires": "0"}


@dataclasses.dataclass(frozen=True)
class Site:
    """One CI's pages: whose status files they read (`ci`, see `pipeline.ocaml.status`), their
    URL prefix, the repositories page's title, the badge's left words, what a branch is called
    (plural, for the branches page and counts, and singular, for its column), and how a
    commit's page lays out its jobs.

    `summary` are the kinds of job shown one by one above the matrix (a job each); `rows` the
    job fields that make a matrix row (its header cells, in order); `columns` the kinds of job
    in the matrix, a column each; `listed` maps a kind of job to the column whose cell lists
    its jobs after that column's own job (with how many are in each state), each named by its
    field of that kind's name ("revdep"). Rebuilding acts on the matrix's jobs.
    """

    ci: str
    prefix: str
    title: str
    badge_title: str
    branches: str
    branch: str
    summary: tuple[str, ...]
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    listed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def rebuilt_kinds(self) -> frozenset[str]:
        """The kinds of the jobs "Rebuild failed" and "Rebuild all" act on: the matrix's."""
        return frozenset((*self.columns, *self.listed))


OCAML_CI = Site(ci=DEFAULT_CI, prefix="/ocaml", title="OCaml CI", badge_title="ocaml-ci",
                branches="Branches", branch="Branch", summary=("analysis",), rows=("platform",),
                columns=("build", "lint-opam", "lint-fmt", "lint-doc"))
"""OCaml CI's pages: a row per platform, its build and lints."""
OPAM_REPO_CI = Site(ci="opam-repo-ci", prefix="/opam", title="opam-repo-ci",
                    badge_title="opam-repo-ci", branches="Pull requests", branch="Pull request",
                    summary=("analysis", "lint"), rows=("package", "platform"),
                    columns=("build", "test", "lower-bounds", "revdeps"),
                    listed={"revdep": "revdeps"})
"""opam-repo-ci's pages: a row per package and platform, its build, tests, lower bounds and
reverse dependencies."""


def routes(state_dir: Path, site: Site = OCAML_CI) -> list[web.RouteDef]:
    """The pages of `site`, for `web_routes` of a pipeline file (see the module's docstring)."""
    pages = StatusPages(status_dir(state_dir, site.ci), site)
    prefix = site.prefix
    return [
        web.get(prefix, pages.repositories),
        web.get(f"{prefix}/{{repo}}", pages.branches),
        web.get(f"{prefix}/{{repo}}/commit/{_HASH}", pages.commit),
        web.post(f"{prefix}/{{repo}}/commit/{_HASH}/rebuild", pages.rebuild),
        # Branch names may hold slashes ("feature/x"): the rest of the path is the branch.
        web.get(f"{prefix}/{{repo}}/{{branch:.+}}/badge.svg", pages.badge),
        web.get(f"{prefix}/{{repo}}/{{branch:.+}}", pages.branch),
    ]


def commit_url(repo: str, commit: str, site: Site = OCAML_CI) -> str:
    """The path of the page of `commit` (a full hash) of the repository named `repo`."""
    return f"{_url(site, repo)}/commit/{quote(commit, safe='')}"


class StatusPages:
    """The pages' handlers, reading the status files under `root` on every request."""

    def __init__(self, root: Path, site: Site) -> None:
        """Serve the status files under `root` (which need not exist yet) as `site`'s pages."""
        self.root = root
        self.site = site

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
            rows.append(f'<tr data-repo="{escape(name)}"><td>'
                        f'<a href="{escape(_url(self.site, name))}">'
                        f"{escape(name)}</a></td><td>{counts}</td></tr>")
        body = ('<h1>Repositories</h1>\n<table id="repositories">'
                f"<tr><th>Repository</th><th>{escape(self.site.branches)}</th></tr>\n"
                + "\n".join(rows) + "</table>"
                if rows else "<h1>Repositories</h1>\n<p>No repository has been built yet.</p>")
        return page(request, self.site.title, body)

    async def branches(self, request: web.Request) -> web.Response:
        """A repository's branches, each with its head commit and that commit's result."""
        name, directory = self._repository(request)
        site = self.site
        rows = []
        for branch, path in _files(directory).items():
            status = _read(path)
            rows.append(
                f'<tr data-branch="{escape(branch)}"><td>'
                f'<a href="{escape(_url(site, name, branch))}">{escape(branch)}</a></td>'
                f"<td>{_commit_link(site, name, status['commit'])}</td>"
                f"<td>{_result(status['result'])}</td></tr>")
        body = (f"<h1>{_crumbs(site, name)}</h1>\n"
                f'<table id="branches"><tr><th>{escape(site.branch)}</th><th>Commit</th>'
                "<th>Result</th></tr>\n" + "\n".join(rows) + "</table>")
        return page(request, name, body)

    async def branch(self, request: web.Request) -> web.Response:
        """A branch: its head commit's result and the history of the commits built."""
        name, branch, status = self._branch(request)
        site = self.site
        rows = []
        for entry in status["history"]:
            commit = str(entry.get("commit") or "")
            rows.append(f'<tr data-commit="{escape(commit)}"><td>'
                        f'{_commit_link(site, name, commit)}'
                        f'</td><td>{escape(entry.get("message"))}</td>'
                        f'<td>{_result(entry.get("result"))}</td>'
                        f'<td>{escape(_moment(entry.get("published")))}</td></tr>')
        badge = escape(_url(site, name, branch) + "/badge.svg")
        body = (f"<h1>{_crumbs(site, name, branch)}</h1>\n<dl>"
                f'<dt>Head</dt><dd id="head">{_commit_link(site, name, status["commit"])} '
                f'{escape(_first_line(status["message"]))}</dd>'
                f'<dt>Result</dt><dd id="result">{_result(status["result"])} '
                f"{escape(status['reason'])}</dd>"
                f'<dt>Badge</dt><dd><img id="badge" src="{badge}" '
                f'alt="{escape(site.badge_title)} status"></dd>'
                "</dl>\n<h2>History</h2>\n"
                '<table id="history"><tr><th>Commit</th><th>Message</th><th>Result</th>'
                "<th>Published</th></tr>\n" + "\n".join(rows) + "</table>")
        return page(request, f"{name} {branch}", body)

    async def commit(self, request: web.Request) -> web.Response:
        """A commit: what git says of it, its branches, its result, its summary jobs and its
        jobs' matrix."""
        name, directory, status = self._commit(request)
        site = self.site
        commit = status["commit"]
        engine = request.app[ENGINE]
        jobs = [_with_live_job(engine, job) for job in status["jobs"]]
        summary = "".join(
            f'<dt>{escape(kind.capitalize())}</dt><dd id="{escape(kind)}">'
            f'{_cell(next((job for job in jobs if job.get("kind") == kind), {}))}</dd>'
            for kind in site.summary)
        info = "".join(f'<dt>{label}</dt><dd id="{label.lower()}">{escape(text)}</dd>'
                       for label, text in (("Author", status["author"]),
                                           ("Date", _moment(status["date"]))) if text)
        body = (f"<h1>{_crumbs(site, name)} / commit {escape(commit[:12])}</h1>\n"
                f'<pre id="message">{escape(status["message"])}</pre>\n<dl>'
                f'<dt>Commit</dt><dd><code id="commit">{escape(commit)}</code></dd>{info}'
                f'<dt>{escape(site.branches)}</dt>'
                f'<dd id="branches">{_branches_of(site, name, directory, commit)}</dd>'
                f'<dt>Result</dt><dd id="result">{_result(status["result"])} '
                f"{escape(status['reason'])}</dd>{summary}</dl>\n"
                f"{_rebuild_form(request, site, name, status)}"
                f"{_matrix(site, jobs)}")
        return page(request, f"{name} {commit[:12]}", body)

    async def rebuild(self, request: web.Request) -> web.Response:
        """Rebuild a commit's failed jobs, or all its matrix's jobs (builder role); back to the
        commit's page."""
        if request.app[ACCESS].role(request) < Role.BUILDER:
            raise web.HTTPForbidden(text="rebuilding needs the builder role: log in at /login")
        name, _directory, status = self._commit(request)
        which = (await request.post()).get("jobs")
        if which not in ("failed", "all"):
            raise web.HTTPBadRequest(text="jobs must be failed or all")
        engine = request.app[ENGINE]
        for job in _matrix_jobs(self.site, status["jobs"]):
            if job.get("job_id") and (which == "all" or job.get("state") == "failed"):
                engine.rebuild(str(job["job_id"]))
        raise web.HTTPSeeOther(commit_url(name, status["commit"], self.site))

    async def badge(self, request: web.Request) -> web.Response:
        """The branch head's result as an SVG badge, never kept by caches."""
        _name, _branch, status = self._branch(request)
        return web.Response(text=badge_svg(status["result"], self.site.badge_title),
                            content_type="image/svg+xml", headers=BADGE_HEADERS)


def badge_svg(result: str, title: str) -> str:
    """A shields-style badge: `title` ("ocaml-ci") on grey, then the result's words on its
    colour."""
    words = "running" if result == "pending" else _LABELS.get(result, result)
    colour = _BADGE_COLOURS.get(result, "#9f9f9f")
    left = len(title) * _BADGE_CHAR + 10
    right = len(words) * _BADGE_CHAR + 10
    width = left + right
    title, text = escape(title), escape(words)
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


def _matrix_jobs(site: Site, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of a commit in its matrix (all but the summary's: the analysis, a lint)."""
    return [job for job in jobs if job.get("kind") in site.rebuilt_kinds]


@dataclasses.dataclass
class _Row:
    """A row of the matrix: the job of each column, and the jobs listed in each column."""

    jobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    listed: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def experimental(self) -> bool:
        """Whether a job of the row is experimental (its platform is)."""
        listed = [job for jobs in self.listed.values() for job in jobs]
        return any(job.get("experimental") for job in [*self.jobs.values(), *listed])


def _matrix(site: Site, jobs: list[dict[str, Any]]) -> str:
    """The table of a commit's matrix jobs: a row per value of `site.rows` (a platform; a
    package and a platform), a column per kind of job, with the jobs `site.listed` in their
    column's cell."""
    rows: dict[tuple[str, ...], _Row] = {}
    for job in _matrix_jobs(site, jobs):
        row = rows.setdefault(tuple(str(job.get(field) or "") for field in site.rows), _Row())
        kind = str(job["kind"])
        if kind in site.listed:
            row.listed.setdefault(site.listed[kind], []).append(job)
        else:
            row.jobs[kind] = job
    if not rows:
        return "<p>No platform jobs (yet).</p>"
    lines = []
    for values, row in rows.items():
        attributes = " ".join(f'data-{field}="{escape(value)}"'
                              for field, value in zip(site.rows, values, strict=True))
        headers = [f"<th>{escape(value)}</th>" for value in values]
        if row.experimental():
            headers[-1] = headers[-1].removesuffix("</th>") + " (experimental)</th>"
        lines.append(f"<tr {attributes}>" + "".join(headers)
                     + "".join(f'<td data-kind="{escape(kind)}">'
                               f'{_cell(row.jobs.get(kind, {}))}'
                               f'{_listing(site, row.listed.get(kind, []))}</td>'
                               for kind in site.columns) + "</tr>")
    return ('<table id="matrix"><tr>'
            + "".join(f"<th>{escape(field.capitalize())}</th>" for field in site.rows)
            + "".join(f"<th>{escape(kind)}</th>" for kind in site.columns) + "</tr>\n"
            + "\n".join(lines) + "</table>")


def _listing(site: Site, jobs: list[dict[str, Any]]) -> str:
    """Jobs listed in a cell (a package's revdeps' builds): how many are in each state, then
    each, named by its field of its kind's name; folded unless one failed."""
    if not jobs:
        return ""
    counts: dict[str, int] = {}
    for job in jobs:
        state = str(job.get("state"))
        counts[state] = counts.get(state, 0) + 1
    order = [state for state in _COUNTED_STATES if state in counts] + \
        sorted(set(counts) - set(_COUNTED_STATES))
    count = ", ".join(f"{counts[state]} {state}" for state in order)
    items = "".join(
        f'<li data-{escape(job["kind"])}="{escape(job.get(job["kind"]))}">'
        f'{escape(job.get(job["kind"]))} {_cell(job)}</li>' for job in jobs)
    opened = " open" if "failed" in counts else ""
    return (f'<details class="listed"{opened}><summary class="count">{escape(count)}</summary>'
            f"<ul>{items}</ul></details>")


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


def _rebuild_form(request: web.Request, site: Site, repo: str, status: dict[str, Any]) -> str:
    """The rebuild buttons, for builders only; "Rebuild failed" only when a job failed."""
    access = request.app[ACCESS]
    if access.role(request) < Role.BUILDER:
        return ""
    jobs = [job for job in _matrix_jobs(site, status["jobs"]) if job.get("job_id")]
    if not jobs:
        return ""
    failed = any(job.get("state") == "failed" for job in jobs)
    action = escape(commit_url(repo, status["commit"], site) + "/rebuild")
    return (f'<form class="action" method="post" action="{action}">'
            f'<input type="hidden" name="csrf" value="{escape(access.csrf_token(request))}">'
            + ('<button id="rebuild-failed" type="submit" name="jobs" value="failed">'
               "Rebuild failed</button> " if failed else "")
            + '<button id="rebuild-all" type="submit" name="jobs" value="all">Rebuild all'
            "</button></form>\n")


def _branches_of(site: Site, repo: str, directory: Path, commit: str) -> str:
    """Links to the branches whose head is `commit` ("head") or whose history holds it."""
    links = []
    for branch, path in _files(directory).items():
        status = _read(path)
        link = f'<a href="{escape(_url(site, repo, branch))}">{escape(branch)}</a>'
        if status["commit"] == commit:
            links.append(f"{link} (head)")
        elif any(entry.get("commit") == commit for entry in status["history"]):
            links.append(link)
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


def _url(site: Site, repo: str, branch: str | None = None) -> str:
    url = f"{site.prefix}/{quote(repo, safe='')}"
    return url if branch is None else url + "/" + quote(branch, safe="/")


def _commit_link(site: Site, repo: str, commit: str) -> str:
    """The commit's short hash, linking to its page."""
    if not commit:
        return ""
    return (f'<a href="{escape(commit_url(repo, commit, site))}">'
            f"<code>{escape(commit[:12])}</code></a>")


def _result(result: object) -> str:
    """A result or job state, labelled and coloured as the UI colours node states."""
    text = "unknown" if result is None else str(result)
    colour = _COLOURS.get(text, NodeState.PENDING)
    return (f'<span class="state state-{escape(colour)}" data-result="{escape(text)}">'
            f"{escape(_LABELS.get(text, text))}</span>")


def _crumbs(site: Site, repo: str, branch: str | None = None) -> str:
    """Where the page is: links back up to the repositories and the repository."""
    crumbs = (f'<a href="{escape(site.prefix)}">Repositories</a> / '
              f'<a href="{escape(_url(site, repo))}">{escape(repo)}</a>')
    return crumbs if branch is None else f"{crumbs} / {escape(branch)}"
