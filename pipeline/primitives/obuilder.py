"""Builds as cached primitives: `build(spec, context=commit)` runs the builder (`pipeline.obuilder`)
in-process, as a job of the engine.

A build is keyed on the spec's canonical text, the commit's hash, the store and the fetcher, so
that a reformatted spec or the same commit on another branch reuses the outcome. All builds on one
store (with one fetcher) in one event loop share one `Builder`: steps that several builds need at
the same time run once, with one live log, and every finished step is in one step cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pipeline as p
from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.platforms import parse_platform
from pipeline.obuilder.setup import open_builder, open_sandbox, sandbox_dir
from pipeline.obuilder.stores import DIRECTORY_KINDS
from pipeline.primitives import git
from pipeline.primitives.git import Commit

OP_ID = "obuilder-build"


@dataclasses.dataclass(frozen=True)
class BuildKey:
    """What one build job builds.

    `spec` is the canonical text of the spec, or the text as written when it does not parse
    (the job then fails with the spec error); `commit` the context (None: an empty directory);
    `store` is `KIND:PATH` and `fetcher` a fetcher name (`local:DIR`, `registry`, ...) or None for
    the default; `platform` is `linux/ARCH` (None: the host's). `secrets` are handed to the
    build but are part of neither the key's digest nor its equality, so that their values are
    never stored.
    """

    spec: str
    commit: Commit | None
    store: str
    fetcher: str | None
    secrets: tuple[tuple[str, bytes], ...] = dataclasses.field(
        default=(), compare=False, repr=False)
    platform: str | None = None


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How one application of the build runs, not what it builds (so not part of the key): the
    pool it waits for a slot in and its risk level."""

    pool: p.Pool | None = None
    level: p.Level = p.Level.AVERAGE


def _key_digest(key: BuildKey, _config: BuildConfig) -> str:
    # Not the config: a build's outcome is found whichever pool or level asks for it again.
    # The commit's hash, not its repository or ref: the same commit seen on two branches (or in
    # two clones) is one build.
    commit_hash = key.commit.hash if key.commit is not None else None
    return p.digest((key.spec, commit_hash, key.store, key.fetcher, key.platform))


def _pp(key: BuildKey) -> str:
    where = f"{key.commit.ref} at {key.commit.short}" if key.commit is not None else "no context"
    platform = f" for {key.platform}" if key.platform is not None else ""
    return f"{where} on {key.store}{platform}"


def canonical_spec(text: str) -> str:
    """The canonical text of the spec `text`, or `text` itself if it does not parse."""
    try:
        return S.to_sexp(S.parse(text))
    except S.SpecError:
        return text


# One Builder per (store, fetcher, platform) per event loop: builds of one Builder share a
# running step's live log; other builders (and processes) wait for the step's lock and then
# replay its log.
# A Builder is never closed by hand: its store lets go of its locks and mounts at exit.
_builders: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str | None, str | None], asyncio.Task[Builder]]
] = weakref.WeakKeyDictionary()


def resolve_store(store: str, state_dir: Path) -> str:
    """`store` (`KIND:PATH`) as the build primitive opens it: a relative directory is under
    `state_dir`, made absolute (a docker store's PATH is a prefix, not a directory); a malformed
    `store` is returned as it is, for `open_store` to refuse with its message."""
    kind, sep, path = store.partition(":")
    if kind not in DIRECTORY_KINDS or not sep or not path or Path(path).is_absolute():
        return store
    return f"{kind}:{Path(state_dir).absolute() / path}"


STORES_FILE = "obuilder-stores.json"
"""Under the state directory: the roots of the stores its builds used, for `clean_stores`."""


def _remember_store(state_dir: Path, root: Path) -> None:
    path = state_dir / STORES_FILE
    roots = json.loads(path.read_text()) if path.exists() else []
    if str(root) not in roots:
        # Replaced whole: a crash leaves the old list or the new one, never half of one.
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps([*roots, str(root)]))
        partial.replace(path)


async def clean_stores(state_dir: Path) -> None:
    """Kill and delete the containers that killed processes left in the stores the builds of
    `state_dir` used: a step of a killed build would otherwise run on until its command ends,
    even if nothing builds again. Run by every engine as it starts (`pipeline.on_start`)."""
    path = state_dir / STORES_FILE
    if not await asyncio.to_thread(path.exists):
        return
    for root in json.loads(await asyncio.to_thread(path.read_text)):
        if not await asyncio.to_thread(sandbox_dir(Path(root)).exists):
            continue  # a store deleted since, or one that never ran a step
        sandbox = open_sandbox(Path(root))
        try:
            await sandbox.clean()
        finally:
            sandbox.close()


p.on_start(clean_stores)


async def _open(store: str, create: Path | None, fetcher: str | None, platform: str | None,
                state_dir: Path) -> Builder:
    if create is not None:
        await asyncio.to_thread(create.mkdir, parents=True, exist_ok=True)
    builder = await open_builder(store, fetcher=fetcher, platform=platform)
    try:
        # Before any step runs in it, so that a restart after a crash knows where to clean.
        await asyncio.to_thread(_remember_store, state_dir, builder.store.root.absolute())
    except BaseException:
        builder.close()
        raise
    return builder


