"""The docker store and sandbox on real podman, beyond what every pair does (`test_backends.py`,
`test_stores.py`): the command line, results as images, caches as volumes, secrets in no image,
cleaning after a killed process, prefixes and engines refused with a line saying what to do.

Every store has a fresh prefix and its own state directory (`new_docker_root`); what it puts in
the engine is removed when the test ends.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gate import Gate
from obuilder_fixtures import (
    DOCKER_ENGINE,
    HANG_GUARD,
    RecordingLog,
    engine_things,
    new_docker_root,
)
from test_builder import build
from test_obuilder_cli import GOT, ROOT, obuilder

from pipeline.obuilder.builder import Builder
from pipeline.obuilder.container_engine import (
    STATE_ENV,
    ContainerEngine,
    Names,
    escape,
    summary,
)
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.local import LocalFetcher
from pipeline.obuilder.full_store import store_spec
from pipeline.obuilder.protocols import (
    STATE_DIR,
    BuildError,
    MissingTool,
    Sandbox,
    SandboxConfig,
    Store,
)
from pipeline.obuilder.sandboxes.docker import DockerSandbox
from pipeline.obuilder.setup import open_sandbox
from pipeline.obuilder.stores import open_store
from pipeline.obuilder.stores.docker import DockerStore
from pipeline.primitives.obuilder import resolve_store


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The root of a docker store not made yet."""
    return new_docker_root(request, tmp_path)


@pytest.fixture
async def store(root: Path) -> AsyncIterator[DbStore]:
    store = DbStore(DockerStore(root.name, root.parent, DOCKER_ENGINE))
    await store.clean()
    yield store
    store.close()


@pytest.fixture
def builder(store: DbStore, busybox_images: Path) -> Builder:
    return Builder(store, open_sandbox(store.root), LocalFetcher(busybox_images))


def image_bytes(image: str) -> bytes:
    """The whole filesystem of `image`, as `ENGINE export` gives it."""
    container = subprocess.run([DOCKER_ENGINE, "create", "--pull", "never", image, "true"],
                               check=True, capture_output=True, text=True).stdout.strip()
    try:
        return subprocess.run([DOCKER_ENGINE, "export", container], check=True,
                              capture_output=True).stdout
    finally:
        subprocess.run([DOCKER_ENGINE, "rm", "-f", container], check=True, capture_output=True)


# --- The command line -----------------------------------------------------------------------------


THREE_STEPS = """((from busybox)
 (workdir /src)
 (copy (src hello.txt) (dst ./))
 (run (cache (seen (target /seen))) (shell "cp hello.txt /seen/; cp hello.txt /out.txt"))
 (run (shell "echo done: $(cat /out.txt)")))"""


def test_the_cli_builds_three_steps_then_replays_every_step(
        context: Path, busybox_images: Path, root: Path, tmp_path: Path) -> None:
    spec = tmp_path / "build.spec"
    spec.write_text(THREE_STEPS)
    store = ["--store", f"docker:{root.name}"]
    args = ["build", "-f", spec, context, *store, "--image-dir", busybox_images]
    first = obuilder(*args, "--engine", DOCKER_ENGINE)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert GOT.match(lines[-1]) and "done: hello" in lines
    saved = re.findall(r'---> saved as "([0-9a-f]{64})"', first.stdout)
    assert len(saved) == 4
    # The store keeps its engine: no --engine needed any more.
    second = obuilder(*args)
    assert second.returncode == 0, second.stderr
    again = second.stdout.splitlines()
    assert again[-1] == lines[-1] and "done: hello" in again
    assert re.findall(r'---> using "([0-9a-f]{64})" from cache', second.stdout) == saved
    assert "---> saved" not in second.stdout
    # Each result is an image tagged with its step id.
    assert engine_things(Names(root.name)) == {
        "containers": [], "volumes": [f"{root.name}-Cache-seen"],
        "images": sorted(f"localhost/{root.name}:{id}" for id in saved)}
    health = obuilder("healthcheck", *store)
    assert health.returncode == 0, health.stderr
    assert f"engine: {DOCKER_ENGINE} (" in health.stdout
    df = obuilder("df", *store)
    assert df.returncode == 0 and "GiB used of" in df.stdout
    assert obuilder("clean", *store).returncode == 0
    deleted = obuilder("delete", saved[2], *store)
    assert deleted.returncode == 0, deleted.stderr
    assert set(re.findall(r"deleted ([0-9a-f]{64})", deleted.stdout)) == {saved[2], saved[3]}
    assert engine_things(Names(root.name))["images"] == sorted(
        f"localhost/{root.name}:{id}" for id in saved[:2])
    # A local image is fetched again: the base goes, with everything built on it.
    pulled = obuilder("pull", "busybox", *store, "--image-dir", busybox_images)
    assert pulled.returncode == 0, pulled.stderr
    assert re.findall(r"deleted ([0-9a-f]{64})", pulled.stdout) == [saved[1], saved[0]]
    third = obuilder(*args)
    assert third.returncode == 0, third.stderr
    assert re.findall(r"^---> (saved|using)", third.stdout, re.MULTILINE) == [
        "using", "saved", "saved", "saved"]
    pruned = obuilder("prune", *store, "--before", "2999-01-01T00:00:00")
    assert pruned.returncode == 0 and "4 results deleted" in pruned.stdout
    assert engine_things(Names(root.name))["images"] == []


