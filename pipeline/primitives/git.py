"""Git repositories as pipeline inputs, and the operations a build needs on their commits.

- `local_heads(path)`: a monitor of a local repository's branches (and tags, HEAD), watched with
  watchdog on its git directory, with a polling fallback.
- `remote_heads(url)`: a monitor polling `git ls-remote`, which `refresh(url)` (a webhook) can
  make read at once.
- `fetch(commit)`: a cached builder making a commit available locally, in one bare mirror per
  remote under the state directory.
- `checkout(commit)`: a temporary clean checkout, submodules included; `read_file(commit, path)`.

Every git command runs as a subprocess of the event loop (never blocking it), with prompts
disabled so that a repository asking for credentials fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

import pipeline as p
from pipeline.monitor import Monitor, Unwatch

# How often a local repository is read even without a watchdog event: covers filesystems where
# inotify says nothing (network mounts) and a repository created after the watch was installed.
LOCAL_POLL_SECONDS = 5.0

# `git ls-remote` to a host that silently drops packets can hang for minutes.
REMOTE_TIMEOUT_SECONDS = 120.0

_SCP_LIKE = re.compile(r"^[\w.-]+@?[\w.-]*:(?!//)")


class GitError(Exception):
    """A git command failed; the message names the repository and gives git's own words."""


@dataclass(frozen=True)
class Commit:
    """A commit as seen at a ref of a repository.

    Equal commits compare equal, so re-reading an unchanged head stops propagation.
    """

    repo: str  # where it was read from: an absolute local path, or a remote URL
    hash: str  # the full 40-hex id
    ref: str  # "refs/heads/main", "refs/tags/v1", or "HEAD"

    @property
    def branch(self) -> str | None:
        """The branch name ("main" for refs/heads/main), or None for a tag or HEAD."""
        prefix = "refs/heads/"
        return self.ref[len(prefix):] if self.ref.startswith(prefix) else None

    @property
    def short(self) -> str:
        """The abbreviated hash, for labels."""
        return self.hash[:7]

    def __str__(self) -> str:
        return f"{self.repo}#{self.ref}@{self.short}"


def normalise(repo: str | Path) -> str:
    """The canonical name of a repository: an absolute resolved path, or the URL without "/"s
    at its end. Monitors, `refresh` and `Commit.repo` all use it."""
    text = str(repo)
    if "://" in text or _SCP_LIKE.match(text):
        return text.rstrip("/") or text
    return str(Path(text).expanduser().resolve())


def _is_url(repo: str) -> bool:
    return "://" in repo or bool(_SCP_LIKE.match(repo))


# Running git

