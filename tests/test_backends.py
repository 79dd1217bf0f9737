"""Conformance of every store/sandbox pair, through the builder: the runc sandbox with each kind
of directory store, and the docker sandbox with the docker store on real podman. A new backend
is tested by adding it to `PAIRS`.

Each test builds with the pair the command line would put together (`setup.open_sandbox`) and
checks only what a build shows whatever keeps the results: its log, the store's results, what a
later step finds in the rootfs, the host around it. Steps that must overlap in time are held by a
`Gate` (`gate.py`); pruning runs on a fake clock. Nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gate import Gate, gated
from obuilder_fixtures import (
    DOCKER_ENGINE,
    HANG_GUARD,
    RecordingLog,
    engine_things,
    new_store_root,
)
from test_builder import ID, THREE_STEPS, build
from test_escape import snapshot
from test_stores import Clock

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.local import LocalFetcher
from pipeline.obuilder.protocols import BuildError, Sandbox
from pipeline.obuilder.setup import open_sandbox
from pipeline.obuilder.stores import DIRECTORY_KINDS, KINDS, open_store

PAIRS = ["runc-btrfs", "runc-xfs", "runc-overlayfs", "runc-rsync", "runc-rsync-hardlink",
         f"docker-{DOCKER_ENGINE}"]
"""`SANDBOX-STORE`: each runc pair on a store of that kind (`KIND` or `KIND-MODE`); the docker
pair on the docker store, in that engine."""
FAR_FUTURE = datetime(3000, 1, 1, tzinfo=UTC)


class Backend:
    """A store (with its result table, on a fake clock) and the sandbox paired with it."""

    def __init__(self, store: DbStore, sandbox: Sandbox, fetcher: LocalFetcher) -> None:
        self.store = store
        self.sandbox = sandbox
        self.fetcher = fetcher

    def builder(self) -> Builder:
        """A new builder on the pair (knowing nothing in memory of earlier builds)."""
        return Builder(self.store, self.sandbox, self.fetcher)

    def containers(self) -> list[str]:
        """The containers the pair has now, running or not."""
        backend = self.store.store
        if backend.kind == "docker":
            return engine_things(backend.names)["containers"]  # type: ignore[attr-defined]
        listing = subprocess.run(["runc", "--root", str(self.store.state_dir / "sandbox" / "runc"),
                                  "list", "-q"], check=True, capture_output=True, text=True)
        return listing.stdout.split()


@pytest.fixture(params=PAIRS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path,
                  busybox_images: Path) -> AsyncIterator[Backend]:
    sandbox_kind, _, kind = request.param.partition("-")
    root = new_store_root("docker" if sandbox_kind == "docker" else kind, request, tmp_path)
    name, _, mode = kind.partition("-")
    spec = f"docker:{root.name}" if sandbox_kind == "docker" else f"{name}:{root}"
    engine = kind if sandbox_kind == "docker" else None
    store = DbStore(open_store(spec, rsync_mode=mode or "copy", engine=engine), clock=Clock())
    await store.clean()
    sandbox = open_sandbox(store.root)
    yield Backend(store, sandbox, LocalFetcher(busybox_images))
    sandbox.close()
    store.close()


def outcomes(output: str) -> list[str]:
    """`saved` or `using` for each step of a build's output, in order."""
    return re.findall(r"^---> (saved|using) ", output, re.MULTILINE)


# --- Cache hits, failures, deleting and pruning ---------------------------------------------------


async def test_a_cache_hit_replays_the_log(backend: Backend, context: Path) -> None:
    result, first = await build(backend.builder(), THREE_STEPS, context)
    assert re.fullmatch(
        r"\(from busybox\)\n"
        r"unpacked busybox\.tar \(sha256:[0-9a-f]{64}\)\n"
        rf"---> saved as {ID}\n"
        r'/src: \(run \(shell "echo step one; echo one > /one"\)\)\n'
        r"step one\n"
        rf"---> saved as {ID}\n"
        r"/src: \(copy \(src hello\.txt\) \(dst \./\)\)\n"
        rf"---> saved as {ID}\n"
        r'/src: \(run \(shell "cat /one hello\.txt > both; cat both"\)\)\n'
        r"one\nhello\n"
        rf'---> saved as "{result}"\n', first)
    assert backend.store.log_file(result).read_text() == "one\nhello\n"
    # A new builder knows nothing in memory: the store alone answers.
    again, second = await build(backend.builder(), THREE_STEPS, context)
    assert again == result
    assert second == re.sub(rf"---> saved as ({ID})", r"---> using \1 from cache", first)


