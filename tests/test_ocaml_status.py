"""The result of a commit from its jobs' states, and the JSON status publisher."""

from __future__ import annotations

import json
from pathlib import Path

import pipeline as p
from pipeline.ocaml import status as St
from pipeline.output import Active, Failed, Ok


def job(name: str, state: St.JobState, *, experimental: bool = False) -> St.JobStatus:
    return St.JobStatus(name, state, experimental=experimental)


ANALYSED = job(St.ANALYSIS, "passed")


def test_job_status_from_outputs() -> None:
    assert St.job_status("b", Ok({"job_id": "J", "result": "R"})) == \
        St.JobStatus("b", "passed", "J")
    assert St.job_status("b", Ok({"job_id": "J", "skipped": "no odoc"})) == \
        St.JobStatus("b", "skipped", "J", "no odoc")
    assert St.job_status("b", Failed("step failed"), experimental=True) == \
        St.JobStatus("b", "failed", None, "step failed", experimental=True)
    assert St.job_status("b", Active("running")) == St.JobStatus("b", "pending")


def test_all_passed_or_skipped_passes() -> None:
    assert St.commit_result([ANALYSED, job("build", "passed"), job("fmt", "skipped")]) == \
        ("passed", None)


def test_a_failure_fails_even_while_others_run() -> None:
    jobs = [ANALYSED, job("build", "failed"), job("lint", "pending")]
    assert St.commit_result(jobs) == ("failed", None)
    assert St.commit_result([job(St.ANALYSIS, "failed")]) == ("failed", None)


def test_pending_while_a_job_runs() -> None:
    assert St.commit_result([ANALYSED, job("build", "passed"), job("lint", "pending")]) == \
        ("pending", None)


def test_an_experimental_failure_does_not_fail_the_commit() -> None:
    jobs = [ANALYSED, job("build", "passed"), job("exp", "failed", experimental=True)]
    assert St.commit_result(jobs) == ("passed", None)


def test_all_skipped_is_an_error() -> None:
    jobs = [ANALYSED, job("build", "skipped"), job("fmt", "skipped")]
    assert St.commit_result(jobs) == ("error", "every job was skipped")


def test_status_path_encodes_the_branch(tmp_path: Path) -> None:
    assert St.status_path(tmp_path, "hello", "feature/x") == \
        tmp_path / "ocaml-ci" / "status" / "hello" / "feature%2Fx.json"


async def test_the_publisher_writes_the_status_file(tmp_path: Path) -> None:
    status = St.CommitStatus("hello", "main", "a" * 40, "failed",
                             (St.JobStatus(St.ANALYSIS, "passed", "J1"),
                              St.JobStatus("build", "failed", None, "dune failed"),
                              St.JobStatus("fmt", "skipped", "J3", "no .ocamlformat")))
    publication = p.Variable(St.Publication(status, ()))
    async with p.Engine(St.publish("hello", "main", publication),
                        state_dir=tmp_path) as engine:
        await engine.wait_idle()
        path = St.status_path(tmp_path, "hello", "main")
        assert json.loads(path.read_text()) == {
            "repo": "hello", "branch": "main", "commit": "a" * 40, "result": "failed",
            "jobs": [{"name": "(analysis)", "state": "passed", "job_id": "J1"},
                     {"name": "build", "state": "failed", "reason": "dune failed"},
                     {"name": "fmt", "state": "skipped", "job_id": "J3",
                      "reason": "no .ocamlformat"}]}
        # A new status replaces the file.
        publication.set(St.Publication(
            St.CommitStatus("hello", "main", "b" * 40, "pending", ()), ()))
        await engine.wait_idle()
        assert json.loads(path.read_text())["result"] == "pending"


async def test_a_failed_job_gets_its_id_from_the_engines_records(tmp_path: Path) -> None:
    @p.builder("failing")
    async def failing(job: p.Job, key: str) -> dict[str, str]:
        raise RuntimeError("dune failed")

    build = failing("k")

    def publication(output: p.Output) -> St.Publication:
        status = St.CommitStatus("hello", "main", "a" * 40, "failed",
                                 (St.job_status("build", output),))
        return St.Publication(status, (St.JobSpec("build", "failing", p.digest("k")),))

    async with p.Engine(St.publish("hello", "main", p.state(build).map(publication)),
                        state_dir=tmp_path) as engine:
        await engine.wait_idle()
        node = engine.node_for(build)
        assert node is not None and node.state == "failed" and node.job_id is not None
        written = json.loads(St.status_path(tmp_path, "hello", "main").read_text())
        assert written["jobs"] == [{"name": "build", "state": "failed", "job_id": node.job_id,
                                    "reason": "RuntimeError: dune failed"}]