async def _run(*args: str, cwd: str | Path) -> tuple[int, bytes, bytes]:
    """Run `git ARGS` in `cwd`; returns (status, stdout, stderr). Cancelling kills the process.

    Raises GitError "CWD: no such file or directory" if `cwd` does not exist.
    """
    # Without a ceiling, a plain directory inside some other repository would be taken for
    # that repository.
    env = {
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",  # git's messages are matched and shown as they are
        "GIT_CEILING_DIRECTORIES": str(Path(cwd).parent),
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except (FileNotFoundError, NotADirectoryError):
        if os.path.isdir(cwd):
            raise  # git itself is missing
        raise GitError(f"{cwd}: no such file or directory") from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        # Cancelled (auto_cancel, shutdown) or timed out: leave no git process behind.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def _git_message(err: bytes) -> str:
    """Git's first error line without its "fatal: " prefix (the first says what went wrong;
    later ones are generic advice), with the next line when it continues onto it."""
    lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        prefix, _, rest = line.partition(": ")
        if prefix in ("fatal", "error") and rest:
            if rest.endswith(":") and i + 1 < len(lines):
                return f"{rest} {lines[i + 1]}"
            return rest
    return lines[-1] if lines else "git failed"


async def _git(*args: str, cwd: str | Path, context: str) -> bytes:
    """Run git in `cwd` and return stdout; raises GitError "CONTEXT: <git's message>"."""
    status, out, err = await _run(*args, cwd=cwd)
    if status != 0:
        raise GitError(f"{context}: {_git_message(err)}")
    return out


# Refresh registry (webhooks)

_live_lock = threading.Lock()
_live: dict[str, list[Callable[[], None]]] = {}


def _register(repo: str, callback: Callable[[], None]) -> Callable[[], None]:
    """Record a live watch of `repo`; returns the function that forgets it."""
    with _live_lock:
        _live.setdefault(repo, []).append(callback)

    def forget() -> None:
        with _live_lock:
            callbacks = _live.get(repo, [])
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            if not callbacks:
                _live.pop(repo, None)

    return forget


def refresh(repo: str) -> int:
    """Ask every live monitor of `repo` (a local path or a URL, normalised) to read it again now.

    For webhooks: safe to call from any thread. Returns how many monitors were asked; 0 when
    nothing watches that repository (not an error: the hook may arrive before the pipeline).
    """
    with _live_lock:
        callbacks = list(_live.get(normalise(repo), ()))
    for callback in callbacks:
        callback()
    return len(callbacks)


async def _poll(seconds: float, refresh: Callable[[], None],
                before: Callable[[], Awaitable[None]] | None = None) -> None:
    """Every `seconds`, await `before()` (if given), then `refresh()`; until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        if before is not None:
            await before()
        refresh()


# Local repositories


def _parse_refs(out: bytes, repo: str) -> list[Commit]:
    """Commits from `for-each-ref --format='%(objectname) %(*objectname) %(refname)'` lines."""
    commits = []
    for line in out.decode().splitlines():
        obj, peeled, ref = line.split("\t")
        # An annotated tag names a tag object: the commit is what it peels to.
        commits.append(Commit(repo, peeled or obj, ref))
    return commits


_CHANGES = frozenset({
    EVENT_TYPE_CREATED, EVENT_TYPE_DELETED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED,
})


class _GitDirEvents(FileSystemEventHandler):
    """Refreshes on changes to refs, packed-refs or HEAD, ignoring git's lock files and the
    object writes that make up most of a git directory's activity."""

    def __init__(self, dirs: list[Path], refresh: Callable[[], None]) -> None:
        self.dirs = dirs
        self.refresh = refresh

    def _relevant(self, path: str) -> bool:
        if not path or path.endswith(".lock"):
            return False
        target = Path(path)
        for directory in self.dirs:
            if target.parent == directory and target.name in ("HEAD", "packed-refs"):
                return True
            if target.is_relative_to(directory / "refs"):
                return True
        return False

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Opening a ref to read it is an event too: reacting to it would make every read
        # trigger another.
        if event.event_type not in _CHANGES:
            return
        paths = (str(event.src_path), str(getattr(event, "dest_path", "") or ""))
        if any(self._relevant(path) for path in paths):
            self.refresh()


class _DirWatch:
    """A watchdog observer of a repository's git directories, replaced when they change (the
    repository appears, moves or is re-created)."""

    def __init__(self, path: str, refresh: Callable[[], None]) -> None:
        self.path = path
        self.refresh = refresh
        self.dirs: list[Path] = []
        self.observer: Observer | None = None

    async def update(self) -> None:
        """Watch the repository's current git directories (none if it is not a repository).

        Never raises: a repository that cannot be watched now (it vanished meanwhile) is
        still polled, and its reads say what is wrong.
        """
        try:
            dirs = await _git_dirs(self.path)
            if dirs == self.dirs:
                return
            await self.stop()
            if dirs:
                self.observer = await asyncio.to_thread(self._start, dirs)
                self.dirs = dirs
        except (OSError, GitError):
            await self.stop()

    def _start(self, dirs: list[Path]) -> Observer:
        observer = Observer()
        handler = _GitDirEvents(dirs, self.refresh)
        for directory in dirs:
            # HEAD and packed-refs are direct children; refs/ is a tree of loose refs.
            observer.schedule(handler, str(directory), recursive=False)
            if (directory / "refs").is_dir():
                observer.schedule(handler, str(directory / "refs"), recursive=True)
        observer.start()
        return observer

    async def stop(self) -> None:
        """Stop the observer, if any."""
        observer, self.observer = self.observer, None
        self.dirs = []
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join)


