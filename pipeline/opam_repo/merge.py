"""A pull request's head merged into its base, without touching the repository they live in.

The merge is made in a scratch clone (`git clone --shared`: the repository's objects are
borrowed, none copied) with `git merge-tree --write-tree`, which merges two commits into a tree
without a work tree or an index. Only the objects of the merged tree land in the scratch clone,
which is removed afterwards, so the repository is never modified.

`open_merge` yields the merge as a `MergedTree`, whose files are read from git without checking
out anything (the analysis reads a few opam files of a 35,000-file repository);
`merged_checkout` yields a directory holding the merged files (the build context).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

GIT_TIMEOUT = 300
"""Seconds any one git command may take (a clone of a large repository's refs included)."""


class GitError(Exception):
    """Trouble with the repository itself: a commit that is not there, git failing."""


class MergeConflict(Exception):
    """The head does not merge cleanly into the base; the message is the one opam-repo-ci
    gives: "Cannot merge to BASE_NAME - please rebase!"."""

    def __init__(self, base_name: str) -> None:
        super().__init__(f"Cannot merge to {base_name} - please rebase!")


def _git(git_dir: Path, *args: str, stdin: bytes | None = None,
         ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
    """Run git on `git_dir`; raises GitError unless its exit status is in `ok`."""
    done = subprocess.run(["git", "--git-dir", str(git_dir), *args], input=stdin,
                          capture_output=True, timeout=GIT_TIMEOUT, check=False)
    if done.returncode not in ok:
        raise GitError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
    return done


class MergedTree:
    """The head merged into the base: `base` (a commit) and `tree` (the merged tree's id) in the
    scratch clone `git_dir`, whose objects include both."""

    def __init__(self, git_dir: Path, base: str, tree: str) -> None:
        self.git_dir = git_dir
        self.base = base
        self.tree = tree

    def changed_paths(self) -> list[str]:
        """The paths that differ between the base and the merged tree (`git diff --name-only`,
        a rename being a deletion and an addition), sorted."""
        out = _git(self.git_dir, "diff-tree", "-r", "-z", "--name-only", "--no-renames",
                   self.base, self.tree).stdout
        return sorted(path.decode() for path in out.split(b"\0") if path)

    def read(self, revision: str, paths: Iterable[str]) -> dict[str, bytes | None]:
        """The contents of the files `paths` at `revision` (`self.base` or `self.tree`), None
        for those missing, read by one `git cat-file --batch`."""
        paths = list(paths)
        if not paths:
            return {}
        if any("\n" in path for path in paths):
            raise ValueError("a path with a newline cannot be read through cat-file --batch")
        requests = "".join(f"{revision}:{path}\n" for path in paths).encode()
        out = _git(self.git_dir, "cat-file", "--batch", stdin=requests).stdout
        contents: dict[str, bytes | None] = {}
        position = 0
        for path in paths:
            end = out.index(b"\n", position)
            header = out[position:end].split()
            position = end + 1
            if len(header) != 3:  # "NAME missing": no such file
                contents[path] = None
                continue
            size = int(header[2])
            # A directory or a submodule at that path is no file either.
            contents[path] = out[position:position + size] if header[1] == b"blob" else None
            position += size + 1  # the content and the newline after it
        return contents

    def entries(self, revision: str, directories: Iterable[str]) -> dict[str, list[str]]:
        """The entries of each of `directories` at `revision` (names, a subdirectory's
        followed by "/"), by one `git ls-tree`; a missing directory has none."""
        directories = list(directories)
        found: dict[str, list[str]] = {directory: [] for directory in directories}
        if not directories:
            return found
        out = _git(self.git_dir, "ls-tree", "-z", revision, "--",
                   *(f"{directory}/" for directory in directories)).stdout
        for record in out.split(b"\0"):
            if not record:
                continue
            meta, path = record.decode().split("\t", 1)
            directory, name = path.rsplit("/", 1) if "/" in path else ("", path)
            if directory in found:
                found[directory].append(name + "/" if meta.split()[1] == "tree" else name)
        return found

    def archive(self, into: Path) -> None:
        """Write the merged tree's files into the directory `into`."""
        with subprocess.Popen(["git", "--git-dir", str(self.git_dir), "archive",
                               "--format=tar", self.tree], stdout=subprocess.PIPE) as archive:
            extracted = subprocess.run(["tar", "-x", "-C", str(into), "-f", "-"],
                                       stdin=archive.stdout, capture_output=True,
                                       timeout=GIT_TIMEOUT, check=False)
        if archive.returncode != 0 or extracted.returncode != 0:
            raise GitError(f"git archive {self.tree}: "
                           f"{extracted.stderr.decode(errors='replace').strip()}")


@contextmanager
def open_merge(repo: str | Path, base: str, head: str, *,
               base_name: str) -> Iterator[MergedTree]:
    """Merge the commit `head` into the commit `base` (both in the git repository `repo`, bare
    or not, which is left as it was) and yield the result; the scratch clone is removed on
    leaving. Raises `MergeConflict` naming `base_name` when they do not merge cleanly, and
    `GitError` when `repo` is not a repository or lacks either commit."""
    with tempfile.TemporaryDirectory(prefix="opam-repo-merge-") as scratch:
        git_dir = Path(scratch) / "scratch.git"
        done = subprocess.run(["git", "clone", "--quiet", "--bare", "--shared", "--no-tags",
                               str(repo), str(git_dir)], capture_output=True,
                              timeout=GIT_TIMEOUT, check=False)
        if done.returncode != 0:
            raise GitError(f"git clone {repo}: {done.stderr.decode(errors='replace').strip()}")
        for commit in (base, head):
            _git(git_dir, "rev-parse", "--quiet", "--verify", f"{commit}^{{commit}}")
        # Exit status 1 is a conflict; anything else but 0 is git's own trouble.
        merged = _git(git_dir, "merge-tree", "--write-tree", "--no-messages", base, head,
                      ok=(0, 1))
        if merged.returncode == 1:
            raise MergeConflict(base_name)
        yield MergedTree(git_dir, base, merged.stdout.split(b"\n", 1)[0].decode())


@contextmanager
def merged_checkout(repo: str | Path, base: str, head: str, *, base_name: str) -> Iterator[Path]:
    """A temporary directory holding the files of `head` merged into `base` (no `.git`),
    removed on leaving; raises as `open_merge` does."""
    with open_merge(repo, base, head, base_name=base_name) as merged, \
            tempfile.TemporaryDirectory(prefix="opam-repo-checkout-") as checkout:
        merged.archive(Path(checkout))
        yield Path(checkout)
