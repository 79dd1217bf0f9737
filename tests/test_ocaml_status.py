"""The result of a commit from its jobs' states, and the JSON status publisher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import pipeline as p
from pipeline.ocaml import status as St
from pipeline.output import Active, Failed, Ok


def job(name: str, state: St.JobState, *, kind: str = "build", platform: str = "debian-12",
        experimental: bool = False, reason: str | None = None) -> St.JobStatus:
    return St.JobStatus(name, kind, platform, state, reason=reason, experimental=experimental)


ANALYSED = St.JobStatus(St.ANALYSIS, "analysis", None, "passed")
BUILD = St.JobSpec("debian-12", "build", "debian-12", "ocaml-job", "d1")


def test_job_status_from_outputs() -> None:
    assert St.job_status(BUILD, Ok({"job_id": "J", "result": "R"})) == \
        St.JobStatus("debian-12", "build", "debian-12", "passed", "J")
    assert St.job_status(BUILD, Ok({"job_id": "J", "skipped": "no odoc"})) == \
        St.JobStatus("debian-12", "build", "debian-12", "skipped", "J", "no odoc")
    experimental = dataclasses.replace(BUILD, experimental=True)
    assert St.job_status(experimental, Failed("RuntimeError: step failed")) == \
        St.JobStatus("debian-12", "build", "debian-12", "failed", None,
                     "RuntimeError: step failed", experimental=True)
    # A failed step's reason is shown without its exception's type.
    assert St.job_status(BUILD, Failed("StepFailed: dune build: Error: x")).reason == \
        "dune build: Error: x"
    # A pending job says which key it waits for, so that a page can find the job running it.
    assert St.job_status(BUILD, Active(p.NodeState.RUNNING)) == \
        St.JobStatus("debian-12", "build", "debian-12", "pending", op=BUILD.op,
                     key=BUILD.key_digest)


def test_a_passed_build_with_passed_or_skipped_lints_passes() -> None:
    jobs = [ANALYSED, job("b", "passed"), job("fmt", "skipped", kind="lint-fmt")]
    assert St.commit_result(jobs) == ("passed", None)


def test_a_failure_fails_even_while_others_run() -> None:
    jobs = [ANALYSED, job("build", "failed"), job("lint", "pending", kind="lint-opam")]
    assert St.commit_result(jobs) == ("failed", None)
    assert St.commit_result([St.JobStatus(St.ANALYSIS, "analysis", None, "failed")]) == \
        ("failed", None)


def test_pending_while_a_job_runs() -> None:
    jobs = [ANALYSED, job("build", "passed"), job("lint", "pending", kind="lint-opam")]
    assert St.commit_result(jobs) == ("pending", None)


def test_an_experimental_failure_does_not_fail_the_commit() -> None:
    jobs = [ANALYSED, job("build", "passed"),
            job("exp", "failed", platform="exp", experimental=True)]
    assert St.commit_result(jobs) == ("passed", None)


def test_no_build_that_ran_is_no_builds_whatever_the_lints_say() -> None:
    jobs = [ANALYSED, job("a", "skipped", reason="no libfoo"),
            job("b", "skipped", platform="debian-13", reason="no libbar"),
            job("opam", "passed", kind="lint-opam"), job("fmt", "skipped", kind="lint-fmt")]
    assert St.commit_result(jobs) == \
        ("no-builds", "debian-12: no libfoo; debian-13: no libbar")
    # A failed lint still fails the commit.
    assert St.commit_result([*jobs, job("doc", "failed", kind="lint-doc")]) == ("failed", None)


def test_an_experimental_build_alone_is_no_builds() -> None:
    jobs = [ANALYSED, job("a", "skipped", reason="no libfoo"),
            job("exp", "passed", platform="exp", experimental=True)]
    assert St.commit_result(jobs) == ("no-builds", "debian-12: no libfoo")
    assert St.commit_result([ANALYSED, job("opam", "passed", kind="lint-opam")]) == \
        ("no-builds", "no build job")


def test_status_path_encodes_the_branch(tmp_path: Path) -> None:
    assert St.status_path(tmp_path, "hello", "feature/x") == \
        tmp_path / "ocaml-ci" / "status" / "hello" / "feature%2Fx.json"


def status(commit: str, result: St.Result, *jobs: St.JobStatus,
           info: St.CommitInfo | None = None) -> St.Publication:
    return St.Publication(St.CommitStatus("hello", "main", commit, result, jobs, info=info), ())


INFO = St.CommitInfo("Fix the greeting\n\nIt said goodbye.", "Ann <ann@example.com>",
                     "2026-01-02T03:04:05+01:00")


async def test_the_publisher_writes_the_commit_and_branch_files(tmp_path: Path) -> None:
    jobs = (St.JobStatus(St.ANALYSIS, "analysis", None, "passed", "J1"),
            St.JobStatus("build", "build", "debian-12", "failed", None, "dune failed"),
            St.JobStatus("fmt", "lint-fmt", "debian-12", "skipped", "J3", "no .ocamlformat"))
    publication = p.Variable(status("a" * 40, "failed", *jobs, info=INFO))
    async with p.Engine(St.publish("hello", "main", publication),
                        state_dir=tmp_path) as engine:
        await engine.wait_idle()
        commit = {
            "repo": "hello", "commit": "a" * 40, "result": "failed",
            "message": INFO.message, "author": INFO.author, "date": INFO.date,
            "jobs": [{"name": "(analysis)", "kind": "analysis", "state": "passed",
                      "job_id": "J1"},
                     {"name": "build", "kind": "build", "platform": "debian-12",
                      "state": "failed", "reason": "dune failed"},
                     {"name": "fmt", "kind": "lint-fmt", "platform": "debian-12",
                      "state": "skipped", "job_id": "J3", "reason": "no .ocamlformat"}]}
        assert json.loads(St.commit_path(tmp_path, "hello", "a" * 40).read_text()) == commit
        branch = json.loads(St.status_path(tmp_path, "hello", "main").read_text())
        [entry] = branch.pop("history")
        assert branch == {**commit, "branch": "main"}
        assert entry.pop("published")
        assert entry == {"commit": "a" * 40, "result": "failed", "message": "Fix the greeting"}

        # A new head goes first in the history; its result replaces its entry.
        for result in ("pending", "passed"):
            publication.set(status("b" * 40, result))
            await engine.wait_idle()
            branch = json.loads(St.status_path(tmp_path, "hello", "main").read_text())
            assert branch["result"] == result and "message" not in branch
            assert [(h["commit"], h["result"]) for h in branch["history"]] == \
                [("b" * 40, result), ("a" * 40, "failed")]
        # Both commits keep their files.
        assert St.commit_path(tmp_path, "hello", "a" * 40).exists()
        # Going back to a commit moves it first; the history keeps the last 20.
        for n in range(St.HISTORY_LENGTH + 2):
            publication.set(status(f"{n:040x}", "passed"))
            await engine.wait_idle()
        publication.set(status("a" * 40, "failed"))
        await engine.wait_idle()
        history = json.loads(St.status_path(tmp_path, "hello", "main").read_text())["history"]
        assert len(history) == St.HISTORY_LENGTH
        assert [h["commit"] for h in history[:2]] == ["a" * 40, f"{St.HISTORY_LENGTH + 1:040x}"]


async def test_jobs_get_their_ids_and_times_from_the_engines_records(tmp_path: Path) -> None:
    @p.builder("failing")
    async def failing(job: p.Job, key: str) -> dict[str, str]:
        raise RuntimeError("dune failed")

    @p.builder("passing")
    async def passing(job: p.Job, key: str) -> dict[str, str]:
        return {"job_id": job.id}

    build, lint = failing("k"), passing("k")
    specs = (St.JobSpec("build", "build", "debian-12", "failing", p.digest("k")),
             St.JobSpec("lint", "lint-opam", "debian-12", "passing", p.digest("k")))

    def publication(outputs: tuple[p.Output, p.Output]) -> St.Publication:
        jobs = tuple(St.job_status(spec, output)
                     for spec, output in zip(specs, outputs, strict=True))
        return St.Publication(St.CommitStatus("hello", "main", "a" * 40, "failed", jobs), specs)

    term = p.pair(p.state(build), p.state(lint)).map(publication)
    async with p.Engine(St.publish("hello", "main", term), state_dir=tmp_path) as engine:
        await engine.wait_idle()
        written = json.loads(St.status_path(tmp_path, "hello", "main").read_text())
        for spec, job in zip(specs, written["jobs"], strict=True):
            entry = engine.cache.db.latest(spec.op, spec.key_digest)
            assert entry is not None and entry.queued is not None and entry.started is not None
            assert job["job_id"] == entry.job_id
            assert (job["queued"], job["started"], job["finished"]) == (
                entry.queued.isoformat(), entry.started.isoformat(), entry.finished.isoformat())
        assert written["jobs"][0]["reason"] == "RuntimeError: dune failed"


def test_with_builds_not_required_nothing_to_build_passes() -> None:
    lint = job("(lint)", "passed", kind="lint", platform="")
    # No build at all: passed when no build is required (opam-repo-ci's "no build was
    # necessary"), no builds otherwise.
    assert St.commit_result([ANALYSED, lint], builds_required=False) == ("passed", None)
    assert St.commit_result([ANALYSED, lint]) == ("no-builds", "no build job")
    # Failures and pending jobs still decide first.
    assert St.commit_result([ANALYSED, job("(lint)", "failed", kind="lint")],
                            builds_required=False) == ("failed", None)
    assert St.commit_result([ANALYSED, job("(lint)", "pending", kind="lint")],
                            builds_required=False) == ("pending", None)


def test_a_jobs_package_and_revdep_come_from_its_spec_and_go_to_the_json_when_set() -> None:
    spec = St.JobSpec("debian-12 foo.1.0 revdep bar.2.0", "revdep", "debian-12", "opam-job",
                      "d2", package="foo.1.0", revdep="bar.2.0")
    passed = St.job_status(spec, Ok({"job_id": "J"}))
    assert (passed.package, passed.revdep) == ("foo.1.0", "bar.2.0")
    assert passed.to_json() == {"name": spec.name, "kind": "revdep", "platform": "debian-12",
                                "package": "foo.1.0", "revdep": "bar.2.0", "state": "passed",
                                "job_id": "J"}
    pending = St.job_status(spec, Active(p.NodeState.RUNNING))
    assert (pending.package, pending.revdep, pending.op) == ("foo.1.0", "bar.2.0", "opam-job")
    build = St.job_status(dataclasses.replace(spec, kind="build", revdep=None),
                          Failed("RuntimeError: no"))
    assert build.to_json()["package"] == "foo.1.0" and "revdep" not in build.to_json()
    assert "package" not in St.job_status(BUILD, Ok({})).to_json()


async def test_each_ci_has_its_own_status_files(tmp_path: Path) -> None:
    ocaml = St.publish("hello", "main", p.const(status("a" * 40, "passed")))
    opam = St.publish("hello", "main", p.const(status("b" * 40, "failed")), ci="opam-repo-ci")
    async with p.Engine(p.pair(ocaml, opam), state_dir=tmp_path) as engine:
        await engine.wait_idle()
    assert St.status_path(tmp_path, "hello", "main", ci="opam-repo-ci") == \
        tmp_path / "opam-repo-ci" / "status" / "hello" / "main.json"
    assert json.loads(St.status_path(tmp_path, "hello", "main").read_text())["commit"] == \
        "a" * 40
    opam_branch = json.loads(
        St.status_path(tmp_path, "hello", "main", ci="opam-repo-ci").read_text())
    assert (opam_branch["commit"], opam_branch["result"]) == ("b" * 40, "failed")
    assert St.commit_path(tmp_path, "hello", "b" * 40, ci="opam-repo-ci").exists()
    assert not St.commit_path(tmp_path, "hello", "b" * 40).exists()


def test_a_ci_name_is_never_a_path() -> None:
    for name in ("..", "a/b", "", "Opam", "-x"):
        with pytest.raises(ValueError, match="is not a CI name"):
            St.publish("hello", "main", p.const(status("a" * 40, "passed")), ci=name)
        with pytest.raises(ValueError, match="is not a CI name"):
            St.status_dir(Path("/state"), name)