def test_option_mistakes_are_usage_errors(tmp_path: Path) -> None:
    spec, context = tmp_path / "build.spec", tmp_path / "context"
    engine_elsewhere = obuilder("df", "--store", f"rsync:{tmp_path}", "--engine", "podman")
    assert engine_elsewhere.returncode == 2
    assert "--engine applies to docker stores" in engine_elsewhere.stderr
    fast = obuilder("build", "-f", spec, context, "--store", "docker:pipeline-test",
                    "--fast-sync")
    assert fast.returncode == 2 and "--fast-sync is for the runc sandbox" in fast.stderr
    other = obuilder("df", "--store", "docker:pipeline-test", "--engine", "lxc")
    assert other.returncode == 2 and "invalid choice: 'lxc'" in other.stderr


@pytest.mark.parametrize("prefix", ["", "Upper", "a/b", "../x", "x-", "-x", "a..b", "a:b",
                                    "localhost/x", "x\n", "a" * 65])
def test_a_prefix_that_cannot_name_images_is_refused(prefix: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    expected = "expected KIND:PATH" if not prefix else "invalid docker store prefix"
    with pytest.raises(BuildError, match=expected):
        open_store(f"docker:{prefix}", engine=DOCKER_ENGINE)
    assert not (tmp_path / "state").exists()
    if prefix:
        refused = obuilder("df", "--store", f"docker:{prefix}")
        assert refused.returncode == 1
        assert refused.stderr.startswith("pipeline obuilder: invalid docker store prefix")
        assert refused.stderr.count("\n") == 1


def test_an_unreachable_or_missing_docker_says_to_use_podman(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker's client is installed here, its engine not running.
    env = {key: value for key, value in os.environ.items() if key != "DOCKER_HOST"}
    down = obuilder("df", "--store", f"docker:{root.name}", "--engine", "docker", env=env)
    assert down.returncode == 1
    assert down.stderr.startswith("pipeline obuilder: the docker engine is not reachable (")
    assert down.stderr.endswith("(apt-get install docker.io provides it), or use --engine "
                                "podman\n")
    assert down.stderr.count("\n") == 1
    assert not root.exists()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool, match=r"^docker not found: apt-get install docker\.io, or "
                                          r"use --engine podman$"):
        DockerStore(root.name, root.parent, "docker")
    with pytest.raises(MissingTool, match=r"^podman not found: apt-get install podman$"):
        ContainerEngine("podman")


def test_an_unusable_state_directory_is_one_line(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "file"))
    with pytest.raises(BuildError, match=rf"^cannot make the state directory of store "
                                         rf"docker:pipeline-test in {tmp_path}/file: Not a "
                                         rf"directory \(set {STATE_ENV} to a directory root can "
                                         rf"write\)$"):
        open_store("docker:pipeline-test", engine=DOCKER_ENGINE)


