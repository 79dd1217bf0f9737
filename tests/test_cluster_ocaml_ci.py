"""The OCaml CI pipeline through the build cluster gives the statuses it gives in-process, each
platform's builds going to the pool of its architecture, and the opam-repo-ci pipeline's pull
requests are merged and built by the worker: a real `pipeline cluster scheduler` and one
`pipeline cluster worker` of the pool `linux-x86_64`, building on the session's shared OCaml
store (stores take locks shared by every process using them), so that each build after the
session's first costs seconds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cluster_fixtures import Cluster, cluster  # noqa: F401 (a fixture)
from ocaml_fixtures import EMULATED_HANG_GUARD, HANG_GUARD
from test_ocaml_ci import (
    ARM64,
    BROKEN_GREET,
    LINTED,
    Repo,
    ci,
    final_status,
    head,
    hello_repo,
    jobs_of,
    log_of,
    read_status,
)
from test_opam_repo_ci import ci as opam_ci
from test_opam_repo_ci import pr_status

import pipeline as p
from pipeline.opam_repo import sample

ANALYSIS = "(analysis)"


async def statuses(state: Path, repo: Repo, store: str, mirror: str, *options: str
                   ) -> dict[str, dict[str, Any]]:
    """The final status of each branch of `repo` ("main" passes, "broken" fails its tests)
    under the OCaml CI pipeline with `options`, its state in `state`: every job finished, since
    a commit fails at its first failed build while its other jobs may still run."""
    found = {}
    async with p.Engine(ci(repo, store, mirror, *options), state_dir=state):
        for branch in ("main", "broken"):
            found[branch] = await final_status(state, repo, branch, await head(repo, branch),
                                               settled=True)
    return found


def outcomes(status: dict[str, Any]) -> tuple[str, dict[str, tuple[str, str | None]]]:
    """A branch's result and each job's state and reason."""
    return status["result"], {name: (job["state"], job.get("reason"))
                              for name, job in jobs_of(status).items()}


async def test_the_pipeline_through_the_cluster_gives_the_in_process_statuses(
        tmp_path: Path, cluster: Cluster, ocaml_store: str,  # noqa: F811
        debian_mirror: str) -> None:
    repo = await hello_repo(tmp_path / "hello")
    await repo.commit("broken", {"src/hello.ml": BROKEN_GREET}, new=True)
    in_process = await statuses(tmp_path / "in-process", repo, ocaml_store, debian_mirror)
    assert [in_process[branch]["result"] for branch in ("main", "broken")] == \
        ["passed", "failed"], in_process

    await cluster.start_worker("ocaml-worker", "linux-x86_64", capacity=2, store=ocaml_store)
    state = tmp_path / "through-cluster"
    clustered = await statuses(state, repo, ocaml_store, debian_mirror,
                               "--cluster", cluster.address)
    for branch, status in clustered.items():
        assert outcomes(status) == outcomes(in_process[branch]), (branch, status)
        for name, job in jobs_of(status).items():
            if name != ANALYSIS and job["state"] != "skipped":
                log = log_of(state, job)
                assert "Running on worker ocaml-worker" in log, (name, job)
                # The job starts when the worker does: the wait for it is queued time.
                assert log.index("Waiting for a worker of pool linux-x86_64") < \
                    log.index("Job started") < log.index("Running on worker"), log
                assert job["queued"] <= job["started"] <= job["finished"], job


async def test_a_pull_request_is_merged_and_built_by_the_clusters_worker(
        tmp_path: Path, cluster: Cluster, ocaml_store: str) -> None:  # noqa: F811
    repo = sample.make_repository(tmp_path / "opam-repository")
    sample.add_release(repo, "new-release", sample.NEW_RELEASE)
    await cluster.start_worker("opam-worker", "linux-x86_64", capacity=2, store=ocaml_store)
    state = tmp_path / "var"
    async with p.Engine(opam_ci(repo, ocaml_store, "--cluster", cluster.address),
                        state_dir=state):
        status = await pr_status(state, repo, "new-release")
    assert status["result"] == "passed", status
    builds = [job for job in status["jobs"] if job.get("package")]
    assert {job["kind"] for job in builds} == {"build", "test", "lower-bounds", "revdeps",
                                               "revdep"}, status
    for job in builds:
        log = log_of(state, job)
        # The worker fetched both commits and merged the head into the base itself.
        assert "Running on worker opam-worker" in log, (job["name"], log)


async def test_each_architecture_has_its_pool_and_a_worker_serves_an_emulated_one(
        tmp_path: Path, cluster: Cluster, ocaml_store: str,  # noqa: F811
        debian_mirror: str) -> None:
    """The amd64 platform's jobs go to the pool linux-x86_64 and run on its worker; the arm64
    platform's build goes to linux-arm64, and waits there, queued, for a worker of its own: one
    of this (amd64) host, building for arm64 under emulation. Its Debian 13 arm64 base and
    OCaml come from the session's store when another test built them first."""
    repo = await hello_repo(tmp_path / "hello")
    await cluster.start_worker("amd64-worker", "linux-x86_64", capacity=2, store=ocaml_store)
    state = tmp_path / "var"
    commit = await head(repo, "main")
    options = ("--platforms", f"{LINTED},{ARM64}", "--cluster", cluster.address)

    def amd64_done() -> dict[str, Any] | None:
        status = read_status(state, repo, "main")
        if status is None or status["commit"] != commit:
            return None
        jobs = jobs_of(status)
        return status if all(job["state"] != "pending" for name, job in jobs.items()
                             if name != ARM64) else None

    async with p.Engine(ci(repo, ocaml_store, debian_mirror, *options), state_dir=state):
        async with asyncio.timeout(HANG_GUARD):
            while (status := amd64_done()) is None or \
                    await cluster.metric("pipeline_cluster_jobs_submitted_total",
                                         "linux-arm64") < 1:
                await asyncio.sleep(0.2)
        jobs = jobs_of(status)
        assert {name: job["state"] for name, job in jobs.items()} == {
            ANALYSIS: "passed", LINTED: "passed", f"{LINTED} (lint-opam)": "passed",
            f"{LINTED} (lint-fmt)": "passed", f"{LINTED} (lint-doc)": "passed",
            ARM64: "pending"}, status
        for name, job in jobs.items():
            if name not in (ANALYSIS, ARM64):
                assert "Running on worker amd64-worker" in log_of(state, job), name
        assert await cluster.metric("pipeline_cluster_jobs_submitted_total",
                                    "linux-arm64") == 1
        assert await cluster.metric("pipeline_cluster_queue_length", "linux-arm64") == 1

        await cluster.start_worker("arm64-worker", "linux-arm64", store=ocaml_store)
        status = await final_status(state, repo, "main", commit, guard=EMULATED_HANG_GUARD)
        assert status["result"] == "passed", status
        log = log_of(state, jobs_of(status)[ARM64])
        assert "Running on worker arm64-worker" in log and "Test Successful" in log, log
        assert log.index("Waiting for a worker of pool linux-arm64") < log.index("Job started")
