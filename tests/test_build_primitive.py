"""The build primitive in an engine: real git repositories, the real builder, runc, real stores.

Each test runs the `examples/build_repo.py` pipeline (a build per branch of a repository) in an
in-process Engine, and looks at what happened through the job logs in the state directory.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from obuilder_fixtures import HANG_GUARD

import pipeline as p
from pipeline.cli import load_pipeline
from pipeline.output import Failed, Ok
from pipeline.primitives import git
from pipeline.primitives.obuilder import OP_ID, build

EXAMPLE = Path(__file__).parent.parent / "examples" / "build_repo.py"

HELLO_SPEC = """\
((from busybox)
 (copy (src hello.txt) (dst /hello.txt))
 (run (shell "cat /hello.txt")))
"""


class Repo:
    """A git repository made by a test; every command runs without blocking the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def git(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
            "-c", "protocol.file.allow=always", *args, cwd=self.path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, f"git {' '.join(args)}: {err.decode()}"
        return out.decode().strip()

    @classmethod
    async def create(cls, path: Path, files: dict[str, str]) -> Repo:
        path.mkdir()
        repo = cls(path)
        await repo.git("init", "--quiet", "--initial-branch", "main")
        await repo.commit(None, files)
        return repo

    async def commit(self, branch: str | None, files: dict[str, str], *,
                     new: bool = False) -> str:
        """Commit `files` on `branch` (the current one if None; made from the current one if
        `new`); returns the commit's hash."""
        if branch is not None:
            await self.git("checkout", "--quiet", *(["-b"] if new else []), branch)
        for name, text in files.items():
            (self.path / name).write_text(text)
        await self.git("add", "--all")
        await self.git("commit", "--quiet", "--allow-empty", "-m", f"on {branch}")
        return await self.git("rev-parse", "HEAD")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail after HANG_GUARD seconds (a hang, not a timing)."""
    try:
        async with asyncio.timeout(HANG_GUARD):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def build_logs(state: Path) -> list[Path]:
    """The logs of every build job so far (in no useful order: job ids count seconds)."""
    return sorted((state / "job").glob(f"*/*-{OP_ID}-*.log"))


def logs_of(state: Path, branch: str) -> list[str]:
    """The texts of the build logs of `branch`."""
    texts = [log.read_text() for log in build_logs(state)]
    return [text for text in texts if f" refs/heads/{branch} at " in text]


def log_with(state: Path, branch: str, text: str) -> str | None:
    """The build log of `branch` containing `text`, if there is one."""
    return next((log for log in logs_of(state, branch) if text in log), None)


def all_logs(state: Path) -> list[Path]:
    return sorted((state / "job").glob("*/*.log"))


def example(repo: Repo, images: Path, *extra: str) -> p.Term[Any]:
    return load_pipeline(EXAMPLE, ["--repo", str(repo.path), "--image-dir", str(images), *extra])


async def test_a_build_gives_its_result_id_and_logs_its_steps(
        tmp_path: Path, busybox_images: Path) -> None:
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "hello from main\n"})
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
        [result] = output.value
    assert (state / "store" / "result" / result / "rootfs" / "hello.txt").read_text() == \
        "hello from main\n"
    [log] = logs_of(state, "main")
    assert "hello from main" in log
    assert f'---> saved as "{result}"' in log
    assert log.rstrip().endswith("Job succeeded")


async def test_a_commit_triggers_one_build_and_an_unchanged_head_none(
        tmp_path: Path, busybox_images: Path) -> None:
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "one\n"})
    await repo.commit("feature", {"hello.txt": "feature one\n"}, new=True)
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        assert len(build_logs(state)) == 2
        # An unchanged head read again (the ref rewritten with its own value, then a forced
        # re-read) changes nothing.
        await repo.git("update-ref", "refs/heads/main", await repo.git("rev-parse", "main"))
        assert git.refresh(str(repo.path)) >= 1
        await engine.wait_idle()
        assert len(build_logs(state)) == 2
        await repo.commit("feature", {"hello.txt": "feature two\n"})
        await until(lambda: len(build_logs(state)) == 3, "the new commit's build")
        await engine.wait_idle()
        assert len(build_logs(state)) == 3
        assert log_with(state, "feature", "feature two") is not None
        assert len(logs_of(state, "main")) == 1
        output = engine.root_output()
        assert isinstance(output, Ok) and len(output.value) == 2, output


async def test_branches_sharing_first_steps_build_them_once(
        tmp_path: Path, busybox_images: Path) -> None:
    # The first run step prints a fresh random id each time it runs: both branches' logs show
    # the same one only if it ran once.
    spec = """\
((from busybox)
 (run (shell "echo run-id $(cat /proc/sys/kernel/random/uuid)"))
 (copy (src branch.txt) (dst /branch.txt))
 (run (shell "cat /branch.txt")))
"""
    repo = await Repo.create(tmp_path / "repo", {"build.spec": spec, "branch.txt": "main\n"})
    await repo.commit("other", {"branch.txt": "other\n"}, new=True)
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
        main_result, other_result = output.value
        assert main_result != other_result
    run_ids = {branch: re.findall(r"run-id ([0-9a-f-]{36})", logs_of(state, branch)[0])
               for branch in ("main", "other")}
    assert len(run_ids["main"]) == 1
    assert run_ids["main"] == run_ids["other"]


def processes_with(token: str) -> list[int]:
    """The pids of processes whose command line contains `token`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process has gone
    return pids


def held_spec(token: str) -> str:
    """A spec whose step prints `token` then waits for /go, which nothing creates: only a
    cancellation ends it."""
    return f"""\
((from busybox)
 (run (shell "echo {token}; while [ ! -e /go ]; do sleep 0.1; done")))
"""


def holding(state: Path, branch: str, token: str) -> bool:
    """Whether a build of `branch` has reached its held step (the header names the token
    too: the output line is the token alone)."""
    return log_with(state, branch, f"{token}\n") is not None


async def test_deleting_a_branch_cancels_its_running_build(
        tmp_path: Path, busybox_images: Path) -> None:
    token = f"hold-{uuid.uuid4().hex}"
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "main\n"})
    await repo.commit("doomed", {"build.spec": held_spec(token)}, new=True)
    await repo.git("checkout", "--quiet", "main")
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await until(lambda: holding(state, "doomed", token)
                    and "Job succeeded" in logs_of(state, "main")[0],
                    "main built and doomed's step running")
        assert processes_with(token)
        await repo.git("branch", "--delete", "--force", "doomed")
        await until(lambda: "Job failed" in logs_of(state, "doomed")[0], "the cancellation")
        assert ("Job failed: Auto-cancelling job because it is no longer needed"
                in logs_of(state, "doomed")[0])
        # The builder returns from a cancelled step only once its sandbox is dead.
        assert processes_with(token) == []
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok) and len(output.value) == 1, output


