"""`pipeline cluster worker`: real worker processes (and a `dask worker --preload`) with their
own rsync stores, runc and a local image directory, connected to a real Dask scheduler run in
the test's event loop; builds are submitted as the cluster's client does (`run_build` with the
pool's resource) and watched through the events topic."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask
import pytest
from cluster_fixtures import ClusterProcess, sleeping, worker_argv
from distributed import Client, Event, Future, Scheduler
from obuilder_fixtures import HANG_GUARD, _loop_mount, require
from ocaml_fixtures import HANG_GUARD as DEBOOTSTRAP_GUARD
from test_build_primitive import Repo, until

from pipeline.cluster.protocol import (
    EVENTS_TOPIC,
    BuildEvent,
    BuildOutcome,
    BuildRequest,
    EventMessage,
    Source,
    cancel_event,
    event_from_message,
    task_key,
)
from pipeline.cluster.worker import BuildCancelled, make_settings, pool_platform, run_build
from pipeline.obuilder.log_format import MARK
from pipeline.obuilder.platforms import host_platform

POOL = "linux-x86_64"


@dataclass
class Cluster:
    """A scheduler, a client and the events the client has seen, per request."""

    scheduler: Scheduler
    client: Client
    events: dict[str, list[BuildEvent]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.scheduler.address

    def submit(self, spec: str, *, pool: str = POOL, source: Source | None = None
               ) -> tuple[BuildRequest, Future]:
        request = BuildRequest(uuid.uuid4().hex, spec, source, pool, None, False, "test")
        self.events[request.request_id] = []
        future = self.client.submit(run_build, request, key=task_key(request),
                                    resources={pool: 1}, pure=False)
        return request, future

    def log(self, request: BuildRequest) -> str:
        chunks = [e for e in self.events[request.request_id] if e.kind == "log"]
        assert [e.seq for e in chunks] == list(range(len(chunks)))
        return b"".join(e.data for e in chunks).replace(MARK, b"").decode()

    def started_on(self, request: BuildRequest) -> str | None:
        return next((e.worker for e in self.events[request.request_id] if e.kind == "started"),
                    None)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    # As the cluster's scheduler does: a build lost with its worker is not run again.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler, \
                Client(scheduler.address, asynchronous=True) as client:
            found = Cluster(scheduler, client)

            def record(event: tuple[float, EventMessage]) -> None:
                build_event = event_from_message(event[1])
                found.events.setdefault(build_event.request_id, []).append(build_event)

            client.subscribe_topic(EVENTS_TOPIC, record)
            yield found


@pytest.fixture
def workers() -> Iterator[list[ClusterProcess]]:
    started: list[ClusterProcess] = []
    yield started
    for worker in started:
        worker.kill()


async def start_worker(workers: list[ClusterProcess], cluster: Cluster, name: str, store: Path,
                       images: Path, *extra: str, pool: str = POOL) -> ClusterProcess:
    store.mkdir(exist_ok=True)
    worker = ClusterProcess(
        worker_argv(cluster.address, name, pool, f"rsync:{store}",
                    store.parent / f"{name}-state", *extra, fetcher=f"local:{images}"),
        store.parent / f"{name}.log")
    workers.append(worker)
    line = await worker.wait_for_line(f"worker {name} of pool {pool} at tcp://")
    assert line.startswith(f"worker {name} of pool {pool} at tcp://127.0.0.1:")
    return worker


async def test_a_build_of_two_merged_commits_streams_its_log_in_order(
        cluster: Cluster, workers: list[ClusterProcess], tmp_path: Path,
        busybox_images: Path) -> None:
    repo = await Repo.create(tmp_path / "repo", {"base.txt": "from the base\n"})
    base = await repo.git("rev-parse", "HEAD")
    change = await repo.commit("pr", {"pr.txt": "from the PR\n"}, new=True)
    await start_worker(workers, cluster, "w1", tmp_path / "store", busybox_images)
    spec = ('((from busybox) (copy (src base.txt pr.txt) (dst /src/))'
            ' (run (shell "cat /src/base.txt /src/pr.txt")))')
    request, future = cluster.submit(spec, source=Source(str(repo.path), (base, change)))
    outcome = await future
    assert isinstance(outcome, BuildOutcome) and outcome.worker == "w1"
    assert (tmp_path / "store" / "result" / outcome.result / "rootfs" / "src" / "pr.txt"
            ).read_text() == "from the PR\n"
    await until(lambda: f'saved as "{outcome.result}"' in cluster.log(request), "the log")
    assert cluster.started_on(request) == "w1"
    assert cluster.events[request.request_id][0].kind == "started"
    log = cluster.log(request)
    assert log.index("from the base\nfrom the PR\n") < log.index(f'saved as "{outcome.result}"')

    # A conflicting merge fails the build, naming the commits.
    left = await repo.commit("main", {"base.txt": "left\n"})
    await repo.git("checkout", "--quiet", "-b", "other", base)
    right = await repo.commit(None, {"base.txt": "right\n"})
    _, failing = cluster.submit(spec, source=Source(str(repo.path), (left, right)))
    conflict = re.escape(f"cannot merge {right} into {left} (conflicts in base.txt)")
    with pytest.raises(Exception, match=conflict):
        await failing
    # Hostile input: never handed to git.
    _, hostile = cluster.submit(spec, source=Source("--upload-pack=touch /tmp/x", (left,)))
    with pytest.raises(Exception, match="not a repository URL"):
        await hostile
    _, hostile = cluster.submit(spec, source=Source(str(repo.path), ("HEAD",)))
    with pytest.raises(Exception, match="not a full commit id"):
        await hostile


async def test_100000_lines_arrive_complete_and_in_order(
        cluster: Cluster, workers: list[ClusterProcess], tmp_path: Path,
        busybox_images: Path) -> None:
    await start_worker(workers, cluster, "w1", tmp_path / "store", busybox_images)
    request, future = cluster.submit(
        '((from busybox) (run (shell "seq 1 100000")))')
    outcome = await future
    # The log events travel before the result, on the same connections: all are in already.
    log = cluster.log(request)
    assert f'saved as "{outcome.result}"' in log
    numbers = [line for line in log.splitlines() if line.isdigit()]
    assert numbers == [str(n) for n in range(1, 100001)]
    chunks = [e for e in cluster.events[request.request_id] if e.kind == "log"]
    # Gathered into chunks, not an event per line.
    assert len(chunks) < 2000


async def test_a_build_goes_only_to_its_pools_worker_and_failures_say_why(
        cluster: Cluster, workers: list[ClusterProcess], tmp_path: Path,
        busybox_images: Path) -> None:
    await start_worker(workers, cluster, "x86", tmp_path / "x86", busybox_images)
    await start_worker(workers, cluster, "arm", tmp_path / "arm", busybox_images,
                       pool="linux-arm64")
    requests = [cluster.submit(f'((from busybox) (run (shell "echo {n}")))',
                               pool="linux-arm64") for n in range(4)]
    for request, future in requests:
        assert (await future).worker == "arm"
        assert cluster.started_on(request) == "arm"
    _, failing = cluster.submit('((from busybox) (run (shell "exit 3")))')
    with pytest.raises(Exception, match="exited with status 3"):
        await failing


async def test_cancel_kills_the_sandboxed_process_and_sigterm_stops_cleanly(
        cluster: Cluster, workers: list[ClusterProcess], tmp_path: Path,
        busybox_images: Path) -> None:
    worker = await start_worker(workers, cluster, "w1", tmp_path / "store", busybox_images)
    request, future, pids = await start_sleeping_build(cluster)
    await Event(cancel_event(request), client=cluster.client).set()
    with pytest.raises(BuildCancelled):
        await future
    await until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
                "the sandboxed process to be gone")

    # Cancelling the task alone (the client lets go of it) kills the build as well.
    _, future, pids = await start_sleeping_build(cluster)
    await future.cancel()
    await until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
                "the sandboxed process to be gone")

    # SIGTERM during a build: the build is cancelled, its process killed, the worker exits 0.
    _, future, pids = await start_sleeping_build(cluster)
    worker.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.process.wait, HANG_GUARD) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    await until(lambda: not cluster.scheduler.workers, "the worker to leave the scheduler")


async def start_sleeping_build(cluster: Cluster) -> tuple[BuildRequest, Future, list[int]]:
    """Submit a build whose step sleeps, wait for the step to run; the pids of its sandboxed
    `sleep` (found in /proc by a duration of its own)."""
    marker = uuid.uuid4().hex
    seconds = 100000 + uuid.uuid4().int % 100000
    request, future = cluster.submit(
        f'((from busybox) (run (shell "echo $((1+1)){marker}; exec sleep {seconds}")))')
    # The output, not the step's header, which shows the command.
    await until(lambda: f"2{marker}" in cluster.log(request), "the step to start")
    pids = sleeping(seconds)
    assert pids, "the sandboxed sleep is running"
    return request, future, pids


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 GiB ext4 filesystem of the test's own."""
    require("mkfs.ext4", "e2fsprogs")
    yield from _loop_mount(tmp_path / "fs.img", tmp_path / "mnt", ["mkfs.ext4", "-q", "-F"])


