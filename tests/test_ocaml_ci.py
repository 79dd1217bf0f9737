"""`pipelines/ocaml_ci.py` end to end: real git repositories of `examples/ocaml-hello`, the real
builder and sandbox, Debian 12's and Debian 13's OCaml (4.13.1 and 5.3.0, dune 2.9 and 3.17), on
amd64 and, under emulation, on arm64.

Every test shares one overlayfs store (`ocaml_store`), so each Debian release is debootstrapped
once per session for each architecture and the platform's packages installed once; each later
OCaml build costs seconds natively.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from ocaml_fixtures import (
    EMULATED_HANG_GUARD,
    HANG_GUARD,
    PIPELINE,
    assert_labels_for_people,
)
from test_build_primitive import Repo

import pipeline as p
from pipeline.cli import load_pipeline
from pipeline.ocaml import status as St
from pipeline.web.diagram import DiagramCache

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = ROOT / "pipelines" / "ocaml_ci.py"
EXAMPLE = ROOT / "examples" / "ocaml-hello"
BROKEN_GREET = 'let greet name = "Goodbye, " ^ name ^ "!"\n'
FIXED_GREET = 'let greet name = "Hello, " ^ name ^ "!"\n'


def example_files() -> dict[str, str]:
    return {str(path.relative_to(EXAMPLE)): path.read_text()
            for path in EXAMPLE.rglob("*") if path.is_file() and "_build" not in path.parts}


async def hello_repo(path: Path, extra: dict[str, str] | None = None) -> Repo:
    """A repository whose first commit is the demo project (plus `extra` files)."""
    path.mkdir()
    for name, text in {**example_files(), **(extra or {})}.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    repo = Repo(path)
    await repo.git("init", "--quiet", "--initial-branch", "main")
    await repo.commit(None, {})
    return repo


def ci(repo: Repo, store: str, mirror: str, *options: str) -> p.Term[Any]:
    """The OCaml CI pipeline of `repo` building on `store` (`options`: more of its options)."""
    return load_pipeline(PIPELINE_FILE, ["--repo", str(repo.path), "--store", store,
                                         "--debian-mirror", mirror, *options])


def read_status(state: Path, repo: Repo | Path, branch: str, *, ci: str = St.DEFAULT_CI,
                ) -> dict[str, Any] | None:
    """The status file of `branch` of `repo` (a `Repo` or its path) written by the CI `ci`."""
    name = (repo.path if isinstance(repo, Repo) else repo).name
    path = St.status_path(state, name, branch, ci=ci)
    return json.loads(path.read_text()) if path.exists() else None


async def final_status(state: Path, repo: Repo | Path, branch: str, commit: str, *,
                       ci: str = St.DEFAULT_CI, guard: float = HANG_GUARD,
                       settled: bool = False) -> dict[str, Any]:
    """The status of `branch` once `commit`'s result is known (not pending) and, if `settled`,
    every job has finished (a failure is known before the other jobs end); fails after `guard`
    seconds, a hang."""
    def done() -> dict[str, Any] | None:
        status = read_status(state, repo, branch, ci=ci)
        if status is None or status["commit"] != commit or status["result"] == "pending":
            return None
        if settled and any(job["state"] == "pending" for job in status["jobs"]):
            return None
        return status

    async with asyncio.timeout(guard):
        while (status := done()) is None:
            await asyncio.sleep(0.1)
    return status


def jobs_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in status["jobs"]}


def log_of(state: Path, job: dict[str, Any]) -> str:
    [log] = (state / "job").glob(f"{job['job_id']}.log")
    return log.read_text()


async def head(repo: Repo, branch: str) -> str:
    return await repo.git("rev-parse", branch)


NATIVE = ("debian-12-4.13", "debian-13-5.3")
"""The platforms chosen by default on this (amd64) host."""
LINTED = "debian-13-5.3"
UNFORMATTED = 'let greet   name = "Hello, " ^ name ^ "!"\n'


async def test_a_broken_test_fails_the_build_and_a_fix_passes_while_a_branch_builds_alone(
        tmp_path: Path, ocaml_store: str, debian_mirror: str) -> None:
    repo = await hello_repo(tmp_path / "hello")
    state = tmp_path / "var"
    async with p.Engine(ci(repo, ocaml_store, debian_mirror), state_dir=state) as engine:
        status = await final_status(state, repo, "main", await head(repo, "main"))
        assert status["result"] == "passed", status
        labels = assert_labels_for_people(await DiagramCache(engine).dot())
        assert {"analysis", "debian-12-4.13 build", "debian-13-5.3 build",
                "debian-13-5.3 lint-fmt"} <= set(labels), labels
        jobs = jobs_of(status)
        # A build on each platform chosen by default, the lints on Debian 13 only.
        assert {name: job["state"] for name, job in jobs.items()} == {
            "(analysis)": "passed", "debian-12-4.13": "passed", "debian-13-5.3": "passed",
            f"{LINTED} (lint-opam)": "passed", f"{LINTED} (lint-fmt)": "passed",
            f"{LINTED} (lint-doc)": "passed"}
        for platform, ocaml, alcotest in (("debian-12-4.13", "4.13.1", "1.6.0"),
                                          ("debian-13-5.3", "5.3.0", "1.8.0")):
            build_log = log_of(state, jobs[platform])
            assert "To reproduce locally" in build_log.split("\n", 3)[2], build_log
            assert "--platform linux/amd64\n" in build_log, build_log
            assert "Test Successful" in build_log
            # Debian's own index of the release named the packages, with the versions the real
            # mirror has.
            assert re.search(rf"alcotest -> libalcotest-ocaml-dev {alcotest}\S*", build_log), \
                build_log
            assert f"ocaml -> ocaml-nox {ocaml}" in build_log, build_log
        doc_log = log_of(state, jobs[f"{LINTED} (lint-doc)"])
        assert re.search(r"odoc -> ocaml-odoc \d\S*", doc_log), doc_log
        assert "libalcotest-ocaml-dev" not in doc_log.partition("odoc -> ")[0], doc_log
        # The demo's .ocamlformat asks for Debian 13's ocamlformat: `dune build @fmt` ran.
        fmt_log = log_of(state, jobs[f"{LINTED} (lint-fmt)"])
        assert "ocamlformat -> ocamlformat 0.27.0" in fmt_log, fmt_log
        assert '(run (shell "dune build @fmt"))' in fmt_log, fmt_log

        # A second branch on the same commit shares its jobs, which are named by commit and
        # platform, never by the first branch.
        await repo.git("branch", "same", "main")
        same = await final_status(state, repo, "same", status["commit"])
        assert {name: job.get("job_id") for name, job in jobs_of(same).items()} == \
            {name: job.get("job_id") for name, job in jobs.items()}
        build_entry = engine.cache.db.entry(jobs["debian-12-4.13"]["job_id"])
        assert build_entry is not None
        assert build_entry.key_pp == f"{status['commit'][:7]} debian-12-4.13 build"

        # A file ocamlformat would change fails lint-fmt, and the commit, saying where.
        unformatted = await repo.commit("unformatted", {"src/hello.ml": UNFORMATTED}, new=True)
        status = await final_status(state, repo, "unformatted", unformatted, settled=True)
        assert status["result"] == "failed", status
        assert {name: job["state"] for name, job in jobs_of(status).items()
                if job["state"] != "passed"} == {f"{LINTED} (lint-fmt)": "failed"}, status
        assert jobs_of(status)[f"{LINTED} (lint-fmt)"]["reason"] == \
            'dune build @fmt: File "src/hello.ml", line 1, characters 0-0:', status
        await repo.git("checkout", "--quiet", "main")

        await repo.commit("feature", {"README.md": "A branch of its own\n"}, new=True)
        broken = await repo.commit("main", {"src/hello.ml": BROKEN_GREET})
        status = await final_status(state, repo, "main", broken, settled=True)
        assert status["result"] == "failed", status
        for platform in NATIVE:
            build = jobs_of(status)[platform]
            assert build["state"] == "failed", status
            # The failing test's own output is in the build's log.
            build_log = log_of(state, build)
            # Its reason is the failing command and alcotest's failure, not an exit status.
            failure = re.fullmatch(
                r"dune build @install @check @runtest: \[FAIL\] greet (\d) (\w+)\.",
                build["reason"])
            assert failure is not None, build
            assert re.search(rf"\[FAIL\]\s+greet\s+{failure[1]}\s+{failure[2]}\.", build_log)
            assert "greets by name" in build_log and "Goodbye, world!" in build_log, build_log

        feature = await final_status(state, repo, "feature", await head(repo, "feature"))
        assert feature["result"] == "passed", feature

        fixed = await repo.commit("main", {"src/hello.ml": FIXED_GREET})
        status = await final_status(state, repo, "main", fixed)
        assert status["result"] == "passed", status


async def test_a_dependency_debian_lacks_skips_the_build_and_no_opam_file_fails(
        tmp_path: Path, ocaml_store: str, debian_mirror: str) -> None:
    repo = await hello_repo(tmp_path / "lacking")
    opam = (repo.path / "hello.opam").read_text().replace(
        '"alcotest" {with-test}', '"alcotest" {with-test}\n  "nosuchlibrary"')
    await repo.commit(None, {"hello.opam": opam})
    await repo.git("checkout", "--quiet", "-b", "no-opam")
    await repo.git("rm", "--quiet", "hello.opam")
    await repo.commit(None, {})
    state = tmp_path / "var"
    async with p.Engine(ci(repo, ocaml_store, debian_mirror), state_dir=state):
        status = await final_status(state, repo, "main", await head(repo, "main"))
        # Each platform says why, naming its own release.
        reasons = []
        for platform, release in zip(NATIVE, ("bookworm", "trixie"), strict=True):
            build = jobs_of(status)[platform]
            assert build["state"] == "skipped", status
            assert build["reason"] == \
                f"no Debian package in {release} for the dependency 'nosuchlibrary'", build
            assert "To reproduce" not in log_of(state, build)
            reasons.append(f"{platform}: {build['reason']}")
        # The lints passed, but nothing was compiled: not passed.
        assert jobs_of(status)[f"{LINTED} (lint-opam)"]["state"] == "passed", status
        assert status["result"] == "no-builds", status
        assert status["reason"] == "; ".join(reasons), status

        status = await final_status(state, repo, "no-opam", await head(repo, "no-opam"))
        assert status["result"] == "failed", status
        [analysis] = status["jobs"]
        assert analysis["state"] == "failed"
        assert "No opam files found" in analysis["reason"], analysis
        assert "No opam files found" in log_of(state, analysis)


ARM64 = "debian-13-5.3_arm64"
EM_AARCH64 = 183
"""The ELF header's `e_machine` of an arm64 program."""