async def test_a_new_commit_cancels_the_stale_build_of_its_branch(
        tmp_path: Path, busybox_images: Path) -> None:
    token = f"hold-{uuid.uuid4().hex}"
    repo = await Repo.create(tmp_path / "repo", {"build.spec": held_spec(token),
                                                 "hello.txt": "new\n"})
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await until(lambda: holding(state, "main", token), "the held step running")
        await repo.commit("main", {"build.spec": HELLO_SPEC})
        await until(lambda: "Job failed" in (log_with(state, "main", token) or ""),
                    "the cancellation")
        assert ("Job failed: Auto-cancelling job because it is no longer needed"
                in (log_with(state, "main", token) or ""))
        assert processes_with(token) == []
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
    assert len(logs_of(state, "main")) == 2
    assert "Job succeeded" in (log_with(state, "main", "new\n") or "")


async def test_a_restart_on_the_same_state_runs_nothing(
        tmp_path: Path, busybox_images: Path) -> None:
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "hello\n"})
    await repo.commit("second", {"hello.txt": "second\n"}, new=True)
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        first = engine.root_output()
        assert isinstance(first, Ok), first
    jobs = all_logs(state)
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        assert engine.root_output() == first
        assert all_logs(state) == jobs
        graph = p.pipeline_graph(engine.root, engine)
        job_nodes = [attrs for _, attrs in graph.nodes(data=True) if attrs.get("job_id")]
        assert len(job_nodes) == 4  # read-spec and build, per branch
        assert all(attrs["cached"] for attrs in job_nodes)


async def test_a_broken_spec_fails_its_branch_only(
        tmp_path: Path, busybox_images: Path) -> None:
    broken = '((from busybox)\n (run (shel "echo hi")))\n'
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "fine\n"})
    await repo.commit("broken", {"build.spec": broken}, new=True)
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Failed), output
    [broken_log] = logs_of(state, "broken")
    assert "Job failed: SpecError: spec:2:8: unknown field `shel` in run" in broken_log
    [main_log] = logs_of(state, "main")
    assert "fine" in main_log and main_log.rstrip().endswith("Job succeeded")