async def test_low_disk_pauses_prunes_and_resumes(
        cluster: Cluster, workers: list[ClusterProcess], small_fs: Path,
        busybox_images: Path) -> None:
    store = small_fs / "store"
    worker = await start_worker(workers, cluster, "w1", store, busybox_images,
                                "--min-free-disk", "600M")
    [state] = cluster.scheduler.workers.values()
    await until(lambda: state.metrics.get("free_disk", 0) > 800 * 2**20,
                "free disk to be reported")
    # A result of 500 MiB leaves less than 600 MiB free: the worker pauses, prunes it (the
    # least recently used leaf) and resumes.
    _, future = cluster.submit(
        '((from busybox) (run (shell "fallocate -l 500M /big")))')
    outcome = await future
    await worker.wait_for_line("pausing and pruning")
    await worker.wait_for_line("resumed")
    assert not (store / "result" / outcome.result).exists()
    await until(lambda: state.status.name == "running" and
                state.metrics.get("free_disk", 0) > 800 * 2**20, "the worker to resume")
    # The base it was built on, still used, is kept; the worker builds again.
    _, again = cluster.submit('((from busybox) (run (shell "echo again")))')
    assert (await again).worker == "w1"


async def test_the_preload_form(cluster: Cluster, workers: list[ClusterProcess],
                                tmp_path: Path, busybox_images: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    dask_worker = ClusterProcess([
        sys.executable, "-m", "distributed.cli.dask_worker", cluster.address, "--nthreads",
        "2", "--name", "preloaded", "--no-dashboard", "--preload", "pipeline.cluster.worker",
        "--pipeline-pool", POOL, "--pipeline-capacity", "2", "--pipeline-store",
        f"rsync:{store}", "--pipeline-fetcher", f"local:{busybox_images}",
        "--pipeline-state-dir", str(tmp_path / "state")], tmp_path / "preloaded.log")
    workers.append(dask_worker)
    await until(lambda: len(cluster.scheduler.workers) == 1, "the worker to register")
    request, future = cluster.submit('((from busybox) (run (shell "echo preloaded")))')
    outcome = await future
    assert outcome.worker == "preloaded"
    await until(lambda: "preloaded\n" in cluster.log(request), "the log")


async def test_a_worker_of_an_emulated_pool_builds_for_its_platform(
        cluster: Cluster, workers: list[ClusterProcess], tmp_path: Path,
        ocaml_store: str) -> None:
    """A worker of the pool `linux-arm64` on this host builds for linux/arm64 under emulation,
    from the session's shared store (whose Debian 13 arm64 base is made once)."""
    worker = ClusterProcess(worker_argv(cluster.address, "arm", "linux-arm64", ocaml_store,
                                        tmp_path / "arm-state"), tmp_path / "arm.log")
    workers.append(worker)
    line = await worker.wait_for_line("worker arm of pool linux-arm64 at tcp://")
    assert line.endswith(", building for linux/arm64\n"), line
    request, future = cluster.submit('((from debian:13) (run (shell "uname -m")))',
                                     pool="linux-arm64")
    # Bounded by the guard of a debootstrap under emulation, should this test come first.
    async with asyncio.timeout(DEBOOTSTRAP_GUARD):
        outcome = await future
    assert outcome.worker == "arm"
    await until(lambda: f'saved as "{outcome.result}"' in cluster.log(request), "the log")
    log = cluster.log(request)
    assert log[log.index('(run (shell "uname -m"))'):].splitlines()[1] == "aarch64"
    worker.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.process.wait, HANG_GUARD) == 0


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "pipeline", "cluster", "worker", "tcp://127.0.0.1:1"]
    for extra, message in [
        (["--pool", "p", "--store", f"rsync:{tmp_path}", "--capacity", "0"],
         "--capacity must be at least 1"),
        (["--pool", "p", "--store", "nosuch:/x"], "nosuch"),
        (["--pool", "p", "--store", f"rsync:{tmp_path}", "--min-free-disk", "lots"],
         "--min-free-disk"),
        (["--store", f"rsync:{tmp_path}"], "--pool"),
        (["--pool", "p", "--store", f"rsync:{tmp_path}", "--platform", "linux/mips"],
         "--platform: unknown platform 'linux/mips': expected one of linux/amd64, "),
    ]:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_a_workers_platform_is_its_pools_else_the_hosts(tmp_path: Path) -> None:
    assert pool_platform("linux-riscv64") == "linux/riscv64"
    assert pool_platform("linux-x86_64") == "linux/amd64"
    assert pool_platform("builders") == host_platform()
    settings = make_settings(pool="builders", capacity=1, store=f"rsync:{tmp_path}",
                             fetcher=None, name="w", state_dir=None, min_free_disk="5%",
                             platform="ppc64el")
    assert settings.platform == "linux/ppc64le"
