"""The result of a commit from the states of its jobs, and the JSON status publisher.

Under `STATE_DIR/<ci>/status/<repo-name>/`, where `<ci>` names the CI that publishes
(`ocaml-ci`, the default, or `opam-repo-ci`), the publisher keeps two kinds of file:

- `commits/<40 hex>.json`, a commit and its jobs:

      {"repo": "ocaml-hello", "commit": "<40 hex>",
       "result": "passed" | "failed" | "pending" | "no-builds" | "error",
       "reason": "...",                          # for "no-builds" (why) and "error"
       "message": "...", "author": "Name <mail>", "date": "<ISO 8601>",   # once analysed
       "jobs": [{"name": "debian-12-4.13 (lint-fmt)",
                 "kind": "analysis" | "build" | "lint-opam" | "lint-fmt" | "lint-doc"
                         # OCaml CI's; opam-repo-ci's: "analysis" | "lint" | "build" | "test"
                         # | "lower-bounds" | "revdeps" (listing them) | "revdep" (building one)
                 "platform": "debian-12-4.13",  # but for the analysis (and opam's lint)
                 "package": "foo.1.0",            # opam-repo-ci: the package built, if any
                 "revdep": "bar.2.0",             # opam-repo-ci: the revdep built, if any
                 "state": "passed" | "failed" | "skipped" | "pending",
                 "job_id": "...",                 # once it ran (see `JobStatus`)
                 "reason": "...",                 # for failed and skipped jobs
                 "queued": "...", "started": "...", "finished": "...",   # ISO 8601, once it ran
                 "op": "...", "key": "...",       # while pending: its cache operation and key
                 "experimental": true}]}          # only when true

- `<branch>.json` (the branch name percent-encoded, so `feature/x` is `feature%2Fx.json`): the
  branch's head commit as above, plus `"branch"` and `"history"`, the last `HISTORY_LENGTH`
  commits published for the branch, newest first:
  `[{"commit", "result", "message" (its first line), "published" (ISO 8601)}]`.

A commit is passed when a build that counts (not experimental) passed and no job that counts
failed; it is "no-builds" when no build that counts ran (each was skipped, say for a dependency
Debian lacks): lint results do not make a commit passed. ocaml-ci does the same ("No builds at
all!" when everything was skipped). Where building is not required (a pull request to an opam
repository that changes no package to build), no build is passed: opam-repo-ci says "no build
was necessary".

Files are replaced atomically (written aside, then renamed), so a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pipeline as p
from pipeline.cache.storage import Database, Entry
from pipeline.ocaml.failures import shown
from pipeline.output import Active, Failed, Ok, Output

JobState = Literal["passed", "failed", "skipped", "pending"]
Result = Literal["passed", "failed", "pending", "no-builds", "error"]

DEFAULT_CI = "ocaml-ci"
"""The CI whose status files `publish` writes unless told another."""
_CI_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
COMMITS = "commits"
"""The directory of the commit files, in a repository's directory."""
HISTORY_LENGTH = 20
"""How many commits a branch's history keeps."""
ANALYSIS = "(analysis)"
"""The analysis job's name."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job of a commit: its name, kind and platform (None for the analysis), whether its
    failure is tolerated, and the cache operation and key digest that find its run in the
    engine's records (its times, and its id when its value does not carry one: a failed job
    has no value); for opam-repo-ci, the package it builds and the revdep ("N.V"), if any."""

    name: str
    kind: str
    platform: str | None
    op: str
    key_digest: str
    experimental: bool = False
    package: str | None = None
    revdep: str | None = None


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """One job of a commit as reported. `job_id` and the times are None until the job has
    finished (and for a job blocked by an earlier failure, which never ran). A pending job
    carries its cache operation and key digest instead (`op`, `key`), so that a page can find
    its live job. `package` and `revdep` are the spec's."""

    name: str
    kind: str
    platform: str | None
    state: JobState
    job_id: str | None = None
    reason: str | None = None
    experimental: bool = False
    queued: str | None = None
    started: str | None = None
    finished: str | None = None
    op: str | None = None
    key: str | None = None
    package: str | None = None
    revdep: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The job's entry in a status file: absent fields are left out."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for field in ("platform", "package", "revdep"):
            if getattr(self, field) is not None:
                entry[field] = getattr(self, field)
        entry["state"] = self.state
        for field in ("job_id", "reason", "queued", "started", "finished", "op", "key"):
            if getattr(self, field) is not None:
                entry[field] = getattr(self, field)
        if self.experimental:
            entry["experimental"] = True
        return entry