async def test_a_submodule_is_in_the_context(tmp_path: Path, busybox_images: Path) -> None:
    library = await Repo.create(tmp_path / "library", {"lib.txt": "from the submodule\n"})
    spec = """\
((from busybox)
 (copy (src lib/lib.txt) (dst /lib.txt))
 (run (shell "cat /lib.txt")))
"""
    repo = await Repo.create(tmp_path / "repo", {"build.spec": spec})
    await repo.git("submodule", "--quiet", "add", str(library.path), "lib")
    await repo.commit(None, {})
    state = tmp_path / "var"
    async with p.Engine(example(repo, busybox_images), state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
    [log] = logs_of(state, "main")
    assert "from the submodule" in log


async def test_a_build_on_a_btrfs_store(
        tmp_path: Path, busybox_images: Path, btrfs_mount: Path) -> None:
    store = btrfs_mount / f"build-primitive-{uuid.uuid4().hex}"
    store.mkdir()
    repo = await Repo.create(tmp_path / "repo", {"build.spec": HELLO_SPEC,
                                                 "hello.txt": "on btrfs\n"})
    state = tmp_path / "var"
    root = example(repo, busybox_images, "--store", f"btrfs:{store}")
    async with p.Engine(root, state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
        [result] = output.value
    assert (store / "result" / result / "rootfs" / "hello.txt").read_text() == "on btrfs\n"
    assert "on btrfs" in logs_of(state, "main")[0]


async def test_a_build_without_context_keyed_on_the_canonical_spec(
        tmp_path: Path, busybox_images: Path) -> None:
    spec = '((from busybox) (run (shell "echo no context; ls /")))'
    # The same spec, laid out differently and commented: one key, so one job.
    reformatted = '; a comment\n((from busybox)\n   (run (shell "echo no context; ls /"))\n)\n'
    images = str(busybox_images)
    root = p.all(build(spec, image_dir=images), build(reformatted, image_dir=images))
    state = tmp_path / "var"
    async with p.Engine(root, state_dir=state) as engine:
        await engine.wait_idle()
        output = engine.root_output()
        assert isinstance(output, Ok), output
        first, second = output.value
    assert first == second
    [log] = [path.read_text() for path in build_logs(state)]
    assert "no context" in log and "on rsync:store" in log


async def test_one_build_operation_runs_in_the_pool_each_build_asks_for(
        tmp_path: Path, busybox_images: Path) -> None:
    left, right = p.Pool("left", 1), p.Pool("right", 1)
    tokens = [f"hold-{uuid.uuid4().hex}" for _ in range(2)]
    images = str(busybox_images)
    held = [build(held_spec(token), image_dir=images, pool=left) for token in tokens]
    beside = build('((from busybox) (run (shell "echo beside")))', image_dir=images, pool=right)
    state = tmp_path / "var"

    def job(term: p.Term[Any]) -> p.Job:
        node = engine.node_for(term)
        assert node is not None and node.job_id is not None
        found = engine.jobs.get(node.job_id)
        assert found is not None
        return found

    def log_holding(token: str) -> bool:
        return any(f"{token}\n" in path.read_text() for path in build_logs(state))

    async with p.Engine(p.all(*held, beside), state_dir=state) as engine:
        # The right pool's build runs and ends while a held build keeps the left pool's only slot.
        await until(lambda: any(map(log_holding, tokens))
                    and job(beside).state is p.JobState.OK, "a held build and the other one")
        running, waiting = (0, 1) if log_holding(tokens[0]) else (1, 0)
        assert job(held[running]).pool is left
        assert job(held[running]).state is p.JobState.RUNNING
        assert job(held[waiting]).pool is left
        assert job(held[waiting]).state is p.JobState.READY
        assert (left.in_use, left.queue_length) == (1, 1)
        assert job(beside).pool is right
        assert "Waiting for a slot in pool right" in job(beside).log_path.read_text()
        assert sorted(stats["name"] for stats in engine.pool_stats()) == ["left", "right"]
        # Cancelling the running build gives its slot to the waiting one.
        assert engine.cancel(job(held[running]).id)
        await until(lambda: log_holding(tokens[waiting]), "the waiting build's step running")
        assert job(held[waiting]).state is p.JobState.RUNNING
        assert "Waiting for a slot in pool left" in job(held[waiting]).log_path.read_text()
    assert processes_with(tokens[0]) == processes_with(tokens[1]) == []


async def test_a_build_gets_the_secrets_it_is_given(tmp_path: Path, busybox_images: Path) -> None:
    value = f"secret-{uuid.uuid4().hex}"
    spec = ('((from busybox) (run (secrets (token (target /run/token)))'
            ' (shell "echo token: $(cat /run/token)")))')
    root = build(spec, image_dir=str(busybox_images), secrets={"token": value.encode()})
    state = tmp_path / "var"
    async with p.Engine(root, state_dir=state) as engine:
        await engine.wait_idle()
        assert isinstance(engine.root_output(), Ok), engine.root_output()
    [log] = [path.read_text() for path in build_logs(state)]
    assert f"token: {value}\n" in log
