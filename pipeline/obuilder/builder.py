"""The builder: runs a spec step by step, each step's result cached in the store under its id.

A step's id is the SHA-256 of everything that determines its result (see "Step ids" in
`docs/architecture.md`):

- `from`: the image reference and the platform (`linux/ARCH`) the build is for, so that every
  step of an arm64 build differs from the same step of an amd64 one;
- `run`: the parent id, workdir, user, whole environment, shell, command, network and secrets
  (ids and targets; never the values). Caches are not part of it;
- `copy`: the parent id, user, digest of the copy's manifest (files, hashes, symlinks,
  directories and destinations; see `manifest.py`) and, for `(from (build NAME))`, the id of
  that stage's result.

`comment`, `workdir`, `env`, `user` and `shell` only change the context later steps see.

A step whose id is in the store is not run again: its saved log is replayed, and the result is
noted as used (`Store.mark_used`, for pruning) once the build ends, all its cache hits together
in one write. Steps that two
builds need at the same time run once: within a builder, the second build follows the first
one's live log and gets the same result or error; across builders and processes sharing a
store, the second waits for the step's lock (`Store.lock`) and then finds the result (or, if
the first build failed, tries the step itself). Cancelling a build kills the step it is running
unless another build of the same builder still waits for that step.

A `run` step's caches are the store's named caches (`Store.cache`): each step works on its own
copy, taken when the step starts and owned by the step's user if the cache is new. When two
builds use the same cache at once, each starts from the version it saw and the copy released
last replaces the cache (last writer wins); a failed step's changes are discarded. Secrets are
handed to the sandbox as values (`Secret`), never written to a file by the builder: the runc
sandbox copies them to a tmpfs mounted in a private mount namespace that only runc and the
container see, so they leave nothing behind even if the builder is killed (SIGKILL included),
and mounts them read-only (mode 0400, owned by the step's user). They are not part of the step
id, so a build that joins a step already running shares the result made with the first build's
secret values.

A build for another platform than the host's (`Builder.platform`) runs its commands under
emulation: before its first step, the builder checks once that qemu's binfmt_misc handler for
that platform is there (`emulation.find_emulator`; MissingTool otherwise), and gives every `run`
step the mounts the handler needs (its interpreter, unless the handler has the `F` flag).

Before the first step a builder runs, it cleans what crashed processes left (`Builder.clean`):
not when it is made, so that a fully cached build does no start-up work beyond looking its
results up.

A build refuses to start on a full store (see `full_store`), and one that runs out of space (a
write, a store tool, the result table) fails with `StoreFull`: one line naming the store, its free
space and what to run to free some. A step whose command fails while the store is full gets that
line as a hint, the space being measured before the store discards the step.

The output of a build, written to its `log` as it happens, is for each step a header, the
step's output and its outcome, the builder's own lines marked so that no command can forge them:
`log_format` says how.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from pipeline.obuilder import spec as S
from pipeline.obuilder.emulation import BINFMT_DIR, find_emulator
from pipeline.obuilder.full_store import is_disk_full, reporting_full, space_problem
from pipeline.obuilder.log_format import MARK, MARK_SHOWN, outcome
from pipeline.obuilder.manifest import manifest
from pipeline.obuilder.platforms import host_platform, is_emulated, parse_platform
from pipeline.obuilder.protocols import (
    BuildError,
    Fetcher,
    Log,
    Mount,
    Sandbox,
    SandboxConfig,
    Secret,
    Store,
    Workspace,
    Workspaces,
)
from pipeline.obuilder.workspace import HostWorkspaces

_NO_SECRETS: Mapping[str, bytes] = MappingProxyType({})

DIGEST = "digest"
"""The file of a `(from ...)` result holding the image's digest (when the fetcher gives one)."""

Work = Callable[[Path, Log], Awaitable[None]]
"""What a step does to its writable result directory, writing its output to the log."""