@dataclasses.dataclass(frozen=True)
class CommitInfo:
    """What git says of a commit: its whole message, author ("Name <mail>") and author date
    (ISO 8601)."""

    message: str
    author: str
    date: str


@dataclasses.dataclass(frozen=True)
class CommitStatus:
    """A branch's head commit, its result and its jobs; `info` once the analysis read it."""

    repo: str
    branch: str
    commit: str
    result: Result
    jobs: tuple[JobStatus, ...]
    reason: str | None = None
    info: CommitInfo | None = None

    def to_json(self) -> dict[str, Any]:
        """The commit file's content."""
        status: dict[str, Any] = {"repo": self.repo, "commit": self.commit,
                                  "result": self.result}
        if self.reason is not None:
            status["reason"] = self.reason
        if self.info is not None:
            status.update(dataclasses.asdict(self.info))
        status["jobs"] = [job.to_json() for job in self.jobs]
        return status


def job_status(spec: JobSpec, output: Output) -> JobStatus:
    """A job's status from its node's output, as given by `p.state`.

    Our builders' values are dicts carrying `job_id`, and `skipped` (the reason) for a job that
    had nothing to do; an error is a failure whose reason is the error's message.
    """
    def status(state: JobState, job_id: str | None = None,
               reason: str | None = None) -> JobStatus:
        return JobStatus(spec.name, spec.kind, spec.platform, state, job_id, reason,
                         spec.experimental, package=spec.package, revdep=spec.revdep)

    if isinstance(output, Ok):
        value = output.value if isinstance(output.value, dict) else {}
        skipped = value.get("skipped")
        return status("skipped" if skipped is not None else "passed", value.get("job_id"),
                      skipped)
    if isinstance(output, Failed):
        return status("failed", reason=shown(output.message))
    assert isinstance(output, Active)
    return dataclasses.replace(status("pending"), op=spec.op, key=spec.key_digest)


def commit_result(jobs: Sequence[JobStatus], *,
                  builds_required: bool = True) -> tuple[Result, str | None]:
    """The result of a commit and, for "no-builds", why.

    Failed when a job that is not experimental failed (even while others run: the outcome is
    already known); pending while any job has not finished; "no-builds" when no build that
    is not experimental passed (each was skipped: the reason gives their reasons), since
    nothing was compiled, unless `builds_required` is False (a commit with nothing to build
    passes on its other jobs); passed otherwise. Skipped lints and experimental failures do not
    fail the commit.
    """
    if any(job.state == "failed" and not job.experimental for job in jobs):
        return "failed", None
    if any(job.state == "pending" for job in jobs):
        return "pending", None
    builds = [job for job in jobs if job.kind == "build" and not job.experimental]
    if not builds_required or any(job.state == "passed" for job in builds):
        return "passed", None
    reasons = dict.fromkeys(f"{job.platform}: {job.reason}" for job in builds if job.reason)
    return "no-builds", "; ".join(reasons) or "no build job"


def _quoted(branch: str) -> str:
    return urllib.parse.quote(branch, safe="")


def _checked(ci: str) -> str:
    """`ci`, a CI's name; ValueError unless it is lower-case letters, digits and dashes (it
    becomes part of a path)."""
    if not _CI_NAME.fullmatch(ci):
        raise ValueError(f"{ci!r} is not a CI name (lower-case letters, digits and dashes)")
    return ci


def status_dir(state_dir: Path, ci: str = DEFAULT_CI) -> Path:
    """The directory of the status files of the CI named `ci` (one directory a repository);
    ValueError for a name `ci` cannot be."""
    return state_dir / _checked(ci) / "status"


def status_path(state_dir: Path, repo: str, branch: str, *, ci: str = DEFAULT_CI) -> Path:
    """The status file of `branch` of the repository named `repo`."""
    return status_dir(state_dir, ci) / repo / f"{_quoted(branch)}.json"


