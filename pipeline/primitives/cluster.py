"""Builds on a build cluster as cached primitives: `build(spec, source=..., pool=...,
cluster=ADDRESS)` sends the spec to the cluster's scheduler (`pipeline.cluster.client`) and
follows it as a job of the engine.

The job is made when the build is wanted and waits, queued, until a worker of the pool starts the
build; only then does it start (so the job page shows both the queued and the run time), saying
which worker runs it. The worker's step log is written to the job's log live, in order.
Cancelling the job cancels the build, which kills its sandbox on the worker. The job's value is
the result id (in the worker's store).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections.abc import Callable

import pipeline as p
from pipeline.cluster.client import ClusterClient, new_request
from pipeline.cluster.protocol import Source
from pipeline.jobs import JobState
from pipeline.primitives.git import Commit
from pipeline.primitives.obuilder import canonical_spec

OP_ID = "cluster-build"


@dataclasses.dataclass(frozen=True)
class ClusterKey:
    """What one cluster build builds: the spec's canonical text, its source (None: an empty
    context) and the pool of workers that can build it."""

    spec: str
    source: Source | None
    pool: str


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How one application of the build is placed, not what it builds (so not part of the
    key): the scheduler's address, the cache hint that groups builds sharing steps, and whether
    it goes before the pool's other builds."""

    cluster: str
    cache_hint: str | None = None
    urgent: bool = False


def _key_digest(key: ClusterKey, _config: ClusterConfig) -> str:
    # The commits' hashes, not the repository's URL: the same commits fetched from two clones
    # are one build. Not the config: the same build found again whatever hint or urgency.
    commits = key.source.commits if key.source is not None else None
    return p.digest((key.spec, commits, key.pool))


def _pp(key: ClusterKey) -> str:
    where = (f"{key.source.url} at {', '.join(c[:7] for c in key.source.commits)}"
             if key.source is not None else "no context")
    return f"{where} on pool {key.pool}"


def as_source(source: Source | Commit | None) -> Source | None:
    """A build's source: a `git.Commit` is its repository and hash."""
    if isinstance(source, Commit):
        return Source(source.repo, (source.hash,))
    return source


# One client per scheduler per event loop: its builds share one Dask connection and one
# subscription to the events topic.
_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, asyncio.Task[ClusterClient]]
] = weakref.WeakKeyDictionary()


async def shared_client(address: str) -> ClusterClient:
    """The client of this event loop for the scheduler at `address`, connected on first use (a
    failed connection is forgotten, so that the next build tries again)."""
    loop = asyncio.get_running_loop()
    clients = _clients.setdefault(loop, {})
    task = clients.get(address)
    if task is None:
        task = loop.create_task(ClusterClient.connect(address), name=f"connect to {address}")
        clients[address] = task

        def forget_failure(done: asyncio.Task[ClusterClient]) -> None:
            if (done.cancelled() or done.exception() is not None) \
                    and clients.get(address) is done:
                del clients[address]

        task.add_done_callback(forget_failure)
    # Shielded: a cancelled build must not cancel the connection other builds wait for.
    return await asyncio.shield(task)


async def close_clients() -> None:
    """Close this event loop's clients (e.g. as an engine's loop ends)."""
    for task in _clients.pop(asyncio.get_running_loop(), {}).values():
        with contextlib.suppress(Exception):
            await (await task).close()


async def build_on_cluster(job: p.Job, spec: str, source: Source | None, *, pool: str,
                           cluster: str, cache_hint: str | None = None, urgent: bool = False,
                           log: Callable[[bytes], None] | None = None) -> str:
    """Build `spec` (its text) from `source` on a worker of `pool` of the cluster whose
    scheduler is at `cluster`, for `job`; return the result id.

    A job not started yet waits, queued, until a worker starts the build, then starts (in no
    pool of the engine's: the cluster's pool is the limit). The worker's step log goes to `log`
    (default: the job's log) in order. Raises the worker's error (the builder's `BuildError`
    naming the failing step, ...), `WorkerLost` if the worker died during the build.
    Cancelling the job cancels the build on its worker.
    """
    client = await shared_client(cluster)
    request = new_request(spec, source=source, pool=pool, cache_hint=cache_hint, urgent=urgent,
                          client=client.name)
    write = log or job.write
    job.log(f"Waiting for a worker of pool {pool}")
    async with client.submit(request) as build:
        async for event in build:
            if event.kind == "started":
                if job.state is JobState.CREATED:
                    await job.start(pool=None)
                job.log(f"Running on worker {event.worker}")
            else:
                write(event.data)
        return await build.result()


@p.builder(OP_ID, auto_cancel=True, config=ClusterConfig, starts_job=True, pp=_pp,
           key_digest=_key_digest)
async def _build(job: p.Job, key: ClusterKey, config: ClusterConfig) -> str:
    """Build `key` on the cluster `config` names; fails as `build_on_cluster` describes."""
    return await build_on_cluster(job, key.spec, key.source, pool=key.pool,
                                  cluster=config.cluster, cache_hint=config.cache_hint,
                                  urgent=config.urgent)


def build(
    spec: p.Term[str] | str,
    *,
    source: p.Term[Source] | p.Term[Commit] | Source | Commit | None = None,
    pool: str,
    cluster: str,
    cache_hint: str | None = None,
    urgent: bool = False,
    label: str = "build",
) -> p.Term[str]:
    """The result id of building `spec` (its text) on a worker of `pool` of the cluster whose
    scheduler is at `cluster` (`tcp://HOST:PORT`).

    - `source`: what `copy` steps see: a `protocol.Source` (a repository URL and the commits
      the worker fetches and merges) or a `git.Commit`; None: an empty directory;
    - `cache_hint`: builds with the same hint share steps, so the scheduler prefers a worker
      that built that hint before; `urgent`: before the pool's other builds;
    - `label`: the node's name in the diagram.

    The job waits queued for a worker, streams the worker's step log and fails as
    `build_on_cluster` describes; a new spec or source cancels the running build of the old one
    (auto-cancel).
    """
    spec_term = p.as_term(spec).map(canonical_spec, label="canonical spec")
    source_term: p.Term[Source | Commit | None] = (
        source if isinstance(source, p.Term) else p.const(source, label="source"))

    def key(pair: tuple[str, Source | Commit | None]) -> ClusterKey:
        return ClusterKey(pair[0], as_source(pair[1]), pool)

    return _build(p.pair(spec_term, source_term).map(key, label="build key"),
                  config=ClusterConfig(cluster, cache_hint, urgent), label=label)