def step_id(**fields: Any) -> str:
    """SHA-256 (hex) of `fields` in a canonical JSON form."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def from_id(image: str, platform: str | None = None) -> str:
    """The id of the step `(from image)` built for `platform` (`linux/ARCH` or any form
    `platforms.parse_platform` takes; None: this host's): it depends on the image reference and
    the platform only. Raises BuildError for an unknown platform."""
    return step_id(op="from", image=image, platform=parse_platform(platform or host_platform()))


def base_digest(result: Path) -> str | None:
    """The digest of the image a `(from ...)` result directory was made from, or None if the
    fetcher gave none (or the result predates digests being recorded)."""
    try:
        return (result / DIGEST).read_text()
    except FileNotFoundError:
        return None


class _LiveLog:
    """A step's output so far, repeated to every build following the step."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._sinks: list[Callable[[bytes], None]] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        for sink in self._sinks:
            sink(data)

    def follow(self, sink: Callable[[bytes], None]) -> None:
        """Send everything written so far to `sink`, then each later write."""
        for chunk in self._chunks:
            sink(chunk)
        self._sinks.append(sink)

    def unfollow(self, sink: Callable[[bytes], None]) -> None:
        self._sinks.remove(sink)


class _Tee:
    """The log a running step writes to: its log file in the store and the live log."""

    def __init__(self, file: BinaryIO, live: _LiveLog) -> None:
        self._file = file
        self._live = live

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._live.write(data)


class _BuildLog:
    """The log of one build: its steps' output, and the builder's own lines marked as such."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._at_line_start = True

    def output(self, data: bytes) -> None:
        """Write output of a step (live or replayed from the store), where `MARK` cannot stand:
        a command could otherwise print lines that look like the builder's."""
        if data:
            self._sink(data.replace(MARK, MARK_SHOWN))
            self._at_line_start = data.endswith(b"\n")

    def mark(self, text: str) -> None:
        """Write the builder's own `text` (a header or an outcome), each of its lines marked,
        starting on a new line even if the output before it did not end one."""
        lines = text.replace(MARK.decode(), "").split("\n")
        self.end_line()
        self._sink(b"".join(line.encode() + MARK + b"\n" for line in lines))

    def end_line(self) -> None:
        """End the output's last line if it is not ended, so that what follows (the next
        header, the job's own lines after a failed step) starts a line."""
        if not self._at_line_start:
            self._sink(b"\n")
            self._at_line_start = True


@dataclass
class _Request:
    """One call of `Builder.build` (or `fetch_base`): where its output goes, the secret values
    it was given, and the results it found in the store (noted as used when it ends)."""

    log: _BuildLog
    secrets: Mapping[str, bytes]
    cache_hits: list[str] = field(default_factory=list)


@dataclass
class _Step:
    """A step in progress (or being looked up in the store), shared by the builds needing it."""

    task: asyncio.Task[bool]
    """Loads or builds the step; True if it was found in the store."""
    log: _LiveLog
    waiters: int = 0
    cancelling: bool = False
    """Set when its last waiter was cancelled: newcomers wait for it to end and start afresh."""


class Builder:
    """Builds specs with results kept in `store`, commands run in `sandbox`, images from
    `fetcher`, for `platform` (`linux/ARCH`; the fetcher must make images of that platform).

    Several builders, in one process or many, may share a store: each step is built once.
    `close` (or the end of the process) lets go of what the store holds.
    """

    def __init__(self, store: Store, sandbox: Sandbox, fetcher: Fetcher, *,
                 platform: str | None = None, binfmt_dir: Path = BINFMT_DIR) -> None:
        """Build with these backends; `store` is normally a `DbStore`, whose `mark_used`
        records cache hits for pruning (a bare backend ignores them). `platform` is any form
        `platforms.parse_platform` takes (None: this host's); BuildError for an unknown one.
        An emulated platform's handler is looked for under `binfmt_dir` (binfmt_misc)."""
        self.store = store
        self.sandbox = sandbox
        self.fetcher = fetcher
        self.platform = parse_platform(platform or host_platform())
        """The platform every build of this builder is for, `linux/ARCH`."""
        self.binfmt_dir = binfmt_dir
        # What every `run` step mounts for emulation; None until checked (see `_emulation`).
        self._emulation_mounts: list[Mount] | None = None
        self._running: dict[str, _Step] = {}
        # Start-up cleaning, done (or being done) before the first step runs; see `clean`.
        self._cleaning: asyncio.Future[None] | None = None

        # Where steps change their rootfs: a sandbox that keeps root filesystems itself (the
        # docker pair's) is their `Workspaces`; otherwise they are host directories in the
        # store's results, which the sandbox runs over.
        self.workspaces: Workspaces = (
            sandbox if isinstance(sandbox, Workspaces) else HostWorkspaces(sandbox))

    async def clean(self) -> None:
        """Remove what crashed processes left: their containers first (a crashed build's
        command may still be writing in its rootfs), then the store's temporary state (and, for
        a `DbStore`, reconcile its table). Live processes' work is spared. Done once before the
        first step this builder runs; call it to clean without building."""
        await self.sandbox.clean()
        await self.store.clean()

    async def _clean_before_first_step(self) -> None:
        """Run `clean` unless it has run (or is running) for this builder; a failed or
        cancelled attempt is tried again by the next step."""
        attempt = self._cleaning
        if attempt is None or (attempt.done() and (attempt.cancelled() or attempt.exception())):
            attempt = self._cleaning = asyncio.ensure_future(self.clean())
        # Shielded: a cancelled step must not cancel the cleaning other steps wait for.
        await asyncio.shield(attempt)

    async def build(self, spec: S.Spec, context: Path, *, log: Callable[[bytes], None],
                    secrets: Mapping[str, bytes] = _NO_SECRETS) -> str:
        """Build `spec` with `context` as the source of `copy` steps; return the final result id.

        `log` receives each step's header, output and outcome as they happen (in the form the
        module's docstring gives); `secrets` maps secret ids to values for `(run (secrets ...))`.
        Child stages are built first, in order.
        Raises BuildError naming the step on its failure (a failed step is never saved, so
        building again retries it), for a missing secret, an unknown `(user (name ...))`, an
        unsupported network, or a `copy` source breaking the manifest rules; StoreFull if the
        store is full (see `full_store`) or runs out of space. Cancelling the calling task stops
        the current step unless another build is waiting for it too.
        """
        self._emulation()
        request = _Request(_BuildLog(log), secrets)
        async with self._space_guard(), self._noting_cache_hits(request):
            return await self._build(spec, context, request, {})

    def _emulation(self) -> list[Mount]:
        """The mounts a `run` step needs to run this builder's platform: none for the host's;
        for an emulated one, the emulator's, its handler checked once (raises MissingTool as
        `emulation.find_emulator` does, and again at the next build)."""
        if self._emulation_mounts is None:
            self._emulation_mounts = (find_emulator(self.platform, self.binfmt_dir).mounts()
                                      if is_emulated(self.platform) else [])
        return self._emulation_mounts

    @asynccontextmanager
    async def _noting_cache_hits(self, request: _Request) -> AsyncIterator[None]:
        """When the block ends, tell the store in one call which results `request` found in it
        (`Store.mark_used`). If the block failed, its error is the one raised: failing to note
        the uses as well (on the full disk that failed the build, say) only adds a note to it."""
        try:
            yield
        except BaseException as failure:
            try:
                await self._note_cache_hits(request)
            except Exception as error:
                failure.add_note(f"its cache hits were not noted as uses: {error}")
            raise
        await self._note_cache_hits(request)

    async def _note_cache_hits(self, request: _Request) -> None:
        if request.cache_hits:
            await self.store.mark_used(request.cache_hits)

    @asynccontextmanager
    async def _space_guard(self) -> AsyncIterator[None]:
        """Refuse to start if the store is full; make a full-disk failure inside StoreFull, the
        one message saying which store is full and how to free space."""
        problem = await space_problem(self.store)
        if problem is not None:
            raise problem
        async with reporting_full(lambda: self.store):
            yield

    async def _build(self, spec: S.Spec, context: Path, request: _Request,
                     stages: Mapping[str, str]) -> str:
        # A stage sees the stages of its enclosing scopes and its own earlier children.
        scope = dict(stages)
        for name, child in spec.child_builds:
            scope[name] = await self._build(child, context, request, scope)
        result, image_env = await self._from(spec.from_, request)
        for op, ctx in S.contexts(spec.ops):
            match op:
                case S.Run():
                    result = await self._run(result, ctx, {**image_env, **dict(ctx.env)}, op,
                                             request)
                case S.Copy():
                    result = await self._copy(result, ctx, op, context, scope, request)
        return result

    async def fetch_base(self, image: str, *, log: Callable[[bytes], None]) -> str:
        """Make sure the result of `(from image)` is in the store, fetching the image if it is
        not, and return its id; `log` gets the step's header, output and outcome. Raises
        BuildError naming the step if the fetcher fails (nothing is saved then), StoreFull as
        `build` does."""
        self._emulation()
        request = _Request(_BuildLog(log), _NO_SECRETS)
        async with self._space_guard(), self._noting_cache_hits(request):
            id, _ = await self._from(image, request)
        return id

    async def _from(self, image: str, request: _Request) -> tuple[str, dict[str, str]]:
        """The result of `(from image)` and the image's environment."""
        id = from_id(image, self.platform)

        async def work(tmp: Path, step_log: Log) -> None:
            workspace = self.workspaces.workspace(tmp, id)
            info = await workspace.unpack(self.fetcher, image, log=step_log)
            (tmp / "env.json").write_text(json.dumps(dict(info.env)))
            if info.digest is not None:
                (tmp / DIGEST).write_text(info.digest)

        await self._step(id, None, S.from_text(image), request, work)
        directory = await self._result(id)
        return id, json.loads((directory / "env.json").read_text())

    async def _run(self, parent: str, ctx: S.Context, env: Mapping[str, str], op: S.Run,
                   request: _Request) -> str:
        id = step_id(op="run", parent=parent, workdir=ctx.workdir, user=_user_key(ctx.user),
                     env=sorted(env.items()), shell=ctx.shell, command=op.shell,
                     network=list(op.network),
                     secrets=[[s.id, s.target] for s in op.secrets])

        secrets = request.secrets

        async def work(tmp: Path, step_log: Log) -> None:
            workspace = self.workspaces.workspace(tmp, id)
            unknown = [n for n in op.network if n != "host"]
            if unknown:
                raise BuildError(f"unknown network {unknown[0]!r}: only \"host\" is supported")
            missing = [s.id for s in op.secrets if s.id not in secrets]
            if missing:
                raise BuildError(f"no value given for secret {missing[0]!r}")
            uid, gid = await _resolve_user(workspace, ctx.user)
            async with AsyncExitStack() as stack:
                mounts = [
                    Mount(await stack.enter_async_context(self.store.cache(c.id, uid, gid)),
                          c.target)
                    for c in op.cache
                ]
                # Last: a cache mounted over the interpreter's directory cannot hide it.
                mounts += self._emulation()
                config = SandboxConfig(argv=[*ctx.shell, op.shell], cwd=ctx.workdir, uid=uid,
                                       gid=gid, env=dict(env), mounts=mounts,
                                       network="host" in op.network,
                                       secrets=[Secret(secrets[s.id], s.target)
                                                for s in op.secrets])
                await workspace.run(config, log=step_log)

        await self._step(id, parent, step_header(ctx, op), request, work)
        return id

    async def _copy(self, parent: str, ctx: S.Context, op: S.Copy, context: Path,
                    stages: Mapping[str, str], request: _Request) -> str:
        stage = stages[op.from_.name] if isinstance(op.from_, S.Build) else None
        async with AsyncExitStack() as stack:
            src_dir = context if stage is None else await stack.enter_async_context(
                self.workspaces.files(await self._result(stage), stage))
            plan = await asyncio.to_thread(manifest, src_dir, op.src, op.dst,
                                           exclude=op.exclude, workdir=ctx.workdir)
            id = step_id(op="copy", parent=parent, user=_user_key(ctx.user),
                         manifest=plan.digest(), stage=stage)

            async def work(tmp: Path, step_log: Log) -> None:
                workspace = self.workspaces.workspace(tmp, id)
                uid, gid = await _resolve_user(workspace, ctx.user)
                await workspace.write(plan, uid, gid)

            # The plan reads the stage's files while the step runs.
            await self._step(id, parent, step_header(ctx, op), request, work)
        return id

    async def _result(self, id: str) -> Path:
        directory = await self.store.result(id)
        if directory is None:
            raise BuildError(f"result {id} has disappeared from the store (deleted or pruned)")
        return directory

    async def _step(self, id: str, base: str | None, header: str, request: _Request,
                    work: Work) -> None:
        """Make sure result `id` exists, doing `work` on a copy of `base` if it does not,
        and write the step's header, output and outcome to the build's log."""
        log = request.log
        log.mark(header)
        while True:
            step = self._running.get(id)
            if step is None:
                step = self._start(id, base, header, work)
            elif step.cancelling:
                await asyncio.wait([step.task])
                continue
            break
        step.waiters += 1
        step.log.follow(log.output)
        try:
            cached = await asyncio.shield(step.task)
        except asyncio.CancelledError:
            step.waiters -= 1
            if step.waiters == 0 and not step.task.done():
                step.cancelling = True
                step.task.cancel()
                # Return only once the sandboxed process is dead and the step discarded.
                await asyncio.wait([step.task])
            raise
        finally:
            step.log.unfollow(log.output)
            log.end_line()
        if cached:
            request.cache_hits.append(id)
        log.mark(outcome(id, cached))

    def _start(self, id: str, base: str | None, header: str, work: Work) -> _Step:
        live = _LiveLog()
        task = asyncio.create_task(
            self._load_or_build(id, base, header, live, self._with_space_hint(work)))
        step = _Step(task=task, log=live)
        self._running[id] = step

        def finished(_: asyncio.Task[bool]) -> None:
            # By now the result is committed (or was never made): later builds ask the store.
            if self._running.get(id) is step:
                del self._running[id]

        task.add_done_callback(finished)
        return step

    def _with_space_hint(self, work: Work) -> Work:
        """`work`, whose failure also says that the store is full if it is then (a command that
        fails for lack of space only says that it failed). Checked before the store discards
        the step, which gives its space back."""

        async def hinted(tmp: Path, log: Log) -> None:
            try:
                await work(tmp, log)
            except BuildError as exc:
                problem = None if is_disk_full(exc) else await space_problem(self.store)
                if problem is None:
                    raise
                raise BuildError(f"{exc}; {problem}") from exc

        return hinted

    async def _load_or_build(self, id: str, base: str | None, header: str, live: _LiveLog,
                             work: Work) -> bool:
        """Replay the saved log of `id` if it is in the store (True), else build it (False),
        holding the step's lock so that no other process builds it at the same time."""
        if await self._replay(id, live):
            return True
        # Before the step's lock is taken: cleaning never waits for a lock, but deleting what
        # the result table says is gone may.
        await self._clean_before_first_step()

        async def fn(tmp: Path) -> None:
            # The log is part of the result directory, so the store commits it with the rootfs.
            with open(tmp / "log", "wb", buffering=0) as file:
                await work(tmp, _Tee(file, live))

        async with self.store.lock(id):
            # Another process may have built it while this one waited for the lock.
            if await self._replay(id, live):
                return True
            try:
                await self.store.build(base, id, fn)
            except BuildError as exc:
                # One line: the printer breaks a long op only between fields.
                one_line = re.sub(r"\n *", " ", header)
                raise BuildError(f"step {one_line} failed: {exc}") from exc
        return False

    async def _replay(self, id: str, live: _LiveLog) -> bool:
        """If result `id` is in the store, write its saved log to `live` and return True; else
        False."""
        if not await self.store.has_result(id):
            return False
        saved = self.store.log_file(id)
        if saved.exists():
            live.write(await asyncio.to_thread(saved.read_bytes))
        return True

    def close(self) -> None:
        """Let go of the store and sandbox (their locks, mounts); the builder must not be used
        afterwards. Also done at exit for a builder never closed."""
        self.store.close()
        self.sandbox.close()


def step_header(ctx: S.Context, op: S.Op) -> str:
    """The header a build's log gives the step `op` run in `ctx`: `WORKDIR: OP`, the op as the
    spec printer prints it (a run with mounts or network on several lines)."""
    prefix = f"{ctx.workdir}: "
    return prefix + S.op_text(op, len(prefix))


def _user_key(user: S.User) -> dict[str, Any]:
    if isinstance(user, S.UserName):
        return {"name": user.name}
    return {"uid": user.uid, "gid": user.gid}


async def _resolve_user(workspace: Workspace, user: S.User) -> tuple[int, int]:
    """The uid and gid of `user`, looking a name up in the rootfs's /etc/passwd (read by the
    workspace, confined to the rootfs: a step cannot make the builder read a host file).

    Raises BuildError if the name is not there, or /etc/passwd is missing, not a regular file or
    has a malformed uid or gid for it.
    """
    if isinstance(user, S.UserIds):
        return user.uid, user.gid
    cannot = f"cannot look up user {user.name!r}"
    try:
        passwd = await workspace.read("/etc/passwd")
    except BuildError as exc:
        raise BuildError(f"{cannot}: {exc}") from None
    for line in passwd.split(b"\n"):
        fields = line.decode(errors="replace").split(":")
        if len(fields) >= 4 and fields[0] == user.name:
            if not (re.fullmatch("[0-9]+", fields[2]) and re.fullmatch("[0-9]+", fields[3])):
                raise BuildError(f"{cannot}: bad uid or gid in /etc/passwd")
            return int(fields[2]), int(fields[3])
    raise BuildError(f"user {user.name!r} not found in /etc/passwd")
