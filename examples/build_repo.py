"""Build every branch of a repository: the `build.spec` at its root, with the commit as context.

    pipeline run examples/build_repo.py -- --repo PATH [--store KIND:PATH] [--image-dir DIR]
                                           [--fetcher FETCHER]

Each branch gets its own sub-pipeline (read its `build.spec`, then build it), kept while the
branch exists: a new branch gets a build; a deleted branch's sub-pipeline is torn down and its
running build cancelled; a new commit on a branch cancels that branch's stale build and starts
the new one. All builds share one store, so branches with the same first steps build them once.
With `--once`, the exit status is 0 when every branch built and 1 when one failed.
"""

import argparse

import pipeline as p
from pipeline.primitives import git
from pipeline.primitives.git import Commit
from pipeline.primitives.obuilder import build

SPEC_FILE = "build.spec"


@p.builder("read-spec", auto_cancel=True, pp=lambda commit: f"{commit.ref} at {commit.short}")
async def read_spec(job: p.Job, commit: Commit) -> str:
    """The text of the commit's `build.spec`; fails if the commit has none or it is not UTF-8."""
    job.log(f"Reading {SPEC_FILE}")
    return (await git.read_file(commit, SPEC_FILE)).decode()


def pipeline(args: list[str]) -> p.Term[list[str]]:
    """A build per branch of `--repo`."""
    parser = argparse.ArgumentParser(prog="build_repo.py")
    parser.add_argument("--repo", required=True, help="the local repository to watch")
    parser.add_argument("--store", default="rsync:store", metavar="KIND:PATH",
                        help="the builder's store (default: rsync:store, in the state directory)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--image-dir", metavar="DIR", help="base images as DIR/NAME.tar")
    which.add_argument("--fetcher", help="registry, debootstrap or local:DIR")
    options = parser.parse_args(args)

    def branch(commit: p.Term[Commit]) -> p.Term[str]:
        return build(read_spec(commit), context=commit, store=options.store,
                     fetcher=options.fetcher, image_dir=options.image_dir)

    return p.list_map(branch, git.local_heads(options.repo), key=lambda commit: commit.ref,
                      label="branches")
