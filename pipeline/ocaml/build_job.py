"""Running a CI job's build spec, for the OCaml CI and opam-repo-ci pipelines alike.

`run_spec` is what a job does with its spec: first the "To reproduce locally" block in its log,
then the build, in this process on a store or on a build cluster (`Place`), its step log in the
job's log; a failed step fails the job with the step's command and first error line
(`failures.step_reason`) rather than only its exit status.

A build's source is a commit (`git.Commit`), or a pull request's head merged into its base
(`Merge`): in this process the merge is made in a scratch directory
(`pipeline.opam_repo.merge.merged_checkout`); on a cluster the worker fetches both commits and
merges them itself, as OCluster does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pipeline as p
from pipeline.cluster.protocol import Source
from pipeline.obuilder.platforms import architecture
from pipeline.obuilder.protocols import BuildError, StoreFull
from pipeline.ocaml import failures as F
from pipeline.ocaml import platforms as P
from pipeline.opam_repo.merge import merged_checkout
from pipeline.primitives.cluster import as_source, build_on_cluster
from pipeline.primitives.git import Commit
from pipeline.primitives.obuilder import build_in_dir, build_in_job, resolve_store


@dataclasses.dataclass(frozen=True)
class Merge:
    """A pull request's `head` merged into `base` (commit hashes of the local repository
    `repo`), the base being the branch `base_name` (named in a conflict's message)."""

    repo: str
    base: str
    head: str
    base_name: str


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a job's builds run and what for: builds for `platform` (`linux/ARCH`, under
    emulation on another architecture than the host's), in this process on `store` with
    `fetcher`, or, with `cluster` (a scheduler's address), on a worker of the platform's pool
    with the cache hint `cache_hint`."""

    store: str
    fetcher: str | None
    cluster: str | None = None
    platform: str = "linux/amd64"
    cache_hint: str | None = None

    @property
    def pool(self) -> str:
        """The cluster's pool of workers building for `platform` (`linux-arm64`)."""
        return architecture(self.platform).pool


async def start(job: p.Job) -> None:
    """Start `job` unless it has started already (a build on a cluster starts it when a worker
    takes the build: see `build_on_cluster`)."""
    if job.state is p.JobState.CREATED:
        await job.start()


@contextlib.asynccontextmanager
async def _merged(merge: Merge) -> AsyncIterator[Path]:
    """A scratch directory holding the files of `merge` (see `merged_checkout`)."""
    checkout = merged_checkout(merge.repo, merge.base, merge.head, base_name=merge.base_name)
    path = await asyncio.to_thread(checkout.__enter__)
    try:
        yield path
    finally:
        await asyncio.to_thread(checkout.__exit__, None, None, None)


async def build(job: p.Job, spec: str, source: Commit | Merge | None, place: Place,
                log: Callable[[bytes], None]) -> str:
    """Build `spec` with `source` as its context, for and at `place`; the step log goes to `log`.
    Raises as `build_in_job` does (a worker's errors are the builder's), `MergeConflict` when a
    merge cannot be made here, or the loss of a cluster's worker."""
    if place.cluster is not None:
        remote = (Source(source.repo, (source.base, source.head)) if isinstance(source, Merge)
                  else as_source(source))
        return await build_on_cluster(job, spec, remote, log=log, pool=place.pool,
                                      cluster=place.cluster, cache_hint=place.cache_hint)
    if isinstance(source, Merge):
        async with _merged(source) as context:
            return await build_in_dir(job, spec, context, store=place.store,
                                      fetcher=place.fetcher, log=log, platform=place.platform)
    return await build_in_job(job, spec, source, store=place.store, fetcher=place.fetcher,
                              log=log, platform=place.platform)


async def run_spec(job: p.Job, spec: str, source: Commit | Merge | None, place: Place,
                   *, notes: Sequence[str] = (),
                   log: Callable[[bytes], None] | None = None) -> str:
    """Run the job's build of `spec` and return the result id: the reproduce block first (the
    store as an absolute path: the reader runs it elsewhere), then the lines `notes`, then the
    build, its step log in the job's log (and passed to `log` too, when given).

    A failed step fails the job with `failures.StepFailed` ("COMMAND: FIRST ERROR LINE") when
    its output has an error line, else with the builder's error; a full store with its own
    message, which says how to free space.
    """
    where = "this pull request merged into its base" if isinstance(source, Merge) \
        else "this commit"
    job.write(P.reproduce_block(spec, store=resolve_store(place.store, job.state_dir),
                                checkout=where, platform=place.platform) + "\n")
    for line in notes:
        job.log(line)

    def forward(data: bytes) -> None:
        job.write(data)
        if log is not None:
            log(data)

    step = F.StepLog(forward)
    try:
        return await build(job, spec, source, place, step.write)
    except StoreFull:
        raise
    except BuildError as error:
        # The failing command and the first error line it printed say more than its status.
        reason = F.step_reason(spec, step.text)
        if reason is None:
            raise
        raise F.StepFailed(reason) from error
