"""Git primitives on real repositories made by the tests: monitors, fetch, checkout, read_file."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline as p
from pipeline.output import Failed, Ok
from pipeline.primitives import git
from pipeline.primitives.git import Commit

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}


def run_git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], env=ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    run_git(path, "init", "-q", "-b", "main")
    commit(path, files or {"README": "hello\n"})
    return path


def commit(repo: Path, files: dict[str, str], message: str = "change") -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", message)
    return run_git(repo, "rev-parse", "HEAD")


async def poll_until(condition: Callable[[], bool], tries: int = 1000) -> None:
    """Up to 10 s of 10 ms polls: well within the 2 s promise plus a loaded machine's slack."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only watchdog can then explain a change seen within the test's bounded wait."""
    monkeypatch.setattr(git, "LOCAL_POLL_SECONDS", 3600.0)


def refs(output: Any) -> list[tuple[str, str]]:
    assert isinstance(output, Ok), output
    return [(c.ref, c.hash) for c in output.value]


class GitCalls:
    """Wraps the module's git runner to count git commands, and `git fetch` calls' overlap."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.fetches = 0
        self.running = 0
        self.max_running = 0
        self.gate: asyncio.Event | None = None
        original = git._run

        async def wrapped(*args: str, cwd: str | Path) -> tuple[int, bytes, bytes]:
            self.counts[args[0]] += 1
            if args[0] != "fetch":
                return await original(*args, cwd=cwd)
            self.fetches += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                if self.gate is not None:
                    await self.gate.wait()
                return await original(*args, cwd=cwd)
            finally:
                self.running -= 1

        monkeypatch.setattr(git, "_run", wrapped)



# Commit


def test_commit_equality_and_properties() -> None:
    h = "0123456789abcdef0123456789abcdef01234567"
    a = Commit("/r", h, "refs/heads/main")
    assert a == Commit("/r", h, "refs/heads/main")
    assert hash(a) == hash(Commit("/r", h, "refs/heads/main"))
    assert a != Commit("/r", h, "refs/heads/dev")
    assert a.branch == "main" and a.short == "0123456"
    assert Commit("/r", h, "refs/heads/feature/x").branch == "feature/x"
    assert Commit("/r", h, "refs/tags/v1").branch is None
    assert Commit("/r", h, "HEAD").branch is None


def test_normalise() -> None:
    assert git.normalise("git://127.0.0.1:9418/repo/") == "git://127.0.0.1:9418/repo"
    assert git.normalise("git@example.com:me/repo.git") == "git@example.com:me/repo.git"
    assert git.normalise("some/dir/") == str(Path("some/dir").resolve())


# Local repositories


