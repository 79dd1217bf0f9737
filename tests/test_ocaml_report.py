"""A CI's report of a branch head (`pipeline.ocaml.report`): its status files, one GitHub status
per context (against the fake of GitHub's statuses API) and its result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from github_statuses import github_statuses

import pipeline as p
from pipeline.ocaml import report as R
from pipeline.ocaml import status as St
from pipeline.ocaml.web import OCAML_CI, OPAM_REPO_CI
from pipeline.primitives.git import Commit

TOKEN = "ghp_report-token"
SHA = "ab" * 20
HEAD = Commit("https://github.com/ocaml/opam-repository.git", SHA, "refs/heads/new-release")
LINT = St.JobStatus("(lint)", "lint", None, "failed", reason="maintainer-contact: no email")


def publication(result: St.Result, *jobs: St.JobStatus) -> St.Publication:
    return St.Publication(St.CommitStatus("opam-repository", "new-release", SHA, result, jobs),
                          ())


def linter(status: St.CommitStatus) -> dict[str, Any]:
    """A second context's value: the lint job's state alone."""
    lint = next(job for job in status.jobs if job.kind == "lint")
    return {"state": "success" if lint.state == "passed" else "failure",
            "description": lint.reason or "Passed"}


def test_repo_name_and_the_ocaml_ci_value() -> None:
    assert R.repo_name("https://github.com/ocaml/opam-repository.git") == "opam-repository"
    assert R.repo_name("git@github.com:o/hello.git") == "hello"
    assert R.repo_name("/srv/git/hello/") == "hello"
    no_builds = St.CommitStatus("r", "b", SHA, "no-builds", (), "debian-12: no libfoo")
    assert R.ocaml_github_value(no_builds) == {"state": "failure",
                                               "description": "No builds: debian-12: no libfoo"}
    assert R.ocaml_github_value(St.CommitStatus("r", "b", SHA, "pending", ())) == \
        {"state": "pending", "description": "Running"}


async def test_each_context_gets_its_status_linking_to_the_sites_commit_page(
        tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    async with github_statuses(TOKEN) as github:
        term = R.report(p.const(HEAD), p.const(publication("failed", LINT)), ci="opam-repo-ci",
                        github=R.GitHub(token_file, github.url, None),
                        public_url="https://ci.example/", site=OPAM_REPO_CI,
                        statuses={"opam-ci": R.ocaml_github_value,
                                  "opam-repo-ci (linter)": linter})
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await engine.wait_idle()
            output = engine.root_output()
            # The branch fails, naming its failed job.
            assert isinstance(output, p.Failed)
            assert "new-release: failed ((lint))" in output.message
    bodies = {r.body["context"]: r.body for r in github.requests}
    assert {r.path for r in github.requests} == \
        {f"/repos/ocaml/opam-repository/statuses/{SHA}"}
    page = f"https://ci.example/opam/opam-repository/commit/{SHA}"
    assert bodies == {
        "opam-ci": {"state": "failure", "description": "Failed", "context": "opam-ci",
                    "target_url": page},
        "opam-repo-ci (linter)": {"state": "failure", "context": "opam-repo-ci (linter)",
                                  "description": "maintainer-contact: no email",
                                  "target_url": page}}
    # The status files are the CI's own.
    branch = St.status_path(tmp_path / "var", "opam-repository", "new-release",
                            ci="opam-repo-ci")
    assert json.loads(branch.read_text())["result"] == "failed"
    assert not St.status_path(tmp_path / "var", "opam-repository", "new-release").exists()


async def test_without_github_the_result_is_the_commits(tmp_path: Path) -> None:
    term = R.report(p.const(HEAD), p.const(publication("passed")), ci="opam-repo-ci",
                    github=None, public_url=None, site=OPAM_REPO_CI, statuses={})
    async with p.Engine(term, state_dir=tmp_path) as engine:
        await engine.wait_idle()
        assert engine.root_output() == p.Ok("passed")
    assert St.commit_path(tmp_path, "opam-repository", SHA, ci="opam-repo-ci").exists()


def test_the_site_must_show_the_cis_files() -> None:
    with pytest.raises(ValueError, match="shows ocaml-ci's status files, not opam-repo-ci's"):
        R.report(p.const(HEAD), p.const(publication("passed")), ci="opam-repo-ci", github=None,
                 public_url=None, site=OCAML_CI, statuses={})
