"""Pages in the style of ocaml-ci's site: repositories → branches → a branch's head commit.

They read the status files the pipeline publishes (see `pipeline.ocaml.status`), so they show
what was last published, also for branches of an earlier run. Names in URLs are only ever looked
up among the files present: nothing a request says becomes part of a path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from pipeline.ocaml.status import STATUS_DIR
from pipeline.output import NodeState
from pipeline.web.server import escape, page

# A result or job state -> the node state of that colour (app.css has a class per node state).
_COLOURS = {
    "passed": NodeState.OK, "ok": NodeState.OK, "success": NodeState.OK,
    "failed": NodeState.FAILED, "error": NodeState.FAILED, "failure": NodeState.FAILED,
    "pending": NodeState.RUNNING, "running": NodeState.RUNNING, "active": NodeState.RUNNING,
    "ready": NodeState.READY, "skipped": NodeState.BLOCKED, "cancelled": NodeState.BLOCKED,
}


def routes(state_dir: Path) -> list[web.RouteDef]:
    """The pages, for `web_routes` of a pipeline file: `/ocaml` (repositories), `/ocaml/REPO`
    (its branches, each with its head's result) and `/ocaml/REPO/BRANCH` (the head's jobs)."""
    pages = StatusPages(state_dir / STATUS_DIR)
    return [
        web.get("/ocaml", pages.repositories),
        web.get("/ocaml/{repo}", pages.branches),
        # Branch names may hold slashes ("feature/x"): the rest of the path is the branch.
        web.get("/ocaml/{repo}/{branch:.+}", pages.commit),
    ]


class StatusPages:
    """The three pages' handlers, reading the status files under `root` on every request."""

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

    async def repositories(self, request: web.Request) -> web.Response:
        """Every repository with a status file, with how many of its branches are in each
        result."""
        rows = []
        for name, directory in self._repositories().items():
            results: dict[str, int] = {}
            for status in map(_read, _branches(directory).values()):
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
        for branch, path in _branches(directory).items():
            status = _read(path)
            rows.append(
                f'<tr data-branch="{escape(branch)}"><td><a href="{escape(_url(name, branch))}">'
                f"{escape(branch)}</a></td><td><code>{escape(status['commit'][:12])}</code></td>"
                f"<td>{_result(status['result'])}</td></tr>")
        body = (f"<h1>{_crumbs(name)}</h1>\n"
                '<table id="branches"><tr><th>Branch</th><th>Commit</th><th>Result</th></tr>\n'
                + "\n".join(rows) + "</table>")
        return page(request, name, body)

    async def commit(self, request: web.Request) -> web.Response:
        """A branch's head commit: its result and its jobs, each linking to its log."""
        name, directory = self._repository(request)
        branch = request.match_info["branch"]
        path = _branches(directory).get(branch)
        if path is None:
            raise web.HTTPNotFound(text=f"no branch {branch} in {name}")
        status = _read(path)
        rows = []
        for job in status["jobs"]:
            job_id = job.get("job_id")
            # A job that has not started (or was skipped before running) has no page yet.
            link = (f'<a href="{escape("/job/" + quote(str(job_id), safe="/"))}">'
                    f"{escape(job_id)}</a>" if job_id else "")
            # A failure of an experimental job does not fail the commit: say so.
            experimental = " (experimental)" if job.get("experimental") else ""
            rows.append(f'<tr data-job="{escape(job.get("name"))}"><td>{escape(job.get("name"))}'
                        f"{experimental}</td>"
                        f'<td>{_result(job.get("state"))}</td><td>{link}</td>'
                        f'<td class="reason">{escape(job.get("reason"))}</td></tr>')
        body = (f"<h1>{_crumbs(name, branch)}</h1>\n<dl>"
                f"<dt>Repository</dt><dd>{escape(status['repo'])}</dd>"
                f'<dt>Commit</dt><dd><code id="commit">{escape(status["commit"])}</code></dd>'
                f'<dt>Result</dt><dd id="result">{_result(status["result"])} '
                f"{escape(status['reason'])}</dd></dl>\n"
                '<table id="jobs"><tr><th>Job</th><th>State</th><th>Log</th><th>Reason</th>'
                "</tr>\n" + "\n".join(rows) + "</table>")
        return page(request, f"{name} {branch}", body)


def _branches(directory: Path) -> dict[str, Path]:
    """The status files of a repository by branch name (percent-encoded in the file's name)."""
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
    jobs = data.get("jobs")
    return {"repo": str(data.get("repo") or ""), "branch": str(data.get("branch") or ""),
            "commit": str(data.get("commit") or ""), "result": str(data.get("result") or "unknown"),
            "reason": data.get("reason"),
            "jobs": [job for job in jobs if isinstance(job, dict)] if isinstance(jobs, list)
            else []}


def _url(repo: str, branch: str | None = None) -> str:
    url = "/ocaml/" + quote(repo, safe="")
    return url if branch is None else url + "/" + quote(branch, safe="/")


def _result(result: object) -> str:
    """A result or job state, labelled and coloured as the UI colours node states."""
    text = "unknown" if result is None else str(result)
    colour = _COLOURS.get(text, NodeState.PENDING)
    return f'<span class="state state-{colour}" data-result="{escape(text)}">{escape(text)}</span>'


def _crumbs(repo: str, branch: str | None = None) -> str:
    """Where the page is: links back up to the repositories and the repository."""
    crumbs = (f'<a href="/ocaml">Repositories</a> / '
              f'<a href="{escape(_url(repo))}">{escape(repo)}</a>')
    return crumbs if branch is None else f"{crumbs} / {escape(branch)}"