def elf_machine(program: Path) -> int:
    """The `e_machine` of the ELF file `program` (ValueError for another kind of file)."""
    with program.open("rb") as file:
        header = file.read(20)
    if header[:4] != b"\x7fELF" or header[5] != 1:
        raise ValueError(f"{program} is not a little-endian ELF file")
    return int.from_bytes(header[18:20], "little")


async def test_the_demo_is_compiled_and_tested_on_arm64_under_emulation(
        tmp_path: Path, ocaml_store: str, debian_mirror: str) -> None:
    repo = await hello_repo(tmp_path / "hello")
    state = tmp_path / "var"
    async with p.Engine(ci(repo, ocaml_store, debian_mirror, "--platforms", f"{LINTED},{ARM64}"),
                        state_dir=state) as engine:
        status = await final_status(state, repo, "main", await head(repo, "main"),
                                    guard=EMULATED_HANG_GUARD, settled=True)
        labels = assert_labels_for_people(await DiagramCache(engine).dot())
        assert {"trixie/amd64 index", "trixie/arm64 index", f"{ARM64} build"} <= set(labels)
        jobs = jobs_of(status)
        assert status["result"] == "passed", status
        # A job per platform; the lints on the native one only.
        assert {name: job["state"] for name, job in jobs.items()} == {
            "(analysis)": "passed", LINTED: "passed", ARM64: "passed",
            f"{LINTED} (lint-opam)": "passed", f"{LINTED} (lint-fmt)": "passed",
            f"{LINTED} (lint-doc)": "passed"}, status
        assert jobs[ARM64]["platform"] == ARM64
        log = log_of(state, jobs[ARM64])
        assert " --platform linux/arm64\n" in log, log
        # arm64's own index named the packages, and the test ran.
        assert re.search(r"alcotest -> libalcotest-ocaml-dev 1\.8\.\S+", log), log
        assert "Test Successful" in log, log
        # The test program that ran is an arm64 one: it is in the build's last step's layer
        # (the store is overlayfs), made by that step.
        entry = engine.cache.db.entry(jobs[ARM64]["job_id"])
        assert entry is not None and entry.value is not None
        result = json.loads(entry.value)["result"]
        layer = Path(ocaml_store.partition(":")[2]) / "layer" / result / "diff"
        assert elf_machine(layer / "src/_build/default/test/test_hello.exe") == EM_AARCH64


