"""The generated opam repository of the demo and the tests: its content, its determinism, and
the helpers that add pull-request branches (real git, real opam lint)."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.opam_repo import sample
from pipeline.opam_repo.specs import REPOSITORY


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def show(repo: Path, revision: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{revision}:{path}"], cwd=repo, check=True,
                          capture_output=True).stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample.make_demo(tmp_path_factory.mktemp("demo") / "repository")


def test_the_base_holds_the_compiler_dune_and_five_packages_with_archives(demo: Path) -> None:
    files = git(demo, "ls-tree", "-r", "--name-only", sample.BASE).split()
    opam_files = sorted(f for f in files if f.startswith("packages/"))
    assert opam_files == [
        "packages/dune/dune.2.9.3/opam",
        "packages/greet/greet.1.0/opam",
        "packages/hello/hello.1.0/opam",
        "packages/ocaml-system/ocaml-system.4.13.1/opam",
        "packages/ocaml/ocaml.4.13.1/opam",
        "packages/strutil/strutil.1.0/opam",
        "packages/strutil/strutil.1.1/opam",
        "packages/testkit/testkit.1.0/opam",
        "packages/wordcount/wordcount.1.0/opam",
    ]
    assert sorted(f for f in files if f.startswith("archives/")) == [
        f"archives/{name}.tar.gz" for name in ("greet-1.0", "hello-1.0", "strutil-1.0",
                                               "strutil-1.1", "testkit-1.0", "wordcount-1.0")]
    assert show(demo, sample.BASE, "repo") == b'opam-version: "2.0"\n'
    system = show(demo, sample.BASE, "packages/ocaml-system/ocaml-system.4.13.1/opam").decode()
    assert 'available: sys-ocaml-version = "4.13.1"' in system and "flags: compiler" in system
    ocaml = show(demo, sample.BASE, "packages/ocaml/ocaml.4.13.1/opam").decode()
    assert '"ocaml-system" {= "4.13.1"}' in ocaml
    assert "build" not in show(demo, sample.BASE, "packages/dune/dune.2.9.3/opam").decode()
    assert git(demo, "rev-list", "--count", sample.BASE).strip() == "2"


def test_the_demo_has_one_branch_per_kind_of_result(demo: Path) -> None:
    branches = git(demo, "branch", "--format=%(refname:short)").split()
    assert sorted(branches) == sorted([sample.BASE, *sample.DEMO_BRANCHES])
    added = {branch: git(demo, "diff", "--name-only", sample.BASE, branch).split()
             for branch in sample.DEMO_BRANCHES}
    assert added == {
        "new-release": ["archives/greet-1.1.tar.gz", "packages/greet/greet.1.1/opam"],
        "lint-error": ["archives/testkit-1.1.tar.gz", "packages/testkit/testkit.1.1/opam"],
        "build-failure": ["archives/wordcount-1.1.tar.gz",
                          "packages/wordcount/wordcount.1.1/opam"],
    }
    assert "md5=" in show(demo, "lint-error", "packages/testkit/testkit.1.1/opam").decode()


def test_the_same_calls_make_the_same_commits(demo: Path, tmp_path: Path) -> None:
    again = sample.make_demo(tmp_path / "again")
    for branch in (sample.BASE, *sample.DEMO_BRANCHES):
        assert git(again, "rev-parse", branch) == git(demo, "rev-parse", branch), branch


def _urls(repo: Path, branch: str) -> list[tuple[str, str, str]]:
    """(archive path, algorithm, digest) of every package's url on `branch`."""
    found = []
    for path in git(repo, "ls-tree", "-r", "--name-only", branch, "packages").split():
        text = show(repo, branch, path).decode()
        if match := re.search(r'src: "(\S+)"\n  checksum: "(\w+)=(\w+)"', text):
            assert match[1].startswith(f"file://{REPOSITORY}/archives/"), match[1]
            found.append((match[1].removeprefix(f"file://{REPOSITORY}/"), match[2], match[3]))
    return found


@pytest.mark.parametrize("branch", [sample.BASE, *sample.DEMO_BRANCHES])
def test_every_archive_is_deterministic_and_matches_its_checksum(demo: Path,
                                                                 branch: str) -> None:
    urls = _urls(demo, branch)
    assert len(urls) == (6 if branch == sample.BASE else 7)
    for path, algorithm, digest in urls:
        archive = show(demo, branch, path)
        assert hashlib.new(algorithm, archive).hexdigest() == digest, path
        assert archive[4:8] == b"\0\0\0\0", f"{path}: gzip's time is set"
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
            members = tar.getmembers()
        prefix = Path(path).name.removesuffix(".tar.gz")
        assert {m.name.split("/")[0] for m in members} == {prefix}
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
            (1_704_067_200, 0, 0, "", "")}
        names = {m.name.removeprefix(prefix + "/") for m in members}
        assert {"dune-project", f"{prefix.rsplit('-', 1)[0]}.opam"} <= names


def test_the_releases_pass_opam_lint(tmp_path: Path) -> None:
    releases = [*sample.BASE_RELEASES, sample.NEW_RELEASE, sample.LINT_ERROR,
                sample.BUILD_FAILURE]
    paths = []
    for release in releases:
        path = tmp_path / release.opam_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(release.files()[release.opam_path])
        paths.append(str(path))
    linted = subprocess.run(["opam", "lint", *paths], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout.count("Passed.") == len(releases), linted.stdout


def test_an_insignificant_change_changes_only_the_description(tmp_path: Path) -> None:
    repo = sample.make_repository(tmp_path / "r")
    head = sample.add_insignificant_change(repo, "docs")
    diff = git(repo, "diff", "--unified=0", sample.BASE, head)
    changed = [line for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 2 and all(line[1:].startswith("description: ") for line in changed)
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", sample.BASE)


def test_a_conflicting_change_does_not_merge(tmp_path: Path) -> None:
    repo = sample.make_repository(tmp_path / "r")
    base = git(repo, "rev-parse", sample.BASE)
    sample.add_conflicting_change(repo, "conflict")
    assert git(repo, "rev-parse", sample.BASE) == base, "the base is left as it was"
    merged = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "merge",
                             "--no-edit", "conflict"], cwd=repo, capture_output=True, text=True)
    assert merged.returncode != 0
    assert "CONFLICT (content): Merge conflict in packages/hello/hello.1.0/opam" in merged.stdout


def test_commit_files_adds_to_an_existing_branch_and_removes(tmp_path: Path) -> None:
    repo = sample.make_repository(tmp_path / "r")
    first = sample.add_release(repo, "pr", sample.NEW_RELEASE)
    second = sample.commit_files(repo, "pr", {"packages/hello/hello.1.0/opam": None},
                                 "hello.1.0: removed")
    assert git(repo, "rev-parse", "pr~1").strip() == first
    assert git(repo, "diff", "--name-status", sample.BASE, second).split() == [
        "A", "archives/greet-1.1.tar.gz", "A", "packages/greet/greet.1.1/opam",
        "D", "packages/hello/hello.1.0/opam"]


def test_make_repository_refuses_a_directory_with_files(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(FileExistsError, match="is not empty"):
        sample.make_repository(tmp_path)
