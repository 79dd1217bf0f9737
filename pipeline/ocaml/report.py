"""A CI's report of a branch head: its status files, its GitHub commit statuses and its result.

`report(head, publication, ...)` is what OCaml CI and opam-repo-ci do with each branch head's
`pipeline.ocaml.status.Publication`: write the status files that the CI's pages
(`pipeline.ocaml.web`) read; with a `GitHub`, set one commit status per context, each
`{"state", "description"}` made from the commit's status by the CI's function for that context
(`ocaml_github_value` for OCaml CI's "ocaml-ci"), with a link to the commit's page when the web
UI's public address is known; and fail the branch's node unless the commit passed, so that
`pipeline run --once` exits 1 when a branch failed.

Statuses go to GitHub for a head whose repository is a github.com remote, and for the others
when `GitHub.repo` names the repository they stand for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pipeline as p
from pipeline.ocaml import failures as F
from pipeline.ocaml import github as GH
from pipeline.ocaml import status as St
from pipeline.ocaml.web import Site, commit_url
from pipeline.output import Active, Failed, Ok, Output
from pipeline.primitives.git import Commit

# A commit with no build is not a success: ocaml-ci reports it as a failed check ("No builds at
# all!", or the skip's message), so it is a failure here too (GitHub's "error" is for the CI's
# own trouble).
GITHUB_STATES = {"passed": "success", "failed": "failure", "pending": "pending",
                 "no-builds": "failure", "error": "error"}
"""A commit's result -> its GitHub status's state."""
GITHUB_REMOTE = re.compile(r"github\.com[:/]([^/]+/[^/]+?)(?:\.git)?/?$")
FAILING_RESULTS = ("failed", "no-builds", "error")
"""The results that fail a branch."""


@dataclasses.dataclass(frozen=True)
class GitHub:
    """Where commit statuses go: the token file, the API, and a repository for local ones."""

    token_file: Path
    api_url: str
    repo: str | None


def repo_name(repo: str) -> str:
    """A repository's short name: the last part of its path or URL, without `.git`."""
    name = repo.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name.removesuffix(".git") or name


def _github_repo(repo: str, github: GitHub) -> str | None:
    """The GitHub repository ("owner/name") of the repository at `repo`, if it has one."""
    found = GITHUB_REMOTE.search(repo)
    return found.group(1) if found else github.repo


def ocaml_github_value(status: St.CommitStatus) -> dict[str, Any]:
    """The GitHub status (state and description) of a commit's result, as ocaml-ci sets its
    "ocaml-ci" context: no builds is a failure, saying why."""
    description = {"passed": "Passed", "failed": "Failed", "pending": "Running",
                   "no-builds": f"No builds: {status.reason}",
                   "error": f"Error: {status.reason}"}.get(status.result, status.result)
    return {"state": GITHUB_STATES.get(status.result, "error"), "description": description}


class BranchFailed(F.Reason):
    """A branch head's result is one that fails it; the message says which and why."""


def publication(head: Commit, first: Sequence[tuple[St.JobSpec, Output]], jobs: Output, *,
                builds_required: bool = True) -> St.Publication:
    """The status of the branch head `head` (as its monitor saw it, not as fetched: its
    repository names the status files) from the outputs of its `first` jobs (the analysis
    first, whose value carries what git says of the commit, then any other made from the
    commit alone) and `jobs`, the output of the (spec, output) list of the jobs made from the
    analysis; `builds_required` as for `commit_result`.

    Pending while those jobs are not known (unless the result is already failed); an error when
    the analysis passed but its jobs could not be made (a bug, not the project's fault).
    """
    specs = [spec for spec, _ in first]
    job_list = [St.job_status(spec, output) for spec, output in first]
    if isinstance(jobs, Ok):
        specs += [spec for spec, _ in jobs.value]
        job_list += [St.job_status(spec, output) for spec, output in jobs.value]
    result, reason = St.commit_result(job_list, builds_required=builds_required)
    if isinstance(jobs, Active) and result != "failed":
        result, reason = "pending", None
    elif isinstance(jobs, Failed) and job_list[0].state == "passed":
        result, reason = "error", jobs.message
    # What git says of the commit, from the analysis (none from an analysis that failed).
    analysis = first[0][1]
    known = analysis.value.get("commit") if isinstance(analysis, Ok) else None
    return St.Publication(
        St.CommitStatus(repo_name(head.repo), head.branch or head.ref, head.hash, result,
                        tuple(job_list), reason, St.CommitInfo(**known) if known else None),
        tuple(specs))


def _fail_unless_passed(status: St.CommitStatus) -> str:
    """The result, unless it is one that fails the branch (failed, no builds, an error)."""
    if status.result in FAILING_RESULTS:
        failed = [job.name for job in status.jobs if job.state == "failed"]
        because = ", ".join(failed) if failed else status.reason
        raise BranchFailed(f"{status.branch}: {status.result}"
                           + (f" ({because})" if because else ""))
    return status.result


def report(head: p.Term[Commit], publication: p.Term[St.Publication], *, ci: str,
           github: GitHub | None, public_url: str | None, site: Site,
           statuses: Mapping[str, Callable[[St.CommitStatus], dict[str, Any]]],
           ) -> p.Term[str]:
    """Publish `publication`, the status of the branch head `head`, among the status files of
    the CI named `ci`; with `github`, set the commit status of each context of `statuses`
    (context -> the status's state and description from the commit's status), linking to the
    commit's page on `site` under `public_url` (the web UI's address as GitHub's users reach
    it) when given; the result is the commit's, and fails unless it passed.

    ValueError when `site` does not show `ci`'s status files (its links would lead nowhere).
    """
    if site.ci != ci:
        raise ValueError(f"the site {site.prefix} shows {site.ci}'s status files, not {ci}'s")

    def publish(head_commit: Commit) -> p.Term[None]:
        return St.publish(repo_name(head_commit.repo), head_commit.branch or head_commit.ref,
                          publication, ci=ci)

    published = head.bind(publish, label="publish")
    if github is not None:
        def with_link(value: dict[str, Any], status: St.CommitStatus) -> dict[str, Any]:
            if public_url is None:
                return value
            page = commit_url(status.repo, status.commit, site)
            return {**value, "target_url": public_url.rstrip("/") + page}

        def send(target: str, head_commit: Commit, context: str,
                 value_of: Callable[[St.CommitStatus], dict[str, Any]]) -> p.Term[None]:
            key = p.const((target, head_commit.hash, context),
                          label=f"{target}@{head_commit.short}")
            value = publication.map(lambda item: with_link(value_of(item.status), item.status),
                                    label=f"{context} state")
            return GH.github_status(key, value, token_file=github.token_file,
                                    api_url=github.api_url)

        def to_github(head_commit: Commit) -> p.Term[None]:
            target = _github_repo(head_commit.repo, github)
            if target is None:
                return p.const(None, label="no GitHub repository")
            return p.all(*(send(target, head_commit, context, value_of)
                           for context, value_of in statuses.items()),
                         label="statuses").map(lambda _: None, label="sent")

        published = p.pair(published, head.bind(to_github, label="github")).map(
            lambda _: None, label="published")
    return p.pair(published, publication).map(
        lambda pair: _fail_unless_passed(pair[1].status), label="branch result")