def run_once(state: Path, repo: Path, store: str,
             mirror: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PIPELINE), "run", str(PIPELINE_FILE), "--once", "--state-dir", str(state), "--",
         "--repo", str(repo), "--store", store, "--debian-mirror", mirror],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT)


async def test_once_exits_0_for_a_passing_project_and_1_for_a_failing_one(
        tmp_path: Path, ocaml_store: str, debian_mirror: str) -> None:
    passing = await hello_repo(tmp_path / "passing")
    failing = await hello_repo(tmp_path / "failing", {"src/hello.ml": BROKEN_GREET})
    opam = (EXAMPLE / "hello.opam").read_text().replace(
        '"alcotest" {with-test}', '"alcotest" {with-test}\n  "nosuchlibrary"')
    unbuilt = await hello_repo(tmp_path / "unbuilt", {"hello.opam": opam})
    state = tmp_path / "var"
    done = run_once(state, passing.path, ocaml_store, debian_mirror)
    assert done.returncode == 0, done.stdout + done.stderr
    for repo, result in ((failing, "failed"), (unbuilt, "no-builds")):
        done = run_once(state, repo.path, ocaml_store, debian_mirror)
        assert done.returncode == 1, done.stdout + done.stderr
        assert read_status(state, repo, "main")["result"] == result  # type: ignore[index]


def commits(repo: Path) -> list[str]:
    return subprocess.run(["git", "log", "--format=%H"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.split()


def test_demo_makes_a_repository_of_the_example_once(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    load_pipeline(PIPELINE_FILE, ["--demo", "--demo-dir", str(demo)])
    assert (demo / "hello.opam").read_text() == (EXAMPLE / "hello.opam").read_text()
    [first] = commits(demo)
    # Made again (a restart): the user's repository is left as it is.
    (demo / "mine.txt").write_text("mine\n")
    load_pipeline(PIPELINE_FILE, ["--demo", "--demo-dir", str(demo)])
    assert commits(demo) == [first]
    assert (demo / "mine.txt").exists()