async def test_local_heads_lists_branches_sorted(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    main = run_git(repo, "rev-parse", "HEAD")
    run_git(repo, "branch", "zeta")
    run_git(repo, "branch", "alpha")
    run_git(repo, "tag", "-a", "v1", "-m", "annotated")
    async with p.Engine(git.local_heads(repo), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert refs(engine.root_output()) == [
            ("refs/heads/alpha", main), ("refs/heads/main", main), ("refs/heads/zeta", main)]
        commits = engine.root_output().value  # type: ignore[union-attr]
        assert {c.repo for c in commits} == {str(repo.resolve())}
    root = git.local_heads(repo, tags=True, head=True)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        # The annotated tag is listed with the commit it points to, not the tag object.
        assert refs(engine.root_output()) == [
            ("HEAD", main), ("refs/heads/alpha", main), ("refs/heads/main", main),
            ("refs/heads/zeta", main), ("refs/tags/v1", main)]


async def test_local_heads_sees_commits_and_branches_come_and_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_polling(monkeypatch)
    repo = make_repo(tmp_path / "repo")
    async with p.Engine(git.local_heads(repo), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        first = refs(engine.root_output())
        new = commit(repo, {"a": "1"})
        await poll_until(lambda: refs(engine.root_output()) != first)
        assert refs(engine.root_output()) == [("refs/heads/main", new)]
        run_git(repo, "branch", "feature/x")
        await poll_until(lambda: len(refs(engine.root_output())) == 2)
        assert refs(engine.root_output()) == [
            ("refs/heads/feature/x", new), ("refs/heads/main", new)]
        run_git(repo, "branch", "-D", "feature/x")
        await poll_until(lambda: len(refs(engine.root_output())) == 1)


async def test_local_heads_reads_packed_refs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_polling(monkeypatch)
    repo = make_repo(tmp_path / "repo")
    run_git(repo, "branch", "dev")
    run_git(repo, "pack-refs", "--all")
    assert not (repo / ".git/refs/heads/dev").exists()
    head = run_git(repo, "rev-parse", "HEAD")
    async with p.Engine(git.local_heads(repo), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert refs(engine.root_output()) == [("refs/heads/dev", head), ("refs/heads/main", head)]
        # Deleting a packed branch rewrites packed-refs only.
        run_git(repo, "branch", "-D", "dev")
        await poll_until(lambda: refs(engine.root_output()) == [("refs/heads/main", head)])


async def test_local_heads_of_a_linked_worktree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_polling(monkeypatch)
    repo = make_repo(tmp_path / "repo")
    run_git(repo, "worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"))
    root = git.local_heads(tmp_path / "wt", head=True)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        before = refs(engine.root_output())
        assert [ref for ref, _ in before] == ["HEAD", "refs/heads/main", "refs/heads/side"]
        new = commit(tmp_path / "wt", {"b": "2"})
        await poll_until(lambda: ("HEAD", new) in refs(engine.root_output()))
        assert ("refs/heads/side", new) in refs(engine.root_output())


async def test_unchanged_repository_reread_propagates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_polling(monkeypatch)
    repo = make_repo(tmp_path / "repo")
    calls: list[int] = []
    reads = GitCalls(monkeypatch)

    def count(commits: list[Commit]) -> int:
        calls.append(len(commits))
        return len(commits)

    heads = git.local_heads(repo)
    async with p.Engine(heads.map(count), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert calls == [1]
        # Called on the engine's loop, refresh marks the watch busy at once, so wait_idle
        # returns only after the second read.
        assert git.refresh(str(repo)) == 1
        await engine.wait_idle()
        assert calls == [1], "an equal list of commits must stop propagation"
        # Reading opens refs files; those events must not count as changes (a read loop).
        assert reads.counts["for-each-ref"] == 2


async def test_local_errors_and_recovery(tmp_path: Path) -> None:
    missing = tmp_path / "later"
    plain = tmp_path / "plain"
    plain.mkdir()
    root = p.pair(p.catch(git.local_heads(missing)), p.catch(git.local_heads(plain)))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok)
        assert [failure.message for failure in out.value] == [
            f"{missing}: no such file or directory", f"{plain}: not a git repository"]
        # The repository appears: the next refresh (or poll) picks it up.
        make_repo(missing)
        make_repo(plain)
        assert git.refresh(str(missing)) == 1
        assert git.refresh(str(plain)) == 1
        await poll_until(lambda: all(isinstance(o, Ok) for o in engine.root_output().value))
        # The watch of the new repository is installed by the next poll (5 s); meanwhile a
        # refresh reads it.
        new = commit(missing, {"x": "1"})
        git.refresh(str(missing))
        await poll_until(
            lambda: refs(engine.root_output().value[0]) == [("refs/heads/main", new)])


async def test_missing_repository_fails_the_node_not_the_engine(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    async with p.Engine(git.local_heads(missing), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Failed) and out.message == f"{missing}: no such file or directory"


# Remote repositories


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A `git daemon` serving tmp_path/served; yields (that directory, its git:// base URL)."""
    base = tmp_path / "served"
    base.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["git", "daemon", "--export-all", "--reuseaddr", f"--base-path={base}",
         f"--port={port}", "--listen=127.0.0.1", str(base)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("git daemon did not start")
        yield base, f"git://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


async def test_remote_heads_via_git_daemon_and_refresh(
        tmp_path: Path, daemon: tuple[Path, str]) -> None:
    base, url = daemon
    repo = make_repo(base / "repo")
    run_git(repo, "branch", "dev")
    head = run_git(repo, "rev-parse", "HEAD")
    root = git.remote_heads(f"{url}/repo", poll=3600)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert refs(engine.root_output()) == [("refs/heads/dev", head), ("refs/heads/main", head)]
        assert {c.repo for c in engine.root_output().value} == {f"{url}/repo"}
        new = commit(repo, {"a": "1"})
        # The poll is an hour away: only the webhook refresh can explain a change.
        assert git.refresh(f"{url}/repo/") == 1
        await poll_until(lambda: ("refs/heads/main", new) in refs(engine.root_output()))


async def test_remote_heads_via_file_url_with_tags(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    head = run_git(repo, "rev-parse", "HEAD")
    run_git(repo, "tag", "-a", "v1", "-m", "v1")
    url = f"file://{repo}"
    root = git.remote_heads(url, poll=3600, tags=True)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        assert refs(engine.root_output()) == [("refs/heads/main", head), ("refs/tags/v1", head)]
        run_git(repo, "branch", "dev")
        assert git.refresh(url) == 1
        await poll_until(lambda: len(refs(engine.root_output())) == 3)
    assert git.refresh(url) == 0, "the watch is gone with the engine"


async def test_remote_unreachable_then_recovers(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/later"
    port = free_port()
    unreachable = f"git://127.0.0.1:{port}/nothing"
    root = p.pair(p.catch(git.remote_heads(url, poll=3600)),
                  p.catch(git.remote_heads(unreachable, poll=3600)))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        (later, nothing) = engine.root_output().value  # type: ignore[union-attr]
        assert isinstance(later, Failed) and isinstance(nothing, Failed)
        assert later.message == (f"{url}: unreachable: '{tmp_path}/later' "
                                 "does not appear to be a git repository")
        assert nothing.message.startswith(f"{unreachable}: unreachable: unable to connect")
        make_repo(tmp_path / "later")
        git.refresh(url)
        await poll_until(lambda: isinstance(engine.root_output().value[0], Ok))


# Fetch


async def test_fetch_mirrors_a_remote_once_and_fetches_only_missing_commits(
        tmp_path: Path, daemon: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    base, url = daemon
    repo = make_repo(base / "repo")
    first = run_git(repo, "rev-parse", "HEAD")
    calls = GitCalls(monkeypatch)
    wanted = p.Variable(Commit(f"{url}/repo", first, "refs/heads/main"))
    async with p.Engine(git.fetch(wanted), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok), out
        mirror = Path(out.value.repo)
        assert mirror.parent == (tmp_path / "var" / "git").resolve()
        assert out.value == Commit(str(mirror), first, "refs/heads/main")
        assert calls.fetches == 1
        assert run_git(mirror, "cat-file", "-t", first) == "commit"

        # A second branch already fetched (the mirror took every ref): no fetch.
        run_git(repo, "branch", "dev")
        second = commit(repo, {"b": "2"})
        run_git(repo, "update-ref", "refs/heads/dev", first)
        wanted.set(Commit(f"{url}/repo", first, "refs/heads/dev"))
        await engine.wait_idle()
        assert engine.root_output() == Ok(Commit(str(mirror), first, "refs/heads/dev"))
        assert calls.fetches == 1

        # A commit the mirror lacks: one more fetch into the same mirror.
        wanted.set(Commit(f"{url}/repo", second, "refs/heads/main"))
        await engine.wait_idle()
        assert engine.root_output() == Ok(Commit(str(mirror), second, "refs/heads/main"))
        assert calls.fetches == 2
        assert [m.name for m in mirror.parent.iterdir()] == [mirror.name]


async def test_concurrent_fetches_of_one_remote_are_serialised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    first = run_git(repo, "rev-parse", "HEAD")
    second = commit(repo, {"b": "2"})
    url = f"file://{repo}"
    calls = GitCalls(monkeypatch)
    calls.gate = asyncio.Event()
    root = p.pair(git.fetch(p.const(Commit(url, first, "refs/heads/a"))),
                  git.fetch(p.const(Commit(url, second, "refs/heads/b"))))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await poll_until(lambda: calls.fetches == 1 and [
            job.state for job in engine.jobs.active()] == [p.JobState.RUNNING] * 2)
        await asyncio.sleep(0.05)  # room for a wrongly unserialised second fetch to start
        assert calls.running == 1
        calls.gate.set()
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok), out
        assert out.value[0].repo == out.value[1].repo
        # The second job found its commit brought by the first one's fetch.
        assert calls.fetches == 1 and calls.max_running == 1


async def test_fetch_of_a_local_repository_uses_it_in_place(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    head = git.Commit(str(repo.resolve()), run_git(repo, "rev-parse", "HEAD"), "refs/heads/main")
    missing = git.Commit(str(repo.resolve()), "f" * 40, "refs/heads/gone")
    root = p.pair(git.fetch(p.const(head)), p.catch(git.fetch(p.const(missing))))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok)
        assert out.value[0] == head
        assert isinstance(out.value[1], Failed) and "f" * 40 in out.value[1].message
    assert not (tmp_path / "var" / "git").exists()


async def test_fetch_of_an_unreachable_remote_fails(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/nothing"
    root = git.fetch(p.const(Commit(url, "a" * 40, "refs/heads/main")))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        # A builder's failure is prefixed with the exception's type.
        assert isinstance(out, Failed)
        assert out.message == (f"GitError: {url}: unreachable: '{tmp_path}/nothing' "
                               "does not appear to be a git repository")


def lose_every_object(repo: Path, mirror: Path, main: str) -> tuple[Commit, str]:
    """A lost pack: no object is left, the refs still name them; then main moves on."""
    for path in (mirror / "objects").rglob("*"):
        if path.is_file() and path.parent.name != "info":
            path.unlink()
    new = commit(repo, {"f": "new\n"})
    return Commit(f"file://{repo}", new, "refs/heads/main"), "new\n"


def lose_the_files_of_main(repo: Path, mirror: Path, main: str) -> tuple[Commit, str]:
    """Objects lost in a way no fetch notices: the commit is there, its files are not; then
    another branch points to it."""
    for line in run_git(mirror, "ls-tree", "-r", main).splitlines():
        blob = line.split()[2]
        (mirror / "objects" / blob[:2] / blob[2:]).unlink()
    run_git(repo, "branch", "third", main)
    return Commit(f"file://{repo}", main, "refs/heads/third"), "main\n"


@pytest.mark.parametrize("corrupt", [lose_every_object, lose_the_files_of_main])
async def test_a_corrupt_mirror_is_cloned_again(
        tmp_path: Path, corrupt: Callable[[Path, Path, str], tuple[Commit, str]]) -> None:
    repo = make_repo(tmp_path / "repo", {"f": "main\n"})
    # Loose objects, so that a test may delete some (a fetch would unpack so few anyway).
    run_git(repo, "config", "fetch.unpackLimit", "1000")
    main = run_git(repo, "rev-parse", "HEAD")
    run_git(repo, "checkout", "-q", "-b", "other")
    commit(repo, {"f": "other\n"})
    run_git(repo, "checkout", "-q", "main")

    @p.builder("read", auto_cancel=True)
    async def read(job: p.Job, fetched: Commit) -> str:
        async with git.checkout(fetched) as src:
            return (src / "f").read_text()

    def pipeline(wanted: Commit) -> tuple[p.Term[Commit], p.Term[tuple[Commit, str]]]:
        fetched = git.fetch(p.const(wanted))
        return fetched, p.pair(fetched, read(fetched))

    _, root = pipeline(Commit(f"file://{repo}", main, "refs/heads/main"))
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok) and out.value[1] == "main\n", out
        mirror = Path(out.value[0].repo)
    run_git(mirror, "fsck", "--connectivity-only")
    wanted, content = corrupt(repo, mirror, main)
    assert subprocess.run(["git", "-C", str(mirror), "fsck", "--connectivity-only"],
                          capture_output=True).returncode != 0

    # After a restart, a build of another commit or branch re-clones the mirror and carries on.
    fetched, root = pipeline(wanted)
    async with p.Engine(root, state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert out == Ok((Commit(str(mirror), wanted.hash, wanted.ref), content)), out
        node = engine.node_for(fetched)
        assert node is not None and node.job_id is not None
        log = engine.jobs.log_path(node.job_id).read_text()
    recloned = [line for line in log.splitlines() if "re-cloning" in line]
    assert len(recloned) == 1, log
    assert f"mirror {mirror} is corrupt (" in recloned[0], log
    assert recloned[0].endswith(f"): re-cloning it from file://{repo}"), log
    run_git(mirror, "fsck", "--connectivity-only")
    assert [m.name for m in mirror.parent.iterdir()] == [mirror.name]


# Checkout and read_file


def make_repo_with_submodule(tmp_path: Path) -> tuple[Path, str, str]:
    lib = make_repo(tmp_path / "lib", {"lib.txt": "library v1\n"})
    lib_v1 = run_git(lib, "rev-parse", "HEAD")
    app = make_repo(tmp_path / "app", {"app.txt": "app\n"})
    run_git(app, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    app_head = commit(app, {}, "add lib")
    commit(lib, {"lib.txt": "library v2\n"})  # later lib commits must not leak into checkouts
    return app, app_head, lib_v1


async def test_checkout_with_submodule_of_a_fetched_remote(tmp_path: Path) -> None:
    app, app_head, lib_v1 = make_repo_with_submodule(tmp_path)

    @p.builder("tree", auto_cancel=True)
    async def tree(job: p.Job, fetched: Commit) -> dict[str, str]:
        async with git.checkout(fetched) as src:
            return {
                "app": (src / "app.txt").read_text(),
                "lib": (src / "lib" / "lib.txt").read_text(),
                "lib_head": run_git(src / "lib", "rev-parse", "HEAD"),
                "status": run_git(src, "status", "--porcelain"),
                "dir": str(src),
            }

    fetched = git.fetch(p.const(Commit(f"file://{app}", app_head, "refs/heads/main")))
    async with p.Engine(tree(fetched), state_dir=tmp_path / "var") as engine:
        await engine.wait_idle()
        out = engine.root_output()
        assert isinstance(out, Ok), out
        assert out.value["app"] == "app\n" and out.value["lib"] == "library v1\n"
        assert out.value["lib_head"] == lib_v1 and out.value["status"] == ""
        assert not Path(out.value["dir"]).exists(), "the checkout is removed afterwards"


async def test_two_checkouts_of_one_repository_at_once(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"f": "one\n"})
    one = Commit(str(repo.resolve()), run_git(repo, "rev-parse", "HEAD"), "refs/heads/main")
    two = Commit(one.repo, commit(repo, {"f": "two\n"}), "refs/heads/main")
    async with git.checkout(one) as a, git.checkout(two) as b:
        assert a != b
        assert (a / "f").read_text() == "one\n" and (b / "f").read_text() == "two\n"
    assert not a.exists() and not b.exists()

    async def read(c: Commit) -> str:
        async with git.checkout(c) as d:
            return (d / "f").read_text()

    assert await asyncio.gather(read(one), read(two), read(one)) == ["one\n", "two\n", "one\n"]
    assert run_git(repo, "status", "--porcelain") == "", "the repository itself is untouched"
    assert run_git(repo, "worktree", "list").count("\n") == 0


async def test_checkout_of_a_missing_commit_fails_and_cleans_up(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    bad = Commit(str(repo.resolve()), "e" * 40, "refs/heads/main")
    with pytest.raises(git.GitError, match=f"{bad.repo}: checkout of eeeeeee"):
        async with git.checkout(bad):
            raise AssertionError("not reached")


async def test_read_file(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"dir/a.txt": "A\n"})
    c = Commit(str(repo.resolve()), run_git(repo, "rev-parse", "HEAD"), "refs/heads/main")
    assert await git.read_file(c, "dir/a.txt") == b"A\n"
    with pytest.raises(FileNotFoundError, match=f"nope.txt: no such file in .*{c.short}"):
        await git.read_file(c, "nope.txt")
    with pytest.raises(git.GitError):
        await git.read_file(Commit(c.repo, "d" * 40, c.ref), "dir/a.txt")
    with pytest.raises(git.GitError, match="no such file or directory"):
        await git.read_file(Commit(str(tmp_path / "gone"), c.hash, c.ref), "dir/a.txt")
