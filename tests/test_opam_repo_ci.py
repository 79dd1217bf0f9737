"""`pipelines/opam_repo_ci.py` end to end: the sample opam repository (`pipeline.opam_repo.sample`)
as a real git repository, its pull requests merged, analysed, linted and built by the real builder
and sandbox on Debian 12's OCaml, with Debian's opam.

Every test shares the session's overlayfs store (`ocaml_store`), so Debian 12 is debootstrapped
once per session; the demo's pull requests are built once, by the first test, and the `--once`
runs of the command line find their steps cached.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from ocaml_fixtures import HANG_GUARD, PIPELINE, assert_labels_for_people
from test_build_primitive import processes_with, until
from test_ocaml_ci import final_status, jobs_of, log_of, read_status

import pipeline as p
from pipeline.cli import load_pipeline
from pipeline.ocaml import status as St
from pipeline.opam_repo import sample
from pipeline.web.diagram import DiagramCache

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = ROOT / "pipelines" / "opam_repo_ci.py"
CI = "opam-repo-ci"
PLATFORM = "debian-12-4.13"


def ci(repo: Path, store: str, *options: str) -> p.Term[Any]:
    """The opam-repo-ci pipeline of `repo` building on `store`."""
    return load_pipeline(PIPELINE_FILE, ["--repo", str(repo), "--store", store, *options])


async def pr_status(state: Path, repo: Path, branch: str) -> dict[str, Any]:
    """The status of the pull request `branch` once its head's result is known."""
    return await final_status(state, repo, branch, head(repo, branch), ci=CI)


