"""The builder over the real runc sandbox and real stores (each wrapped in a `DbStore`): what
only the runc pairs show (a result's rootfs on the host, the builder's rules under load). What
every store/sandbox pair must do, runc's included, is in `test_backends.py`.

Steps that must overlap in time are held by a `Gate` (`gate.py`): a small HTTP server on the
host that a step with `(network host)` calls with busybox's `wget`. The gate counts the calls
(so a test knows how many times a step really ran), holds its answer until the test opens it,
and notices when a caller hangs up (so a test knows the sandboxed process was killed). Nothing
waits for time to pass.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import stat
import tarfile
from pathlib import Path

import pytest
from gate import Gate, gated
from obuilder_fixtures import HANG_GUARD, STORE_FILESYSTEMS, RecordingLog, new_store_root

from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.local import DEFAULT_ENV, LocalFetcher
from pipeline.obuilder.protocols import BuildError, Fetcher
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.stores import open_store

ID = r'"[0-9a-f]{64}"'

# Every kind of store, and rsync's second mode.
STORE_KINDS = [*STORE_FILESYSTEMS, "rsync-hardlink"]
MAIN_KINDS = ["rsync", "btrfs"]


async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> DbStore:
    root = new_store_root(kind, request, tmp_path)
    backend, _, mode = kind.partition("-")
    store = DbStore(open_store(f"{backend}:{root}", rsync_mode=mode or "copy"))
    await store.clean()
    return store


@pytest.fixture(params=MAIN_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> DbStore:
    return await make_store(request.param, request, tmp_path)


@pytest.fixture
def fetcher(busybox_images: Path) -> LocalFetcher:
    return LocalFetcher(busybox_images)


@pytest.fixture
def sandbox(tmp_path: Path) -> RuncSandbox:
    return RuncSandbox(tmp_path / "runc")


@pytest.fixture
def builder(store: DbStore, sandbox: RuncSandbox, fetcher: LocalFetcher) -> Builder:
    return Builder(store, sandbox, fetcher)


async def build(builder: Builder, text: str, context: Path, **options: object) -> tuple[str, str]:
    """Build the spec `text`; its result id and output."""
    output = RecordingLog()
    async with asyncio.timeout(HANG_GUARD):
        result = await builder.build(S.parse(text), context, log=output, **options)  # type: ignore[arg-type]
    return result, output.text


async def rootfs(store: DbStore, id: str) -> Path:
    result = await store.result(id)
    assert result is not None
    return result / "rootfs"


# --- Cache hits, bases, failures -----------------------------------------------------------------

THREE_STEPS = """((from busybox)
 (workdir /src)
 (run (shell "echo step one; echo one > /one"))
 (copy (src hello.txt) (dst ./))
 (run (shell "cat /one hello.txt > both; cat both")))"""


async def test_a_build_on_a_base_reuses_its_steps(builder: Builder, store: DbStore,
                                                  context: Path) -> None:
    base, _ = await build(builder, THREE_STEPS, context)
    extended = THREE_STEPS[:-1] + '\n (run (shell "wc -l < both > /count")))'
    result, output = await build(builder, extended, context)
    assert output.count("from cache") == 4
    assert output.endswith(f'---> using "{base}" from cache\n/src: (run (shell "wc -l < both > '
                           f'/count"))\n---> saved as "{result}"\n')
    root = await rootfs(store, result)
    assert (root / "count").read_text().strip() == "2"
    assert (root / "one").read_text() == "one\n"


async def test_step_ids_cover_every_input(builder: Builder, context: Path) -> None:
    base = '((from busybox) {} (run {} (shell "true")))'
    variants = [
        base.format("", ""),
        base.format("(workdir /tmp)", ""),
        base.format("(user (uid 1000) (gid 1000))", ""),
        base.format("(user (name opam))", ""),
        base.format("(env A b)", ""),
        base.format("(shell /bin/sh -ec)", ""),
        base.format("", "(network host)"),
        base.format("", "(secrets (s (target /s)))"),
        base.format("", "(secrets (s (target /t)))"),
    ]
    ids = [(await build(builder, v, context, secrets={"s": b"x"}))[0] for v in variants]
    assert len(set(ids)) == len(ids)
    # Not part of the key: comments, caches and secret values.
    same = [
        base.format("(comment hello)", ""),
        base.format("", "(cache (c (target /c)))"),
    ]
    assert [(await build(builder, v, context))[0] for v in same] == [ids[0]] * 2
    other_value, _ = await build(builder, variants[7], context, secrets={"s": b"y"})
    assert other_value == ids[7]


# --- Shared steps, concurrent failure, cancellation ----------------------------------------------


async def test_concurrent_builds_share_a_failure(builder: Builder, context: Path,
                                                 gate: Gate) -> None:
    spec = f"((from busybox) {gated(gate, 'F', then='exit 4')})"
    outputs = (RecordingLog(), RecordingLog())
    builds = [asyncio.create_task(builder.build(S.parse(spec), context, log=o)) for o in outputs]
    for output in outputs:
        await output.wait_for("F starts\n")
    gate.open()
    async with asyncio.timeout(HANG_GUARD):
        errors = await asyncio.gather(*builds, return_exceptions=True)
    assert gate.calls == {"F": 1}
    assert all(isinstance(e, BuildError) for e in errors)
    assert str(errors[0]) == str(errors[1])
    # One line, even for an op printed over several.
    assert str(errors[0]) == (f'step /: (run (network host) (shell "echo F starts; '
                              f'{gate.call("F")}; exit 4")) failed: command exited with status 4')


async def cancel(task: asyncio.Task[str]) -> None:
    task.cancel()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_cancelling_one_of_two_builds_keeps_the_step(builder: Builder, store: DbStore,
                                                           context: Path, gate: Gate) -> None:
    spec = S.parse(f"((from busybox) {gated(gate, 'T')})")
    outputs = (RecordingLog(), RecordingLog())
    first, second = (asyncio.create_task(builder.build(spec, context, log=o)) for o in outputs)
    for output in outputs:
        await output.wait_for("T starts\n")
    await cancel(first)
    assert gate.hung_up["T"] == 0
    gate.open()
    async with asyncio.timeout(HANG_GUARD):
        result = await second
    assert gate.calls == {"T": 1} and gate.hung_up["T"] == 0
    assert outputs[1].text.endswith(f'T starts\npassed\n---> saved as "{result}"\n')


async def test_cancelling_both_builds_kills_the_shared_step(builder: Builder, context: Path,
                                                            gate: Gate) -> None:
    spec = S.parse(f"((from busybox) {gated(gate, 'U')})")
    outputs = (RecordingLog(), RecordingLog())
    first, second = (asyncio.create_task(builder.build(spec, context, log=o)) for o in outputs)
    for output in outputs:
        await output.wait_for("U starts\n")
    await cancel(first)
    await cancel(second)
    await gate.until(lambda: gate.hung_up["U"] == 1)
    gate.open()
    await build(builder, f"((from busybox) {gated(gate, 'U')})", context)
    assert gate.calls["U"] == 2


# --- copy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "message"), [
    ("src/../hello.txt", 'copy: source "src/../hello.txt" contains ".."'),
    ("link/main.ml", 'copy: source "link/main.ml" passes through the symlink "link"'),
    ("missing.txt", 'copy: source "missing.txt" not found'),
])
async def test_copy_rules_fail_the_build(builder: Builder, context: Path, src: str,
                                         message: str) -> None:
    (context / "link").symlink_to("src")
    with pytest.raises(BuildError) as info:
        await build(builder, f"((from busybox) (copy (src {src}) (dst /x/)))", context)
    assert str(info.value) == message


# --- caches, secrets, network --------------------------------------------------------------------


async def test_two_concurrent_writers_of_a_cache_last_release_wins(
        builder: Builder, store: DbStore, context: Path, gate: Gate) -> None:
    def spec(name: str) -> str:
        return (f'((from busybox) (run (cache (shared (target /c))) (network host)'
                f' (shell "echo {name} >> /c/log; {gate.call(name)}")))')

    builds = [asyncio.create_task(builder.build(S.parse(spec(n)), context, log=RecordingLog()))
              for n in ("one", "two")]
    # Each writer has its own copy (both started from the empty cache) before either ends.
    await gate.until(lambda: gate.calls["one"] == gate.calls["two"] == 1)
    gate.open()
    async with asyncio.timeout(HANG_GUARD):
        await asyncio.gather(*builds)
    async with store.cache("shared", 0, 0) as cache:
        assert (cache / "log").read_text() in ("one\n", "two\n")


async def test_a_missing_secret_is_named(builder: Builder, context: Path) -> None:
    spec = '((from busybox) (run (secrets (token (target /t))) (shell "true")))'
    with pytest.raises(BuildError, match=r"failed: no value given for secret 'token'$"):
        await build(builder, spec, context)


# --- Stress --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_stress_random_builds_share_and_agree(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest, sandbox: RuncSandbox,
        fetcher: LocalFetcher, context: Path, gate: Gate) -> None:
    """50 random 4-step builds, at most 8 at once, over 3 choices per step: many share
    prefixes, and run into each other while running them. Every step must run exactly once
    and every result hold exactly its own steps."""
    store = await make_store(kind, request, tmp_path)
    builder = Builder(store, sandbox, fetcher)
    gate.open()
    rng = random.Random(1234)
    plans = [tuple(rng.randrange(3) for _ in range(4)) for _ in range(50)]
    limit = asyncio.Semaphore(8)

    def step(prefix: tuple[int, ...]) -> str:
        name = "s" + "".join(map(str, prefix))
        return f'(run (network host) (shell "echo {name} >> /trace; {gate.call(name)}"))'

    async def one(plan: tuple[int, ...]) -> tuple[str, str]:
        spec = "((from busybox) " + " ".join(step(plan[:i + 1]) for i in range(4)) + ")"
        async with limit:
            return await build(builder, spec, context)

    results = await asyncio.gather(*(one(plan) for plan in plans))
    prefixes = {plan[:i + 1] for plan in plans for i in range(4)}
    assert gate.calls == {"s" + "".join(map(str, p)): 1 for p in prefixes}
    for plan, (result, output) in zip(plans, results, strict=True):
        trace = (await rootfs(store, result) / "trace").read_text().split()
        assert trace == ["s" + "".join(map(str, plan[:i + 1])) for i in range(4)]
        assert output.count("---> ") == 5


# --- The local fetcher ---------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def member(name: str, type: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_local_fetcher_implements_the_protocol(fetcher: LocalFetcher) -> None:
    assert isinstance(fetcher, Fetcher)


async def test_local_fetcher_names_the_files_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        await LocalFetcher(tmp_path).fetch("ocaml/opam:debian-12", tmp_path / "r",
                                           log=RecordingLog())
    assert str(info.value) == (f"unknown image 'ocaml/opam:debian-12': no "
                               f"{tmp_path}/ocaml_opam_debian-12.tar or "
                               f"{tmp_path}/ocaml_opam_debian-12.tar.gz")


async def test_local_fetcher_preserves_owners_modes_links_and_devices(tmp_path: Path) -> None:
    make_tar(tmp_path / "ocaml_opam_5.tar.gz", [
        (member("./", tarfile.DIRTYPE, mode=0o755), b""),
        (member("./tmp", tarfile.DIRTYPE, mode=0o1777), b""),
        (member("./bin/su", mode=0o4755), b"#!/bin/sh\n"),
        (member("./home/opam/f", uid=1000, gid=1000, mode=0o600), b"mine\n"),
        (member("./bin/sh", tarfile.SYMTYPE, linkname="/bin/su"), b""),
        (member("./bin/su2", tarfile.LNKTYPE, linkname="bin/su", mode=0o4755), b""),
        (member("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
    ])
    (tmp_path / "ocaml_opam_5.env").write_text("# comment\nPATH=/bin\nHOME=/home/opam\n")
    root = tmp_path / "rootfs"
    root.mkdir()
    info = await LocalFetcher(tmp_path).fetch("ocaml/opam:5", root, log=RecordingLog())
    assert info.env == {"PATH": "/bin", "HOME": "/home/opam"}
    assert info.digest is not None and info.digest.startswith("sha256:")
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "bin" / "su").stat().st_mode) == 0o4755
    owned = (root / "home" / "opam" / "f").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1000, 0o600)
    assert os.readlink(root / "bin" / "sh") == "/bin/su"
    assert (root / "bin" / "su2").stat().st_ino == (root / "bin" / "su").stat().st_ino
    device = (root / "dev" / "null").lstat()
    assert stat.S_ISCHR(device.st_mode) and os.major(device.st_rdev) == 1


async def test_local_fetcher_defaults_the_path(busybox_images: Path, tmp_path: Path) -> None:
    info = await LocalFetcher(busybox_images).fetch("busybox", tmp_path, log=RecordingLog())
    assert info.env == DEFAULT_ENV
    assert (tmp_path / "bin" / "busybox").is_file()


@pytest.mark.parametrize(("members", "message"), [
    ([member("../evil")], "image member '../evil' escapes the rootfs"),
    ([member("a/../../evil")], "image member 'a/../../evil' escapes the rootfs"),
    ([member("etc", tarfile.SYMTYPE, linkname="/"), member("etc/evil")],
     "image member 'etc/evil' passes through the symlink /etc"),
    ([member("x", tarfile.LNKTYPE, linkname="../../etc/passwd")],
     "image member 'x' escapes the rootfs"),
])
async def test_local_fetcher_refuses_members_escaping_the_rootfs(
        tmp_path: Path, members: list[tarfile.TarInfo], message: str) -> None:
    make_tar(tmp_path / "evil.tar", [(m, b"x" if m.isreg() else b"") for m in members])
    root = tmp_path / "deep" / "rootfs"
    root.mkdir(parents=True)
    with pytest.raises(BuildError) as info:
        await LocalFetcher(tmp_path).fetch("evil", root, log=RecordingLog())
    assert str(info.value) == message
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


async def test_local_fetcher_replaces_a_symlink_rather_than_writing_through_it(
        tmp_path: Path) -> None:
    target = tmp_path / "host-file"
    target.write_text("host\n")
    make_tar(tmp_path / "img.tar", [(member("f", tarfile.SYMTYPE, linkname=str(target)), b""),
                                    (member("f"), b"image\n")])
    root = tmp_path / "rootfs"
    root.mkdir()
    await LocalFetcher(tmp_path).fetch("img", root, log=RecordingLog())
    assert target.read_text() == "host\n"
    assert (root / "f").read_text() == "image\n"