async def test_a_failed_step_is_not_saved(backend: Backend, context: Path) -> None:
    spec = '((from busybox) (run (shell "echo before")) (run (shell "echo attempt; exit 3")))'
    message = 'step /: (run (shell "echo attempt; exit 3")) failed: command exited with status 3'
    for attempt in range(2):
        output = RecordingLog()
        with pytest.raises(BuildError) as info:
            await backend.builder().build(S.parse(spec), context, log=output)
        assert str(info.value) == message
        assert output.text.endswith('/: (run (shell "echo attempt; exit 3"))\nattempt\n')
        assert outcomes(output.text) == (["using"] * 2 if attempt else ["saved"] * 2)
    assert len(await backend.store.results()) == 2


def chain(*names: str) -> str:
    return "((from busybox) " + " ".join(f'(run (shell "echo {n} > /{n}"))' for n in names) + ")"


async def test_deleting_a_result_deletes_what_was_built_on_it(backend: Backend,
                                                               context: Path) -> None:
    builder = backend.builder()
    ids = {}
    for names in ("a", "ab", "abc", "ad"):
        ids[names], _ = await build(builder, chain(*names), context)
    # b's result, then c's built on it.
    assert await backend.store.delete(ids["ab"]) == [ids["abc"], ids["ab"]]
    left = await backend.store.results()
    assert ids["a"] in left and ids["ad"] in left
    assert ids["ab"] not in left and ids["abc"] not in left
    _, output = await build(backend.builder(), chain(*"abc"), context)
    assert outcomes(output) == ["using", "using", "saved", "saved"]


async def test_prune_removes_the_least_recently_used_results_first(backend: Backend,
                                                                     context: Path) -> None:
    builder = backend.builder()
    x, _ = await build(builder, chain("x"), context)
    y, _ = await build(builder, chain("y"), context)  # the base is used again: after x
    assert await backend.store.prune(FAR_FUTURE, limit=1) == [x]
    # Then y, then the base, which has no children left.
    assert (await backend.store.prune(FAR_FUTURE))[0] == y
    assert await backend.store.results() == []
    _, output = await build(backend.builder(), chain("x"), context)
    assert outcomes(output) == ["saved", "saved"]


# --- Shared steps and cancellation ----------------------------------------------------------------


async def test_concurrent_builds_share_a_step(backend: Backend, context: Path,
                                              gate: Gate) -> None:
    builder = backend.builder()
    outputs = [RecordingLog(), RecordingLog()]
    specs = [f'((from busybox) {gated(gate, "A")} (run (shell "echo {n} > /{n}; cat /{n}")))'
             for n in "BC"]
    builds = [asyncio.create_task(builder.build(S.parse(s), context, log=o))
              for s, o in zip(specs, outputs, strict=True)]
    for output in outputs:
        await output.wait_for("A starts\n")
    await gate.until(lambda: gate.calls["A"] == 1)
    gate.open()
    async with asyncio.timeout(HANG_GUARD):
        await asyncio.gather(*builds)
    assert gate.calls == {"A": 1}
    shared = [re.search(rf"A starts\npassed\n---> saved as ({ID})\n", o.text) for o in outputs]
    assert shared[0] and shared[1] and shared[0][1] == shared[1][1]
    for name, output in zip("BC", outputs, strict=True):
        assert f"\n{name}\n---> saved as" in output.text


async def test_cancelling_a_build_kills_its_container(backend: Backend, context: Path,
                                                      gate: Gate) -> None:
    spec = f"((from busybox) {gated(gate, 'K')})"
    running = asyncio.create_task(backend.builder().build(S.parse(spec), context,
                                                          log=RecordingLog()))
    await gate.until(lambda: gate.calls["K"] == 1)
    assert len(backend.containers()) == 1
    running.cancel()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(asyncio.CancelledError):
            await running
    # The process calling the gate is dead, and its container gone.
    await gate.until(lambda: gate.hung_up["K"] == 1)
    assert backend.containers() == []
    gate.open()
    _, output = await build(backend.builder(), spec, context)
    assert gate.calls["K"] == 2
    assert outcomes(output) == ["using", "saved"]


