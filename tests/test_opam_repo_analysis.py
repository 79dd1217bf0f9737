"""The analysis of pull requests to an opam repository, on real git repositories: the merge
(and its conflict), the layout, each kind of change, the lint, the JSON, and the repository
left as it was."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.opam_repo.analysis import analyse
from pipeline.opam_repo.merge import GitError, MergeConflict, merged_checkout
from pipeline.opam_repo.model import LintMessage, PackageChange

OPAM = '''opam-version: "2.0"
synopsis: "The {name} library"
maintainer: "Alice <alice@example.com>"
authors: "Alice"
license: "MIT"
homepage: "https://example.com/{name}"
bug-reports: "https://example.com/{name}/issues"
dev-repo: "git+https://example.com/{name}.git"
depends: [{depends}]
build: ["dune" "build" "-p" name "-j" jobs]
'''


def opam(name: str, depends: str = '"ocaml" "dune"') -> str:
    """A package's opam file that passes every lint rule."""
    return OPAM.format(name=name, depends=depends)


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`; its output, stripped."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def commit(repo: Path, files: dict[str, str | None], message: str = "change") -> str:
    """Write (or, for None, delete) `files` in `repo` and commit them; the commit's hash."""
    for path, text in files.items():
        if text is None:
            (repo / path).unlink()
        else:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text(text)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An opam repository on branch master: foo 1.0, bar 1.0 (depends on foo), baz 1.0."""
    path = tmp_path / "opam-repository"
    path.mkdir()
    git(path, "init", "-q", "-b", "master")
    commit(path, {
        "repo": 'opam-version: "2.0"\n', "README.md": "An opam repository\n",
        "packages/foo/foo.1.0/opam": opam("foo"),
        "packages/bar/bar.1.0/opam": opam("bar", '"ocaml" "dune" "foo"'),
        "packages/baz/baz.1.0/opam": opam("baz"),
        "packages/baz/baz.1.0/files/fix.patch": "--- a\n+++ b\n"})
    return path


def branch(repo: Path, name: str, files: dict[str, str | None]) -> tuple[str, str]:
    """A pull request: the branch `name` off master with `files` changed; (base, head)."""
    base = git(repo, "rev-parse", "master")
    git(repo, "checkout", "-q", "-b", name, "master")
    head = commit(repo, files)
    git(repo, "checkout", "-q", "master")
    return base, head


def state(repo: Path) -> tuple[str, str, str, str]:
    """Everything the analysis must leave alone: refs, objects, index and work tree."""
    objects = subprocess.run(f"find {repo}/.git/objects -type f | sort", shell=True,
                             capture_output=True, text=True, check=True).stdout
    return (git(repo, "show-ref"), objects, git(repo, "status", "--porcelain"),
            (repo / ".git" / "index").read_bytes().hex())


def test_each_kind_of_change_is_classified_and_the_repository_is_untouched(
        repo: Path) -> None:
    base, head = branch(repo, "many", {
        "packages/foo/foo.2.0/opam": opam("foo", '"ocaml" "dune" "alcotest" {with-test}'),
        "packages/qux/qux.1.0/opam": opam("qux"),
        "packages/bar/bar.1.0/opam": None,
        "packages/baz/baz.1.0/opam": opam("baz") + "available: false\n",
        "packages/foo/foo.1.0/opam": opam("foo").replace("The foo library", "Foo, better"),
        "packages/baz/baz.1.0/files/fix.patch": "--- a\n+++ b\n@@\n",
        "README.md": "changed, and ignored\n"})
    before = state(repo)
    result = analyse(repo, base, head, pr="many", base_name="master")
    assert state(repo) == before
    assert result.error is None
    assert result.packages == (
        PackageChange("bar.1.0", "deleted"),
        PackageChange("baz.1.0", "unavailable"),
        PackageChange("foo.1.0", "insignificant"),
        PackageChange("foo.2.0", "new-release", has_tests=True),
        PackageChange("qux.1.0", "new-package"))
    assert result.lint == ()
    assert result.to_json() == {
        "pr": "many", "head": head,
        "packages": [{"package": "bar.1.0", "kind": "deleted"},
                     {"package": "baz.1.0", "kind": "unavailable"},
                     {"package": "foo.1.0", "kind": "insignificant"},
                     {"package": "foo.2.0", "kind": "new-release"},
                     {"package": "qux.1.0", "kind": "new-package"}],
        "lint": [], "error": None}


def test_a_significant_change_and_a_patch_in_files(repo: Path) -> None:
    base, head = branch(repo, "fix", {
        "packages/foo/foo.1.0/opam": opam("foo", '"ocaml" {>= "4.14"} "dune"'),
        "packages/baz/baz.1.0/files/fix.patch": "--- a\n+++ b\n@@ changed\n"})
    result = analyse(repo, base, head, pr="fix", base_name="master")
    assert [(c.package, c.kind) for c in result.packages] == [
        ("baz.1.0", "significant"), ("foo.1.0", "significant")]
    assert [c.package for c in result.to_build] == ["baz.1.0", "foo.1.0"]


def test_a_conflict_is_the_rebase_error_and_leaves_the_repository_alone(repo: Path) -> None:
    base, head = branch(repo, "conflicting", {"packages/foo/foo.1.0/opam": opam("foo") + "#a\n"})
    git(repo, "checkout", "-q", "master")
    base = commit(repo, {"packages/foo/foo.1.0/opam": opam("foo") + "#b\n"})
    before = state(repo)
    result = analyse(repo, base, head, pr="conflicting", base_name="master")
    assert state(repo) == before
    assert result.to_json() == {"pr": "conflicting", "head": head, "packages": [], "lint": [],
                                "error": "Cannot merge to master - please rebase!"}
    with pytest.raises(MergeConflict, match=r"^Cannot merge to main - please rebase!$"), \
            merged_checkout(repo, base, head, base_name="main"):
        pass


def test_a_path_outside_the_layout_is_the_error(repo: Path) -> None:
    base, head = branch(repo, "stray", {"packages/foo/foo.1.0/opam": opam("foo") + "tags: []\n",
                                        "packages/foo/notes.txt": "x\n"})
    result = analyse(repo, base, head, pr="stray", base_name="master")
    assert result.packages == () and result.lint == ()
    assert result.error == (
        "packages/foo/notes.txt: not in the repository's layout (expected "
        "packages/NAME/NAME.VERSION/opam or packages/NAME/NAME.VERSION/files/...)")


def test_lint_messages_of_new_and_unavailable_versions_but_not_of_others(repo: Path) -> None:
    bad = opam("Foo_", '"ocaml" "dune" {build}').replace('authors: "Alice"\n', "")
    base, head = branch(repo, "lint", {
        "packages/Foo_/Foo_.1.0/opam": bad,
        "packages/baz/baz.1.0/opam": opam("baz") + 'available: false\n'
                                     f'extra-files: [["a.patch" "md5={"0" * 32}"]]\n',
        # Insignificant and deleted versions are not linted, however bad they are.
        "packages/foo/foo.1.0/opam": bad,
        "packages/bar/bar.1.0/opam": None})
    git(repo, "checkout", "-q", "master")
    commit(repo, {"packages/foo/foo.1.0/opam": bad})
    base = git(repo, "rev-parse", "master")
    result = analyse(repo, base, head, pr="lint", base_name="master")
    assert result.error is None
    assert [(c.package, c.kind) for c in result.packages] == [
        ("Foo_.1.0", "new-package"), ("bar.1.0", "deleted"), ("baz.1.0", "unavailable")]
    new, unavailable = "packages/Foo_/Foo_.1.0/opam", "packages/baz/baz.1.0/opam"
    assert result.lint == (
        LintMessage(new, "dune-not-build", "dune must not be marked {build}"),
        LintMessage(new, "name-collision", "the new package name 'Foo_' is too close to the "
                    "existing 'foo' (names are compared ignoring case, '-' and '_')"),
        LintMessage(unavailable, "no-extra-files",
                    "extra-files is not allowed in the repository: use extra-source sections"),
        LintMessage(new, "opam-lint-25", "warning 25: Missing field 'authors'"),
        LintMessage(unavailable, "opam-lint-53",
                    "error 53: Mismatching 'extra-files:' field: \"a.patch\""))
    assert not result.passed
    assert analyse(repo, base, head, pr="lint", base_name="master", lint=False).lint == ()


def test_a_syntax_error_is_a_lint_message_naming_the_line(repo: Path) -> None:
    base, head = branch(repo, "syntax", {"packages/foo/foo.2.0/opam": 'opam-version: "2.0"\n'
                                                                       "depends: [\n"})
    result = analyse(repo, base, head, pr="syntax", base_name="master")
    assert [(c.package, c.kind) for c in result.packages] == [("foo.2.0", "new-release")]
    assert [(m.rule, m.message) for m in result.lint] == [
        ("opam-syntax", "packages/foo/foo.2.0/opam:3: expected `]` to close the `[` of line 2; "
                        "got the end of the file"),
        ("opam-lint-02", "error 2: File format error at line 3, column 0: Parse error")]


def test_a_stray_file_already_in_a_versions_directory_is_linted(repo: Path) -> None:
    git(repo, "checkout", "-q", "master")
    commit(repo, {"packages/baz/baz.1.0/README": "stray\n"})
    base, head = branch(repo, "baz", {"packages/baz/baz.1.0/opam": opam("baz", '"ocaml"')})
    result = analyse(repo, base, head, pr="baz", base_name="master")
    assert [(m.rule, m.message) for m in result.lint] == [
        ("directory-contents", "unexpected 'README' in packages/baz/baz.1.0: a version's "
                               "directory holds only `opam` and `files/`")]


def test_the_merged_checkout_holds_the_merged_files_only(repo: Path) -> None:
    base, head = branch(repo, "new", {"packages/foo/foo.2.0/opam": opam("foo")})
    git(repo, "checkout", "-q", "master")
    base = commit(repo, {"README.md": "moved on\n"})
    with merged_checkout(repo, base, head, base_name="master") as checkout:
        kept = checkout
        assert (checkout / "README.md").read_text() == "moved on\n"
        assert (checkout / "packages/foo/foo.2.0/opam").read_text() == opam("foo")
        assert (checkout / "packages/baz/baz.1.0/files/fix.patch").is_file()
        assert not (checkout / ".git").exists()
    assert not kept.exists()


def test_a_bare_repository_works_and_a_missing_commit_is_a_git_error(
        repo: Path, tmp_path: Path) -> None:
    base, head = branch(repo, "new", {"packages/foo/foo.2.0/opam": opam("foo")})
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    result = analyse(bare, base, head, pr="new", base_name="master")
    assert [(c.package, c.kind) for c in result.packages] == [("foo.2.0", "new-release")]
    with pytest.raises(GitError, match="rev-parse"):
        analyse(bare, base, "0" * 40, pr="new", base_name="master")