async def shared_builder(store: str, fetcher: str | None, state_dir: Path, *,
                         platform: str | None = None) -> Builder:
    """The Builder of this event loop for `store` (a relative PATH is under `state_dir`,
    created if missing), `fetcher` and `platform` (`linux/ARCH`; None: the host's), opened on
    first use.

    Raises what `open_builder` raises (a bad store or fetcher, no runc, not root); a failed
    opening is forgotten, so that the next build tries again.
    """
    loop = asyncio.get_running_loop()
    resolved = resolve_store(store, state_dir)
    # A store under the state directory is ours to create; an absolute one must exist.
    create = Path(resolved.partition(":")[2]) if resolved != store else None
    builders = _builders.setdefault(loop, {})
    memo = (resolved, fetcher, platform)
    task = builders.get(memo)
    if task is None:
        task = loop.create_task(_open(resolved, create, fetcher, platform, state_dir),
                                name=f"open store {resolved}")
        builders[memo] = task

        def forget_failure(done: asyncio.Task[Builder]) -> None:
            if (done.cancelled() or done.exception() is not None) and builders.get(memo) is done:
                del builders[memo]

        task.add_done_callback(forget_failure)
    # Shielded: a cancelled build must not cancel the opening that other builds wait for.
    return await asyncio.shield(task)


@contextlib.asynccontextmanager
async def _context_dir(commit: Commit | None) -> AsyncIterator[Path]:
    """A clean checkout of `commit`, or an empty directory without one."""
    if commit is not None:
        async with git.checkout(commit) as path:
            yield Path(path)
        return
    empty = await asyncio.to_thread(tempfile.mkdtemp, prefix="pipeline-build-")
    try:
        yield Path(empty)
    finally:
        await asyncio.to_thread(os.rmdir, empty)


async def build_in_job(job: p.Job, spec: str, commit: Commit | None, *, store: str,
                       fetcher: str | None, log: Callable[[bytes], None] | None = None,
                       secrets: Mapping[str, bytes] | None = None,
                       platform: str | None = None) -> str:
    """Build the spec `spec` (its text) with a clean checkout of `commit` as the context (None:
    an empty directory), inside the running `job`, on the shared builder of `store` (see
    `shared_builder`), `fetcher` and `platform`; return the result id.

    Each step's output goes to `log` (default: the job's log). Raises (failing the job) the
    spec error, located by line and column, if the spec does not parse; the builder's error
    naming the step if a step fails; git's error if the commit cannot be checked out.
    Cancelling the job cancels the build: the running step's sandbox is killed unless another
    build waits for that step.
    """
    async with _context_dir(commit) as context:
        return await build_in_dir(job, spec, context, store=store, fetcher=fetcher, log=log,
                                  secrets=secrets, platform=platform)


async def build_in_dir(job: p.Job, spec: str, context: Path, *, store: str,
                       fetcher: str | None, log: Callable[[bytes], None] | None = None,
                       secrets: Mapping[str, bytes] | None = None,
                       platform: str | None = None) -> str:
    """Build the spec `spec` (its text) with the directory `context` as its context, as
    `build_in_job` does with a checkout."""
    parsed = S.parse(spec, filename="spec")
    builder = await shared_builder(store, fetcher, job.state_dir, platform=platform)
    job.log(f"Building in {context}")
    return await builder.build(parsed, context, log=log or job.write, secrets=secrets or {})


@p.builder(OP_ID, auto_cancel=True, config=BuildConfig, starts_job=True, pp=_pp,
           key_digest=_key_digest)
async def _build(job: p.Job, key: BuildKey, config: BuildConfig) -> str:
    """Build `key`, in `config`'s pool at its level, and return the result id; fails as
    `build_in_job` describes."""
    await job.start(pool=config.pool, level=config.level)
    return await build_in_job(job, key.spec, key.commit, store=key.store, fetcher=key.fetcher,
                              secrets=dict(key.secrets), platform=key.platform)


def build(
    spec: p.Term[str] | str,
    *,
    context: p.Term[Commit] | None = None,
    store: str = "rsync:store",
    fetcher: str | None = None,
    image_dir: str | None = None,
    pool: p.Pool | None = None,
    label: str = "build",
    secrets: Mapping[str, bytes] | None = None,
    level: p.Level = p.Level.AVERAGE,
    platform: str | None = None,
) -> p.Term[str]:
    """The result id of building `spec` (its text) with the commit `context` as the source of
    `copy` steps (a local commit, e.g. from `git.local_heads` or `git.fetch`; None: an empty
    directory).

    - `store`: `KIND:PATH` (`btrfs`, `overlayfs`, `xfs` or `rsync`); a relative PATH is under
      the engine's state directory and is created if missing (an absolute one must exist).
    - `fetcher`: `registry`, `debootstrap` or `local:DIR`; `image_dir`: short for `local:DIR`
      (not both); neither: debootstrap for Debian, a registry for the rest.
    - `platform`: `linux/ARCH` (or any name `obuilder.platforms.parse_platform` takes) the
      build is for; another architecture than the host's runs under emulation. None: the host's.
    - `pool`, `level`: the job's pool and risk level; `label`: the node's name in the diagram;
      `secrets`: values of the spec's secrets by id (not part of the key: a new value alone does
      not rebuild).

    The job streams each step's output into its log and fails as `_build` describes; a new spec
    or commit cancels the running build of the old one (auto-cancel). Raises ValueError for
    both `fetcher` and `image_dir`, and BuildError for an unknown platform.
    """
    if fetcher is not None and image_dir is not None:
        raise ValueError("give fetcher or image_dir, not both")
    if platform is not None:
        platform = parse_platform(platform)
    if image_dir is not None:
        fetcher = f"local:{Path(image_dir).absolute()}"
    secret_items = tuple(sorted((secrets or {}).items()))
    spec_term = p.as_term(spec).map(canonical_spec, label="canonical spec")
    context_term: p.Term[Commit | None] = context if context is not None else p.const(None)

    def key(pair: tuple[str, Commit | None]) -> BuildKey:
        return BuildKey(pair[0], pair[1], store, fetcher, secret_items, platform)

    return _build(p.pair(spec_term, context_term).map(key, label="build key"),
                  config=BuildConfig(pool, level), label=label)