def head(repo: Path, branch: str) -> str:
    return subprocess.run(["git", "rev-parse", branch], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def package_job(package: str, kind: str, revdep: str | None = None) -> str:
    name = f"{package} {PLATFORM} {kind}"
    return f"{name} {revdep}" if revdep else name


async def test_the_demos_pull_requests_an_insignificant_change_and_a_conflict(
        tmp_path: Path, ocaml_store: str) -> None:
    repo = sample.make_demo(tmp_path / "opam-repository")
    state = tmp_path / "var"
    async with p.Engine(ci(repo, ocaml_store), state_dir=state) as engine:
        # A new release of the library others depend on: built, tested, built against the
        # oldest versions it allows, and its reverse dependency built with it.
        new = await pr_status(state, repo, "new-release")
        assert new["result"] == "passed", new
        release = sample.NEW_RELEASE.package
        jobs = jobs_of(new)
        revdep = package_job(release, "revdep", "hello.1.0")
        assert {name: job["state"] for name, job in jobs.items()} == {
            "(analysis)": "passed", "(lint)": "passed",
            package_job(release, "build"): "passed", package_job(release, "test"): "passed",
            package_job(release, "lower-bounds"): "passed",
            package_job(release, "revdeps"): "passed", revdep: "passed"}, new
        assert {job.get("package") for job in new["jobs"][2:]} == {release}
        assert jobs[revdep]["revdep"] == "hello.1.0"
        build_log = log_of(state, jobs[package_job(release, "build")])
        assert "To reproduce locally, in a checkout of this pull request merged into its base" \
            in build_log
        assert "opam reinstall" in build_log and release in build_log
        listing = log_of(state, jobs[package_job(release, "revdeps")])
        assert "1 reverse dependencies: hello.1.0" in listing, listing
        assert "testkit" in log_of(state, jobs[package_job(release, "test")])
        # The oldest strutil the release allows is the one its lower bounds are built with.
        lower = log_of(state, jobs[package_job(release, "lower-bounds")])
        assert "-> installed strutil.1.0" in lower, lower
        analysis_log = log_of(state, jobs["(analysis)"])
        assert f"{release}: new-release" in analysis_log, analysis_log

        # A publication rule broken: the lint fails with the rule's message; the package is
        # still built.
        lint = await pr_status(state, repo, "lint-error")
        assert lint["result"] == "failed", lint
        lint_job = jobs_of(lint)["(lint)"]
        assert lint_job["state"] == "failed"
        assert "md5" in lint_job["reason"], lint_job
        lint_log = log_of(state, lint_job)
        assert f"packages/testkit/{sample.LINT_ERROR.package}/opam" in lint_log, lint_log

        # A release that does not compile: the build fails with the compiler's error, and the
        # jobs that needed it are skipped saying so.
        broken = await pr_status(state, repo, "build-failure")
        assert broken["result"] == "failed", broken
        failure = sample.BUILD_FAILURE.package
        build = jobs_of(broken)[package_job(failure, "build")]
        assert build["state"] == "failed", broken
        # The compiler's error as opam quoted it, after the failing command.
        assert build["reason"].startswith(f"opam reinstall -y {failure}: Error: This "
                                          "expression has type int"), build
        assert "Error: This expression has type" in log_of(state, build)
        lower_bounds = jobs_of(broken)[package_job(failure, "lower-bounds")]
        assert (lower_bounds["state"], lower_bounds["reason"]) == ("skipped", "the build failed")

        labels = assert_labels_for_people(await DiagramCache(engine).dot())
        assert f"revdeps: {release} {PLATFORM}" in labels, labels

        # Only a description changed: nothing is built, and the pull request passes.
        sample.add_insignificant_change(repo, "description")
        described = await pr_status(state, repo, "description")
        assert described["result"] == "passed", described
        assert [job["name"] for job in described["jobs"]] == ["(analysis)", "(lint)"]
        assert "hello.1.0: insignificant" in log_of(state, jobs_of(described)["(analysis)"])

        # A pull request that cannot be merged says to rebase.
        sample.add_conflicting_change(repo, "conflict")
        conflict = await pr_status(state, repo, "conflict")
        assert conflict["result"] == "failed", conflict
        assert jobs_of(conflict)["(analysis)"]["reason"] == \
            "Cannot merge to master - please rebase!"


async def test_a_removed_pull_request_has_its_build_cancelled(
        tmp_path: Path, ocaml_store: str) -> None:
    repo = sample.make_repository(tmp_path / "opam-repository")
    token = f"hold-{uuid.uuid4().hex}"
    opam = ('opam-version: "2.0"\nmaintainer: "Some One <some.one@example.org>"\n'
            'synopsis: "Waits"\n'
            f'build: [["sh" "-c" "echo {token}; while [ ! -e /go ]; do sleep 0.1; done"]]\n')
    sample.commit_files(repo, "waits", {"packages/waits/waits.1.0/opam": opam}, "waits.1.0")
    state = tmp_path / "var"
    async with p.Engine(ci(repo, ocaml_store), state_dir=state) as engine:
        await until(lambda: bool(processes_with(token)), "the held build running")
        [job] = [job for job in engine.jobs.active()
                 if f"waits.1.0 {PLATFORM} build" in job.log_path.read_text()]
        subprocess.run(["git", "branch", "-D", "waits"], cwd=repo, check=True,
                       capture_output=True)
        await until(lambda: job.state is p.JobState.FAILED, "the build cancelled")
        assert job.is_cancelled, job.error
        await until(lambda: not processes_with(token), "the build's processes gone")
    assert processes_with(token) == []


async def test_a_remotes_pull_requests_are_filed_under_the_remotes_name(tmp_path: Path) -> None:
    # Fetched, the commits live in a mirror named by a digest of the URL: the status files
    # must still be under the repository's name.
    repo = sample.make_repository(tmp_path / "opam-repository")
    sample.add_insignificant_change(repo, "description")
    state = tmp_path / "var"
    root = load_pipeline(PIPELINE_FILE, ["--remote", f"file://{repo}", "--store", "rsync:store"])
    async with p.Engine(root, state_dir=state):
        status = await pr_status(state, repo, "description")
    assert status["result"] == "passed", status
    assert status["repo"] == "opam-repository"
    assert [path.name for path in St.status_dir(state, CI).iterdir()] == ["opam-repository"]


def run_once(state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PIPELINE), "run", "--once", "--state-dir", str(state),
                           str(PIPELINE_FILE), "--", *options], capture_output=True, text=True,
                          timeout=HANG_GUARD)


def pr_lines(stdout: str, branches: Iterable[str]) -> dict[str, tuple[str, str]]:
    """The state and error `--once` printed on each pull request's line (its label is the
    branch)."""
    found = {}
    for line in stdout.splitlines():
        state, _, rest = line.partition(" ")
        label, _, error = rest.strip().partition(" ")
        if label in branches:
            found[label] = (state, error.strip())
    return found