async def _git_dirs(path: str) -> list[Path]:
    """The git directory and (for a linked worktree) the common one; [] if not a repository."""
    if not os.path.isdir(path):
        return []
    status, out, _ = await _run("rev-parse", "--path-format=absolute", "--git-dir",
                                "--git-common-dir", cwd=path)
    if status != 0:
        return []
    return sorted({Path(line) for line in out.decode().splitlines() if line})


class LocalHeads(Monitor[list[Commit]]):
    """The branches (and optionally tags and HEAD) of a local repository, sorted by ref.

    A missing directory reads as "PATH: no such file or directory", a directory that is not a
    repository as "PATH: not a git repository"; the next event, poll or `refresh` reads again.
    """

    def __init__(self, path: str | Path, *, tags: bool = False, head: bool = False) -> None:
        self.path = normalise(path)
        self.tags = tags
        self.head = head
        self.label = f"git {Path(self.path).name}"

    @property
    def key(self) -> tuple[str, str, bool, bool]:
        """Monitors of the same repository and selection share one watch."""
        return ("git-local", self.path, self.tags, self.head)

    async def watch(self, refresh: Callable[[], None]) -> Unwatch:
        """Watch the git directory with watchdog, poll every LOCAL_POLL_SECONDS as a fallback
        (re-installing the watch when the repository appears or changes), and answer `refresh`."""
        dirs = _DirWatch(self.path, refresh)
        await dirs.update()
        poller = asyncio.create_task(_poll(LOCAL_POLL_SECONDS, refresh, dirs.update))
        forget = _register(self.path, refresh)

        async def unwatch() -> None:
            forget()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await dirs.stop()

        return unwatch

    async def read(self) -> list[Commit]:
        """List the refs with one `git for-each-ref` (plus `rev-parse HEAD` if asked)."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        patterns = ["refs/heads/"] + (["refs/tags/"] if self.tags else [])
        status, out, err = await _run(
            "for-each-ref", "--format=%(objectname)\t%(*objectname)\t%(refname)", *patterns,
            cwd=self.path)
        if status != 0:
            message = _git_message(err)
            if "not a git repository" in message:
                raise GitError(f"{self.path}: not a git repository")
            raise GitError(f"{self.path}: {message}")
        commits = _parse_refs(out, self.path)
        if self.head:
            status, out, _ = await _run("rev-parse", "--verify", "--quiet", "HEAD^{commit}",
                                        cwd=self.path)
            # An unborn HEAD (a new, empty repository) is simply not listed.
            if status == 0:
                commits.append(Commit(self.path, out.decode().strip(), "HEAD"))
        return sorted(commits, key=lambda c: c.ref)


def local_heads(path: str | Path, *, tags: bool = False,
                head: bool = False) -> p.Term[list[Commit]]:
    """The branches of the local repository at `path` (with its tags, and HEAD, if asked), sorted
    by ref; a new commit is seen within moments (watchdog), at worst LOCAL_POLL_SECONDS."""
    return LocalHeads(path, tags=tags, head=head).term


# Remote repositories


class RemoteHeads(Monitor[list[Commit]]):
    """The branches (and optionally tags) of a remote repository, by `git ls-remote`.

    A failure reads as "URL: unreachable: <git's message>" until the next poll or refresh.
    """

    def __init__(self, url: str, *, poll: float = 60, tags: bool = False) -> None:
        self.url = normalise(url)
        self.poll = poll
        self.tags = tags
        self.label = f"git {self.url.rsplit('/', 1)[-1]}"

    @property
    def key(self) -> tuple[str, str, float, bool]:
        """Monitors of the same URL, interval and selection share one watch."""
        return ("git-remote", self.url, self.poll, self.tags)

    async def watch(self, refresh: Callable[[], None]) -> Unwatch:
        """Poll every `poll` seconds, and answer `refresh(url)`."""
        poller = asyncio.create_task(_poll(self.poll, refresh))
        forget = _register(self.url, refresh)

        async def unwatch() -> None:
            forget()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

        return unwatch

    async def read(self) -> list[Commit]:
        """Run `git ls-remote`; raises GitError naming the URL if it fails or times out."""
        args = ["ls-remote", "--heads"] + (["--tags"] if self.tags else []) + [self.url]
        try:
            async with asyncio.timeout(REMOTE_TIMEOUT_SECONDS):
                status, out, err = await _run(*args, cwd=tempfile.gettempdir())
        except TimeoutError:
            raise GitError(f"{self.url}: unreachable: no answer in "
                           f"{REMOTE_TIMEOUT_SECONDS:g} s") from None
        if status != 0:
            raise GitError(f"{self.url}: unreachable: {_git_message(err)}")
        hashes: dict[str, str] = {}
        for line in out.decode().splitlines():
            obj, ref = line.split("\t")
            # "refs/tags/v1^{}" gives the commit an annotated tag "refs/tags/v1" points to.
            if ref.endswith("^{}"):
                hashes[ref[:-3]] = obj
            else:
                hashes.setdefault(ref, obj)
        return sorted((Commit(self.url, h, ref) for ref, h in hashes.items()),
                      key=lambda c: c.ref)


def remote_heads(url: str, *, poll: float = 60, tags: bool = False) -> p.Term[list[Commit]]:
    """The branches (and tags, if asked) of the repository at `url`, read every `poll` seconds
    and whenever `refresh(url)` is called."""
    return RemoteHeads(url, poll=poll, tags=tags).term


# Fetching

_mirror_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _mirror_lock(mirror: Path) -> asyncio.Lock:
    # One lock per mirror and event loop: asyncio locks belong to the loop they first wait on.
    locks = _mirror_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(mirror, asyncio.Lock())


async def _has_commit(repo: str | Path, hash: str) -> bool:
    status, _, _ = await _run("cat-file", "-e", f"{hash}^{{commit}}", cwd=repo)
    return status == 0


def _log_output(job: p.Job, out: bytes, err: bytes) -> None:
    if out:
        job.write(out)
    if err:
        job.write(err)


async def _complete(mirror: Path, hash: str) -> bool:
    """Whether `mirror` has commit `hash` and each tree and blob of it (what a checkout reads)."""
    status, _, _ = await _run("rev-list", "--quiet", "--objects", "--no-walk",
                              f"{hash}^{{commit}}", cwd=mirror)
    return status == 0


async def _corruption(mirror: Path) -> str | None:
    """What `git fsck --connectivity-only` finds wrong with `mirror` (objects missing), or None."""
    if not mirror.exists():
        return None
    status, out, err = await _run("fsck", "--connectivity-only", "--no-dangling", cwd=mirror)
    return None if status == 0 else _git_message(err or out)


async def _fetch_into_mirror(job: p.Job, url: str, mirror: Path, hash: str) -> None:
    """Create the mirror if needed and fetch until it has `hash`, re-cloning a corrupt mirror
    once; raises GitError otherwise."""
    try:
        await _fetch_once(job, url, mirror, hash)
    except GitError:
        # A mirror missing objects (a disk error, a pack deleted) fails every fetch and
        # checkout, whatever the remote says: only a new one helps.
        problem = await _corruption(mirror)
        if problem is None:
            raise
        job.log(f"mirror {mirror} is corrupt ({problem}): re-cloning it from {url}")
        # Renamed first: an interrupted removal leaves no half-deleted mirror under its name.
        trash = Path(tempfile.mkdtemp(prefix=f".{mirror.name}-corrupt-", dir=mirror.parent))
        mirror.rename(trash / "mirror")
        await asyncio.to_thread(shutil.rmtree, trash, ignore_errors=True)
        await _fetch_once(job, url, mirror, hash)


async def _fetch_once(job: p.Job, url: str, mirror: Path, hash: str) -> None:
    """Create the mirror if needed and fetch until it has `hash`; raises GitError otherwise."""
    if not mirror.exists():
        job.log(f"creating mirror {mirror} of {url}")
        mirror.parent.mkdir(parents=True, exist_ok=True)
        # Made under a temporary name and renamed: a crash leaves no half-configured mirror.
        partial = Path(tempfile.mkdtemp(prefix=f".{mirror.name}-", dir=mirror.parent))
        await _git("init", "--quiet", "--bare", str(partial), cwd=mirror.parent,
                   context=str(mirror))
        for name, value in (("remote.origin.url", url), ("remote.origin.fetch", "+refs/*:refs/*"),
                            ("remote.origin.mirror", "true")):
            await _git("config", name, value, cwd=partial, context=str(mirror))
        partial.rename(mirror)
    job.log(f"fetching {url} into {mirror}")
    status, out, err = await _run("fetch", "--prune", "origin", cwd=mirror)
    _log_output(job, out, err)
    if status != 0:
        raise GitError(f"{url}: unreachable: {_git_message(err)}")
    if await _complete(mirror, hash):
        return
    if await _has_commit(mirror, hash):
        raise GitError(f"{mirror}: objects of commit {hash} are missing")
    # No ref points to it any more (a force-push): servers that allow it give it by id.
    job.log(f"{hash} is on no ref of {url}; asking for it by id")
    status, out, err = await _run("fetch", "origin", hash, cwd=mirror)
    _log_output(job, out, err)
    if status != 0 or not await _complete(mirror, hash):
        raise GitError(f"{url}: commit {hash} not found: {_git_message(err)}")


async def _fetch(job: p.Job, commit: Commit) -> Commit:
    """Make `commit` available locally; see `fetch`."""
    if not _is_url(commit.repo):
        if not await _has_commit(commit.repo, commit.hash):
            raise GitError(f"{commit.repo}: commit {commit.hash} not found")
        job.log(f"{commit} is in the local repository: nothing to fetch")
        return commit
    mirror = (Path(job.state_dir) / "git" / p.digest(commit.repo)).resolve()
    async with _mirror_lock(mirror):
        # Checked under the lock: a fetch that was running meanwhile may have brought it.
        if mirror.exists() and await _complete(mirror, commit.hash):
            job.log(f"{commit.hash} is already in {mirror}: nothing to fetch")
        else:
            await _fetch_into_mirror(job, commit.repo, mirror, commit.hash)
    return Commit(str(mirror), commit.hash, commit.ref)


def _encode_commit(commit: Commit) -> str:
    return json.dumps(asdict(commit))


def _decode_commit(text: str) -> Commit:
    return Commit(**json.loads(text))


_fetch_op = p.builder("git-fetch", auto_cancel=True, pp=str, encode=_encode_commit,
                      decode=_decode_commit)(_fetch)


def fetch(commit: p.Term[Commit]) -> p.Term[Commit]:
    """A cached builder making `commit` available locally; its value is the same commit with
    `repo` the local repository that has it.

    - A local repository is its own mirror: nothing is copied; a commit it lacks fails the job.
    - A remote gets one bare mirror, `STATE_DIR/git/<digest of the URL>`, made on first use and
      fetched (all refs, pruned) only when it lacks the commit; a commit on no ref is asked for
      by id. Fetches of one mirror are serialised within the process.
    - A corrupt mirror (objects missing: a fetch fails, or the commit's files are not all
      there; `git fsck --connectivity-only` confirms it) is deleted and cloned again, saying so
      in the job's log.
    - Submodules are not mirrored: `checkout` initialises them from their own URLs.
    - Failure (unreachable, commit gone) fails the job with git's message and, as for every
      builder, is sticky until a rebuild. The outcome is cached: a mirror deleted behind the
      engine's back is not noticed until a rebuild.
    """
    return _fetch_op(commit, label="fetch")


# Using a local commit

_CHECKOUT_PREFIX = "pipeline-checkout-"
# A checkout's directory is named after its process: pid and start time (a pid alone may have
# been reused by the time anyone looks).
_CHECKOUT_OWNER = re.compile(re.escape(_CHECKOUT_PREFIX) + r"([0-9]+)\.([0-9]+)-")
_leftovers_removed = False


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: count fields after its last ')'.
    return stat[stat.rindex(")") + 2:].split()[19]


def _remove_leftover_checkouts() -> None:
    """Remove the checkouts of processes that died without removing them (e.g. SIGKILL).

    Only those of dead processes: a live pipeline's checkouts are its own, whatever its state
    directory.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{_CHECKOUT_PREFIX}*"):
        owner = _CHECKOUT_OWNER.match(path.name)
        if owner is not None and _start_time(int(owner[1])) != owner[2]:
            shutil.rmtree(path, ignore_errors=True)


