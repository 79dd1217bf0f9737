"""The result of a commit from the states of its jobs, and the JSON status publisher.

A status file is `STATE_DIR/ocaml-ci/status/<repo-name>/<branch>.json` (the branch name
percent-encoded, so `feature/x` is `feature%2Fx.json`), holding:

    {"repo": "ocaml-hello", "branch": "main", "commit": "<40 hex>",
     "result": "passed" | "failed" | "pending" | "error",
     "reason": "...",                                  # only for "error"
     "jobs": [{"name": "(analysis)", "state": "passed" | "failed" | "skipped" | "pending",
               "job_id": "...",                        # when known (see `JobStatus`)
               "reason": "...",                        # for failed and skipped jobs
               "experimental": true}]}                 # only when true

The file is replaced atomically (written aside, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pipeline as p
from pipeline.cache.storage import Database
from pipeline.output import Active, Failed, Ok, Output

JobState = Literal["passed", "failed", "skipped", "pending"]
Result = Literal["passed", "failed", "pending", "error"]

STATUS_DIR = Path("ocaml-ci") / "status"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Where a job's state comes from: its name, the cache operation and key digest that find
    its job id in the engine's records when its value does not carry one (a failed job has no
    value), and whether its failure is tolerated."""

    name: str
    op: str
    key_digest: str
    experimental: bool = False


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """One job of a commit as reported. `job_id` is None while the job has not finished (and
    for a job blocked by an earlier failure, which never ran)."""

    name: str
    state: JobState
    job_id: str | None = None
    reason: str | None = None
    experimental: bool = False

    def to_json(self) -> dict[str, Any]:
        """The job's entry in the status file: absent fields are left out."""
        entry: dict[str, Any] = {"name": self.name, "state": self.state}
        if self.job_id is not None:
            entry["job_id"] = self.job_id
        if self.reason is not None:
            entry["reason"] = self.reason
        if self.experimental:
            entry["experimental"] = True
        return entry


@dataclasses.dataclass(frozen=True)
class CommitStatus:
    """What the status file of a branch says."""

    repo: str
    branch: str
    commit: str
    result: Result
    jobs: tuple[JobStatus, ...]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The status file's content."""
        status: dict[str, Any] = {"repo": self.repo, "branch": self.branch,
                                  "commit": self.commit, "result": self.result}
        if self.reason is not None:
            status["reason"] = self.reason
        status["jobs"] = [job.to_json() for job in self.jobs]
        return status


def job_status(name: str, output: Output, *, experimental: bool = False) -> JobStatus:
    """A job's status from its node's output, as given by `p.state`.

    Our builders' values are dicts carrying `job_id`, and `skipped` (the reason) for a job that
    had nothing to do; an error is a failure whose reason is the error's message.
    """
    if isinstance(output, Ok):
        value = output.value if isinstance(output.value, dict) else {}
        skipped = value.get("skipped")
        return JobStatus(name, "skipped" if skipped is not None else "passed",
                         value.get("job_id"), skipped, experimental)
    if isinstance(output, Failed):
        return JobStatus(name, "failed", None, output.message, experimental)
    assert isinstance(output, Active)
    return JobStatus(name, "pending", None, None, experimental)


def commit_result(jobs: Sequence[JobStatus]) -> tuple[Result, str | None]:
    """The result of a commit and, for an error, why.

    Failed when a job that is not experimental failed (even while others run: the outcome is
    already known); pending while any job has not finished; an error when every job but the
    analysis was skipped (nothing was checked, which must not look like success); passed
    otherwise. Skipped jobs and experimental failures do not fail the commit.
    """
    if any(job.state == "failed" and not job.experimental for job in jobs):
        return "failed", None
    if any(job.state == "pending" for job in jobs):
        return "pending", None
    checks = [job for job in jobs if job.name != ANALYSIS]
    if not checks or all(job.state == "skipped" for job in checks):
        return "error", "every job was skipped"
    return "passed", None


ANALYSIS = "(analysis)"


def status_path(state_dir: Path, repo: str, branch: str) -> Path:
    """The status file of `branch` of the repository named `repo`."""
    return state_dir / STATUS_DIR / repo / f"{urllib.parse.quote(branch, safe='')}.json"


def _job_ids(records: Database, specs: Sequence[JobSpec]) -> dict[str, str]:
    """The latest job id stored for each spec's key, by job name.

    Read from the engine's records because a failed builder has no value to carry its id.
    """
    found: dict[str, str] = {}
    for spec in specs:
        entry = records.latest(spec.op, spec.key_digest)
        if entry is not None:
            found[spec.name] = entry.job_id
    return found


def _write(path: Path, status: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(aside, path)


@dataclasses.dataclass(frozen=True)
class StatusKey:
    """Which status file a publication writes."""

    repo: str
    branch: str


@dataclasses.dataclass(frozen=True)
class Publication:
    """A status to write, with how to find the ids of its failed jobs."""

    status: CommitStatus
    specs: tuple[JobSpec, ...]


def _failed_job_ids(records: Database, publication: Publication) -> CommitStatus:
    status = publication.status
    failed = {job.name for job in status.jobs if job.state == "failed" and job.job_id is None}
    ids = _job_ids(records, [spec for spec in publication.specs if spec.name in failed])
    jobs = tuple(dataclasses.replace(job, job_id=ids.get(job.name, job.job_id))
                 for job in status.jobs)
    return dataclasses.replace(status, jobs=jobs)


@p.publisher("ocaml-ci-status", pp=lambda key: f"{key.repo} {key.branch}")
async def _publish(job: p.Job, key: StatusKey, publication: Publication) -> None:
    if job.records is None:
        raise RuntimeError("the status publisher runs only in an engine (it reads its records)")
    # The engine's own records: they hold the outcome that scheduled this publication even
    # before it is committed.
    status = _failed_job_ids(job.records, publication)
    path = status_path(job.state_dir, key.repo, key.branch)
    job.log(f"Writing {status.result} for {status.commit} to {path}")
    await asyncio.to_thread(_write, path, status.to_json())


def publish(repo: str, branch: str, publication: p.Term[Publication]) -> p.Term[None]:
    """Keep the status file of `branch` of `repo` up to date with `publication`."""
    return _publish(p.const(StatusKey(repo, branch), label=f"{repo} {branch}"), publication,
                    label="status")