# --- copy, users, workdirs ------------------------------------------------------------------------


async def test_copy_writes_the_manifest_owned_by_the_user(backend: Backend,
                                                          context: Path) -> None:
    # The directories on the way that exist stay as they are; those missing are the user's.
    spec = """((from busybox)
 (user (name opam))
 (workdir /home/opam)
 (copy (src src hello.txt) (dst app/) (exclude _build))
 (copy (src hello.txt) (dst /tmp/new/deeper/))
 (run (shell "stat -c '%A %u:%g %n' app app/* app/src/* /tmp /tmp/new /tmp/new/deeper/*
              ls app/src")))"""
    result, output = await build(backend.builder(), spec, context)
    assert ("\ndrwxr-xr-x 1000:1000 app\n"
            "-rw-r--r-- 1000:1000 app/hello.txt\ndrwxr-xr-x 1000:1000 app/src\n"
            "-rw-r--r-- 1000:1000 app/src/main.ml\n-rwxr-xr-x 1000:1000 app/src/run.sh\n"
            "drwxrwxrwt 0:0 /tmp\ndrwxr-xr-x 1000:1000 /tmp/new\n"
            "-rw-r--r-- 1000:1000 /tmp/new/deeper/hello.txt\n"
            "main.ml\nrun.sh\n---> saved as") in output
    # An excluded file does not change the step; a copied one does.
    (context / "src" / "_build" / "main.exe").write_text("rebuilt\n")
    assert (await build(backend.builder(), spec, context))[0] == result
    (context / "src" / "main.ml").write_text("changed\n")
    changed, output = await build(backend.builder(), spec, context)
    assert changed != result
    assert outcomes(output) == ["using", "saved", "saved", "saved"]


async def test_copy_from_a_stage(backend: Backend, context: Path) -> None:
    spec = """((build tools
  ((from busybox)
   (run (shell "mkdir -p /out/lib && echo built > /out/tool && ln -s ../tool /out/lib/t"))))
 (from busybox)
 (copy (from (build tools)) (src out/tool out/lib) (dst /usr/bin/))
 (run (shell "cat /usr/bin/tool; readlink /usr/bin/lib/t")))"""
    _, output = await build(backend.builder(), spec, context)
    assert "\nbuilt\n../tool\n---> saved as" in output
    assert output.index('(run (shell "mkdir -p /out') < output.index("(copy (from (build tools))")


async def test_copy_through_a_planted_symlink_stays_in_the_rootfs(
        backend: Backend, context: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "f").write_text("precious\n")
    before = snapshot(victim)
    # The link's target exists in the rootfs too: that is where the file must land.
    spec = f"""((from busybox)
 (run (shell "mkdir -p {victim} && ln -s {victim} /dst"))
 (copy (src hello.txt) (dst /dst/f))
 (run (shell "cat {victim}/f")))"""
    _, output = await build(backend.builder(), spec, context)
    assert "\nhello\n---> saved as" in output
    assert snapshot(victim) == before