def _make_checkout_dir() -> Path:
    """A new checkout directory named after this process; first, once per process, remove the
    leftovers of dead ones."""
    global _leftovers_removed
    if not _leftovers_removed:
        _leftovers_removed = True
        _remove_leftover_checkouts()
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{_CHECKOUT_PREFIX}{pid}.{_start_time(pid)}-"))


@contextlib.asynccontextmanager
async def checkout(commit: Commit) -> AsyncIterator[Path]:
    """A clean temporary checkout of `commit` (whose `repo` must be local: see `fetch`), with
    submodules initialised at their recorded commits; removed on leaving, whatever happens.
    Checkouts that a killed process left behind are removed by the first checkout of the next.

    Made with `git clone --shared` (objects borrowed from the repository, which is not
    modified), so checkouts of one repository may run concurrently. Submodules are cloned from
    the URLs in `.gitmodules` (relative ones against the repository's `origin`, or its own path
    without one); local and file:// URLs are allowed. Raises GitError naming the commit if the
    clone, checkout or a submodule fails.
    """
    directory = await asyncio.to_thread(_make_checkout_dir)
    try:
        tree = directory / "src"
        context = f"{commit.repo}: checkout of {commit.short}"
        await _git("clone", "--quiet", "--shared", "--no-checkout", commit.repo, str(tree),
                   cwd=directory, context=context)
        status, out, _ = await _run("config", "--get", "remote.origin.url", cwd=commit.repo)
        if status == 0:
            # A mirror's submodules are relative to the remote it mirrors, not to the mirror.
            await _git("config", "remote.origin.url", out.decode().strip(), cwd=tree,
                       context=context)
        await _git("checkout", "--quiet", "--detach", commit.hash, cwd=tree, context=context)
        await _git("-c", "protocol.file.allow=always", "submodule", "update", "--init",
                   "--recursive", "--quiet", cwd=tree, context=context)
        yield tree
    finally:
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)


async def read_file(commit: Commit, path: str) -> bytes:
    """The content of `path` at `commit` (whose `repo` must be local: see `fetch`).

    Raises FileNotFoundError naming the path and commit if there is no such file there, and
    GitError if the repository or commit cannot be read.
    """
    status, out, err = await _run("cat-file", "blob", f"{commit.hash}:{path}", cwd=commit.repo)
    if status == 0:
        return out
    message = _git_message(err)
    if await _has_commit(commit.repo, commit.hash):
        raise FileNotFoundError(f"{path}: no such file in {commit}")
    raise GitError(f"{commit.repo}: cannot read {path} at {commit.short}: {message}")


async def describe(commit: Commit) -> tuple[str, str, str]:
    """The whole message, author ("Name <mail>") and author date (ISO 8601) of `commit` (whose
    `repo` must be local: see `fetch`); raises GitError if git cannot read it."""
    out = await _git("show", "--no-patch", "--format=%an <%ae>%x00%aI%x00%B", commit.hash,
                     cwd=commit.repo, context=f"{commit.repo}: reading {commit.short}")
    author, date, message = out.decode(errors="replace").split("\0", 2)
    return message.strip(), author, date