async def test_a_store_keeps_the_engine_it_was_made_with(store: DbStore, root: Path) -> None:
    assert (root / STATE_DIR / "engine").read_text() == f"{DOCKER_ENGINE}\n"
    other = "docker" if DOCKER_ENGINE == "podman" else "podman"
    with pytest.raises(BuildError, match=rf"^the images of store docker:{root.name} are in "
                                         rf"{DOCKER_ENGINE}, not {other}: use --engine "
                                         rf"{DOCKER_ENGINE} \(or another prefix\)$"):
        DockerStore(root.name, root.parent, other)
    reopened = DockerStore(root.name, root.parent)
    assert reopened.engine.name == DOCKER_ENGINE
    reopened.close()


# --- The store ------------------------------------------------------------------------------------


async def test_the_store_is_named_by_its_prefix(store: DbStore, root: Path) -> None:
    assert isinstance(store, Store) and isinstance(store.store, Store)
    assert store.kind == "docker" and store.root == root
    assert store_spec(store) == f"docker:{root.name}"
    assert store.state_dir == root / STATE_DIR
    for directory in ("result", "result-tmp", STATE_DIR):
        assert stat.S_IMODE((root / directory).stat().st_mode) == 0o700
    assert not (root / "cache").exists()
    assert resolve_store(f"docker:{root.name}", Path("/state")) == f"docker:{root.name}"


async def test_df_is_the_engines_filesystem(store: DbStore) -> None:
    storage = subprocess.run([DOCKER_ENGINE, "info", "--format", "{{.Store.GraphRoot}}"],
                             check=True, capture_output=True, text=True).stdout.strip()
    usage = await store.df()
    assert usage.total == shutil.disk_usage(storage).total
    assert 0 < usage.free <= usage.total


async def test_a_result_is_its_image_and_its_metadata(builder: Builder, store: DbStore,
                                                      root: Path, tmp_path: Path) -> None:
    (tmp_path / "context").mkdir()
    result, _ = await build(builder, '((from busybox) (run (shell "echo made > /made")))',
                            tmp_path / "context")
    image = f"localhost/{root.name}:{result}"
    shown = subprocess.run([DOCKER_ENGINE, "run", "--rm", "--pull", "never", "--ulimit",
                            "nofile=1024:1024", "--ulimit", "nproc=4096:4096", image, "cat",
                            "/made"], check=True, capture_output=True, text=True)
    assert shown.stdout == "made\n"
    assert "log" in os.listdir(root / "result" / result)
    assert "rootfs" not in os.listdir(root / "result" / result)
    base = next(id for id in await store.results() if id != result)
    # Either half alone is no result; start-up cleaning removes it (nobody holds its lock).
    subprocess.run([DOCKER_ENGINE, "rmi", image], check=True, capture_output=True)
    assert await store.result(result) is None and result not in await store.results()
    orphan = f"localhost/{root.name}:orphan"
    subprocess.run([DOCKER_ENGINE, "tag", f"localhost/{root.name}:{base}", orphan], check=True,
                   capture_output=True)
    await store.clean()
    assert not (root / "result" / result).exists()
    assert orphan not in engine_things(Names(root.name))["images"]


async def test_steps_on_one_base_built_at_once_each_keep_their_image(
        builder: Builder, store: DbStore, tmp_path: Path) -> None:
    # Each step first names its base's image after itself: podman loses one of two names
    # given to an image at once, unless the store gives them one at a time.
    (tmp_path / "context").mkdir()
    await build(builder, "((from busybox))", tmp_path / "context")
    built = await asyncio.gather(*(
        build(builder, f'((from busybox) (run (shell "echo {n} > /n")))', tmp_path / "context")
        for n in range(8)))
    results = await store.results()
    assert all(id in results for id, _ in built)


def test_cache_names_escape_to_distinct_volume_names() -> None:
    names = ["downloads", "Downloads", "X44ownloads", "a b", "a-b", "a_b", "é", "XC3XA9"]
    escaped = [escape(name) for name in names]
    assert len(set(escaped)) == len(names)
    assert all(re.fullmatch(r"[a-zA-Z0-9_.-]+", name) for name in escaped)