def commit_path(state_dir: Path, repo: str, commit: str, *, ci: str = DEFAULT_CI) -> Path:
    """The file of the commit `commit` (its full hash) of the repository named `repo`."""
    return status_dir(state_dir, ci) / repo / COMMITS / f"{commit}.json"


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _run_of(records: Database, spec: JobSpec, job: JobStatus) -> Entry | None:
    """The stored run of `job` (not pending): by its id, or the latest of its key for a job
    whose value (a failed one has none) did not give its id."""
    if job.job_id is not None:
        return records.entry(job.job_id)
    return records.latest(spec.op, spec.key_digest)


def _with_runs(records: Database, publication: Publication) -> CommitStatus:
    """The status with each finished job's id and times from the engine's records."""
    status = publication.status
    specs = {spec.name: spec for spec in publication.specs}
    jobs = []
    for job in status.jobs:
        spec = specs.get(job.name)
        run = _run_of(records, spec, job) if spec is not None and job.state != "pending" \
            else None
        if run is not None:
            job = dataclasses.replace(job, job_id=run.job_id, queued=_time(run.queued),
                                      started=_time(run.started), finished=_time(run.finished))
        jobs.append(job)
    return dataclasses.replace(status, jobs=tuple(jobs))


def _write(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(aside, path)


def _history(path: Path) -> list[dict[str, Any]]:
    """The history in the branch file at `path` (none if it is missing or unreadable)."""
    try:
        history = json.loads(path.read_text()).get("history")
    except (OSError, ValueError, AttributeError):
        return []
    return [entry for entry in history if isinstance(entry, dict)] \
        if isinstance(history, list) else []


def write_status(state_dir: Path, status: CommitStatus, published: datetime, *,
                 ci: str = DEFAULT_CI) -> None:
    """Write the commit file of `status` and the branch file with `status` as its head, put
    first in the branch's history (replacing that commit's earlier entry), among the status
    files of the CI named `ci`."""
    commit = status.to_json()
    _write(commit_path(state_dir, status.repo, status.commit, ci=ci), commit)
    branch_path = status_path(state_dir, status.repo, status.branch, ci=ci)
    head = {"commit": status.commit, "result": status.result,
            "message": status.info.message.split("\n", 1)[0] if status.info else "",
            "published": published.isoformat(timespec="seconds")}
    earlier = [entry for entry in _history(branch_path) if entry.get("commit") != status.commit]
    _write(branch_path, {"repo": status.repo, "branch": status.branch,
                         **{name: value for name, value in commit.items() if name != "repo"},
                         "history": [head, *earlier][:HISTORY_LENGTH]})


@dataclasses.dataclass(frozen=True)
class StatusKey:
    """Which branch a publication is the head of, and which CI's status files hold it."""

    repo: str
    branch: str
    ci: str = DEFAULT_CI


@dataclasses.dataclass(frozen=True)
class Publication:
    """A status to write, with how to find its jobs' runs in the records."""

    status: CommitStatus
    specs: tuple[JobSpec, ...]


@p.publisher("ocaml-ci-status", pp=lambda key: f"{key.ci}: {key.repo} {key.branch}")
async def _publish(job: p.Job, key: StatusKey, publication: Publication) -> None:
    if job.records is None:
        raise RuntimeError("the status publisher runs only in an engine (it reads its records)")
    # The engine's own records: they hold the outcome that scheduled this publication even
    # before it is committed.
    status = _with_runs(job.records, publication)
    job.log(f"Writing {status.result} for {status.commit} of {key.repo} {key.branch}")
    await asyncio.to_thread(write_status, job.state_dir, status, datetime.now(UTC), ci=key.ci)


def publish(repo: str, branch: str, publication: p.Term[Publication], *,
            ci: str = DEFAULT_CI) -> p.Term[None]:
    """Keep the status files of `branch` of `repo` (the branch's and its head commit's) up to
    date with `publication`, among those of the CI named `ci` (ValueError unless it is
    lower-case letters, digits and dashes)."""
    # A bad name is refused now, not in the publisher's job.
    key = StatusKey(repo, branch, _checked(ci))
    return _publish(p.const(key, label=f"{repo} {branch}"), publication, label="status")