def test_analyse_only_prints_one_json_line_per_pull_request(tmp_path: Path) -> None:
    repo = sample.make_demo(tmp_path / "opam-repository")
    sample.add_conflicting_change(repo, "conflict")
    done = run_once(tmp_path / "var", "--repo", str(repo), "--analyse-only")
    assert done.returncode == 1, done
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_pr = {line["pr"]: line for line in lines}
    assert sorted(by_pr) == ["build-failure", "conflict", "lint-error", "new-release"], done
    assert by_pr["new-release"] == {
        "pr": "new-release", "head": head(repo, "new-release"),
        "packages": [{"package": sample.NEW_RELEASE.package, "kind": "new-release"}],
        "lint": [], "error": None}
    [message] = by_pr["lint-error"]["lint"]
    assert message["file"] == f"packages/testkit/{sample.LINT_ERROR.package}/opam"
    assert "md5" in message["message"], message
    assert by_pr["conflict"]["error"] == "Cannot merge to master - please rebase!"
    assert by_pr["conflict"]["packages"] == [] and by_pr["conflict"]["lint"] == []
    # And one line per pull request among the nodes' states, saying why one failed.
    states = pr_lines(done.stdout, by_pr)
    assert states["new-release"] == states["build-failure"] == ("ok", ""), done.stdout
    state, error = states["lint-error"]
    assert state == "failed" and error.startswith(
        "PullRequestFailed: 1 lint message, the first: packages/testkit/"), done.stdout
    assert states["conflict"] == (
        "failed", "PullRequestFailed: Cannot merge to master - please rebase!"), done.stdout
    # Nothing was built: no build job ran.
    assert not list((tmp_path / "var" / "job").glob("*/*-opam-repo-job-*.log"))


def test_analyse_only_exits_0_when_every_pull_request_passes(tmp_path: Path) -> None:
    repo = sample.make_repository(tmp_path / "opam-repository")
    sample.add_release(repo, "new-release", sample.NEW_RELEASE)
    sample.add_insignificant_change(repo, "description")
    done = run_once(tmp_path / "var", "--repo", str(repo), "--analyse-only")
    assert done.returncode == 0, done
    kinds = {line["pr"]: [package["kind"] for package in line["packages"]]
             for line in map(json.loads, filter(lambda text: text.startswith("{"),
                                                 done.stdout.splitlines()))}
    assert kinds == {"new-release": ["new-release"], "description": ["insignificant"]}


@pytest.mark.parametrize(("branches", "status"), [((), 0), (("build-failure",), 1)])
def test_once_exits_0_when_every_pull_request_passes_and_1_otherwise(
        tmp_path: Path, ocaml_store: str, branches: tuple[str, ...], status: int) -> None:
    repo = sample.make_repository(tmp_path / "opam-repository")
    sample.add_release(repo, "new-release", sample.NEW_RELEASE)
    if branches:
        sample.add_release(repo, "build-failure", sample.BUILD_FAILURE)
    done = run_once(tmp_path / "var", "--repo", str(repo), "--store", ocaml_store)
    assert done.returncode == status, done
    # One line per pull request: its state, and why it failed.
    states = pr_lines(done.stdout, ["new-release", *branches])
    assert states["new-release"] == ("ok", ""), done.stdout
    if branches:
        state, error = states["build-failure"]
        assert state == "failed" and error.startswith(
            "PullRequestFailed: build-failure: failed (wordcount.1.1 debian-12-4.13 build"), \
            done.stdout
    results = {branch: (read_status(tmp_path / "var", repo, branch, ci=CI) or {}).get("result")
               for branch in ("new-release", *branches)}
    assert results == {"new-release": "passed", **dict.fromkeys(branches, "failed")}


def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_once(tmp_path / "var")
    assert done.returncode == 2, done
    assert "nothing to watch: give --repo, --remote or --demo" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_once(tmp_path / "var", "--repo", str(tmp_path), "--platforms", "nowhere")
    assert done.returncode == 2 and "unknown platform 'nowhere'" in done.stderr, done


def test_a_missing_base_branch_fails_naming_the_branches(tmp_path: Path) -> None:
    repo = sample.make_repository(tmp_path / "opam-repository")
    done = run_once(tmp_path / "var", "--repo", str(repo), "--base", "main", "--analyse-only")
    assert done.returncode == 1, done
    assert "no branch main to merge into (branches: master): give --base" in done.stdout, done