async def test_caches_are_named_volumes(builder: Builder, root: Path, tmp_path: Path) -> None:
    (tmp_path / "context").mkdir()
    spec = ('((from busybox) (run (cache (Down-loads (target /dl)))'
            ' (shell "echo {} >> /dl/log; cat /dl/log")))')
    _, first = await build(builder, spec.format("one"), tmp_path / "context")
    assert "\none\n---> saved" in first
    volume = f"{root.name}-Cache-X44own-loads"
    assert engine_things(Names(root.name))["volumes"] == [volume]
    mountpoint = subprocess.run([DOCKER_ENGINE, "volume", "inspect", "--format",
                                 "{{.Mountpoint}}", volume], check=True, capture_output=True,
                                text=True).stdout.strip()
    assert Path(mountpoint, "log").read_text() == "one\n"
    _, second = await build(builder, spec.format("two"), tmp_path / "context")
    assert "\none\ntwo\n---> saved" in second


async def test_secrets_are_in_no_image_and_no_file_left(builder: Builder, store: DbStore,
                                                        root: Path, tmp_path: Path) -> None:
    (tmp_path / "context").mkdir()
    value = b"s3cr3t-value-" + os.urandom(8).hex().encode()
    spec = """((from busybox)
 (run (secrets (token (target /run/secrets/token))) (shell "cp /run/secrets/token /dev/null")))"""
    result, _ = await build(builder, spec, tmp_path / "context", secrets={"token": value})
    for id in await store.results():
        assert value not in image_bytes(f"localhost/{root.name}:{id}")
    with tarfile.open(fileobj=io.BytesIO(image_bytes(f"localhost/{root.name}:{result}"))) as tar:
        # The engine made the mount point; it stays, empty.
        assert tar.getmember("run/secrets/token").size == 0
    leftovers = [p for p in (root / STATE_DIR / "sandbox").iterdir() if p.name != "owner"]
    assert leftovers == []


async def test_a_listing_that_meets_a_removal_is_asked_for_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client failing as podman's `images` does when an image goes while it lists them,
    # twice, then answering; or failing otherwise.
    client = tmp_path / "podman"
    client.write_text(f"""#!/bin/sh
n=0; [ -f {tmp_path}/calls ] && read n < {tmp_path}/calls; echo $((n + 1)) > {tmp_path}/calls
case "$1:$n" in
  images:0|images:1)
    echo 'Error: retrieving parent of image "f2": reading image "bd": image not known' >&2
    exit 125 ;;
  images:*) echo localhost/p:a ;;
  *) echo 'Error: something else' >&2; exit 125 ;;
esac
""")
    client.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    engine = ContainerEngine("podman")
    assert await engine.tags("localhost/p") == {"localhost/p:a"}
    assert (tmp_path / "calls").read_text() == "3\n"
    with pytest.raises(BuildError, match=r"^podman ps failed: something else$"):
        await engine.containers("p-Run-")
    assert (tmp_path / "calls").read_text() == "4\n"


def test_engine_messages_are_one_line() -> None:
    podman = (b'Error: 1 error occurred:\n\t* copying to container: error during bulk transfer '
              b'for copier.request{Request:"PUT", Directory:"/etc"}: copier: put: error '
              b'creating "/etc/passwd": mkdir /etc/passwd: file exists\n')
    assert summary(podman) == ('copier: put: error creating "/etc/passwd": mkdir /etc/passwd: '
                               'file exists')
    assert summary(b"Error response from daemon: No such image: x\n") == "No such image: x"
    assert summary(b"") == "no message"


# --- A killed process -----------------------------------------------------------------------------


async def started(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)