async def test_a_user_name_is_looked_up_in_the_rootfs(backend: Backend, context: Path,
                                                      tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("intruder:x:4242:4242::/:/bin/sh\n")
    builder = backend.builder()
    _, output = await build(builder, '((from busybox) (user (name opam)) (run (shell "id")))',
                            context)
    # The engines also give the user the groups /etc/group lists it in (its own here).
    assert re.search(r"\nuid=1000\(opam\) gid=1000\(opam\)( groups=1000\(opam\))?\n", output)
    move = "mv /etc/passwd /etc/passwd.real"
    cases = [
        ("(run (shell true))", "nemo", "user 'nemo' not found in /etc/passwd"),
        (f'(run (shell "{move} && ln -s {tmp_path}/passwd /etc/passwd"))', "intruder",
         "cannot look up user 'intruder': no /etc/passwd"),
        ("(run (shell \"echo 'odd:x:²:0::/:/bin/sh' >> /etc/passwd\"))", "odd",
         "cannot look up user 'odd': bad uid or gid in /etc/passwd"),
    ]
    # (A FIFO as /etc/passwd is refused by the runc pair, test_escape.py; podman itself hangs
    # reading it to set up any container of such an image: README, the docker backend.)
    for step, user, message in cases:
        with pytest.raises(BuildError) as info:
            await build(builder, f'((from busybox) {step} (user (name {user})) (run (shell id)))',
                        context)
        assert str(info.value) == f"step /: (run (shell id)) failed: {message}"
    # A symlink inside the rootfs is followed as the command would see it.
    spec = f"""((from busybox)
 (run (shell "{move} && ln -s passwd.real /etc/passwd"))
 (user (name opam)) (run (shell "id -u")))"""
    _, output = await build(builder, spec, context)
    assert "\n1000\n---> saved as" in output


async def test_a_missing_workdir_is_made_by_root(backend: Backend, context: Path) -> None:
    spec = """((from busybox) (workdir /new/dir) (user (uid 1000) (gid 1000))
 (run (shell "pwd; stat -c '%u:%g %a %n' /new/dir /new")))"""
    _, output = await build(backend.builder(), spec, context)
    assert "\n/new/dir\n0:0 755 /new/dir\n0:0 755 /new\n---> saved as" in output


# --- caches, secrets, network ---------------------------------------------------------------------


async def test_caches_are_owned_by_the_user_and_persist(backend: Backend,
                                                        context: Path) -> None:
    builder = backend.builder()
    write = """((from busybox) (user (uid 1000) (gid 1000))
 (run (cache (downloads (target /home/opam/dl)))
      (shell "stat -c %u:%g /home/opam/dl; echo fetched > /home/opam/dl/pkg")))"""
    _, output = await build(builder, write, context)
    assert "\n1000:1000\n" in output
    # Not part of the result; there for the next build.
    _, output = await build(builder, write[:-1] + ' (run (shell "cat /home/opam/dl/pkg || '
                            'echo not kept")))', context)
    assert "\nnot kept\n" in output
    read = ('((from busybox) (user (uid 1000) (gid 1000))'
            ' (run (cache (downloads (target /dl))) (shell "cat /dl/pkg")))')
    _, output = await build(builder, read, context)
    assert "\nfetched\n" in output


async def test_secrets_are_mounted_read_only_and_never_kept(backend: Backend,
                                                            context: Path) -> None:
    value = f"s3cr3t-{secrets.token_hex(8)}"
    spec = """((from busybox) (user (uid 1000) (gid 1000))
 (run (secrets (token (target /run/secrets/token)))
      (shell "stat -c '%a %u:%g' /run/secrets/token; sha256sum /run/secrets/token
              echo x 2>/dev/null > /run/secrets/token || echo ro")))"""
    builder = backend.builder()
    _, output = await build(builder, spec, context, secrets={"token": value.encode()})
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert f"\n400 1000:1000\n{digest}  /run/secrets/token\nro\n" in output
    assert value not in output
    # Every file of the result's rootfs (its own filesystem: not /proc) is searched.
    search = (f'(user (uid 0) (gid 0)) (run (shell "find / -xdev -type f | xargs grep -l '
              f'{value}; echo searched")))')
    _, output = await build(builder, spec[:-1] + "\n " + search, context,
                            secrets={"token": value.encode()})
    found = re.search(r'echo searched"\)\)\n(.*)---> saved as', output, re.DOTALL)
    assert found is not None and found[1] == "searched\n"


async def test_no_network_without_network_host(backend: Backend, context: Path,
                                               gate: Gate) -> None:
    gate.open()
    interfaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
    isolated = (f'((from busybox) (run (shell "{interfaces}"))'
                f' (run (shell "{gate.call("isolated")} || echo unreachable")))')
    builder = backend.builder()
    _, output = await build(builder, isolated, context)
    assert f'/: (run (shell "{interfaces}"))\nlo\n---> saved as' in output
    assert "unreachable" in output
    assert gate.calls["isolated"] == 0
    await build(builder, f"((from busybox) (run (network host) (shell \"{gate.call('host')}\")))",
                context)
    assert gate.calls["host"] == 1


def test_every_kind_of_store_is_in_a_pair() -> None:
    runc = {pair.removeprefix("runc-").partition("-")[0] for pair in PAIRS
            if pair.startswith("runc-")}
    assert runc == set(DIRECTORY_KINDS)
    assert set(KINDS) - runc == {"docker"} and f"docker-{DOCKER_ENGINE}" in PAIRS