async def test_clean_removes_what_a_killed_build_left_and_spares_a_live_one(
        root: Path, busybox_images: Path, tmp_path: Path, gate: Gate) -> None:
    context = tmp_path / "context"
    context.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("value\n")
    store = ["--store", f"docker:{root.name}", "--engine", DOCKER_ENGINE]
    # The base first: a process looking up a step that another is building waits for that
    # process's builds on it to end (it holds the step's lock shared meanwhile).
    base = tmp_path / "base.spec"
    base.write_text("((from busybox))")
    assert obuilder("build", "-f", base, context, *store, "--image-dir",
                    busybox_images).returncode == 0
    processes = {}
    for name in ("killed", "live"):
        spec = tmp_path / f"{name}.spec"
        spec.write_text(f"((from busybox) (run (cache (c (target /c))) (secrets (s (target /s)))"
                        f' (network host) (shell "{gate.call(name)}")))')
        processes[name] = await started([
            sys.executable, "-m", "pipeline", "obuilder", "build", "-f", str(spec), str(context),
            *store, "--image-dir", str(busybox_images), "--secret", f"s:{secret}"])
    await gate.until(lambda: gate.calls["killed"] == gate.calls["live"] == 1)
    names = Names(root.name)
    during = engine_things(names)
    assert len(during["containers"]) == 2 and len(during["volumes"]) == 3
    processes["killed"].send_signal(signal.SIGKILL)
    await processes["killed"].wait()
    # The killed build's container runs on until cleaned.
    assert engine_things(names) == during
    cleaned = await started([sys.executable, "-m", "pipeline", "obuilder", "clean", *store])
    async with asyncio.timeout(HANG_GUARD):
        _, errors = await cleaned.communicate()
    assert cleaned.returncode == 0, errors
    after = engine_things(names)
    assert len(after["containers"]) == 1 and after["containers"][0] in during["containers"]
    assert len(after["volumes"]) == 2  # the cache, and the live build's copy
    await gate.until(lambda: gate.hung_up["killed"] == 1)
    assert gate.hung_up["live"] == 0
    gate.open()
    async with asyncio.timeout(HANG_GUARD):
        output, errors = await processes["live"].communicate()
    assert processes["live"].returncode == 0, errors
    assert GOT.match(output.decode().splitlines()[-1])
    final = engine_things(names)
    assert final["containers"] == [] and final["volumes"] == [f"{root.name}-Cache-c"]
    assert len(final["images"]) == 2  # the base and the live build's step
    assert list((root / "result-tmp").iterdir()) == []
    assert [p.name for p in (root / STATE_DIR / "sandbox").iterdir()] == ["owner"]


# --- The sandbox on its own -----------------------------------------------------------------------


async def test_the_sandbox_runs_over_an_image_and_commits_what_succeeds(
        builder: Builder, store: DbStore, root: Path, tmp_path: Path) -> None:
    (tmp_path / "context").mkdir()
    base, _ = await build(builder, "((from busybox))", tmp_path / "context")
    names = Names(root.name)
    image = names.result("scratch")
    subprocess.run([DOCKER_ENGINE, "tag", names.result(base), image], check=True,
                   capture_output=True)
    engine = store.store.engine  # type: ignore[attr-defined]
    sandbox = DockerSandbox(tmp_path / "sandbox", engine, names, memory=32 * 2**20, cpus=0.5)
    assert isinstance(sandbox, Sandbox)

    async def run(command: str, **options: object) -> str:
        log = RecordingLog()
        await sandbox.run(SandboxConfig(["/bin/sh", "-c", command]), image, log=log,
                          **options)  # type: ignore[arg-type]
        return log.text

    limits = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
              "/sys/fs/cgroup/cpu/cpu.cfs_quota_us; cat > /fed")
    assert await run(limits, stdin=b"fed\n") == f"{32 * 2**20}\n50000\n"
    assert await run("cat /fed") == "fed\n"
    with pytest.raises(BuildError, match=r"^command exited with status 2$"):
        await run("echo x > /gone; exit 2")
    assert await run("cat /gone 2>/dev/null || echo absent") == "absent\n"
    with pytest.raises(BuildError, match=r"^command killed by SIGKILL \(exit status 137\)$"):
        await run("""exec awk 'BEGIN { s = "x"; while (1) s = s s }'""")
    cancelled = asyncio.Event()
    cancelled.set()
    with pytest.raises(asyncio.CancelledError):
        await run("sleep 600", cancelled=cancelled)
    assert engine_things(names)["containers"] == []
    # Nothing of the runs is left in its state (podman's conmon writes `oom` where it runs).
    assert [path.name for path in (tmp_path / "sandbox").iterdir()] == ["owner"]
    sandbox.close()
