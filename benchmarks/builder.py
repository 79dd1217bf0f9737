"""Measure the builder against buildah, store by store, and against the physical floor.

    python benchmarks/builder.py --json [--stores btrfs,overlayfs,xfs,rsync]

For each store: a cold build of a 10-step busybox spec (7 `run`, 3 `copy`; the median of
`COLD_RUNS`, each in a new store) and a fully cached rebuild (the median of `CACHED_RUNS`), each
timed as a whole `pipeline obuilder build` process; and the time to snapshot rootfses of
different sizes (`Store.build` on that base with nothing to do): tiny, 512 MB in 4 files, 20,000
small files. Side by side, in the same run, `buildah bud --layers` builds the Dockerfile
converted from the same spec (cold with --no-cache, then cached). Prints JSON with the ratios
ours/buildah.

On btrfs it also measures the physical floor of a cold build (`floor_s`, the median of
`COLD_RUNS`): ten `btrfs subvolume snapshot`s, each of the one before, and on each a `runc run
/bin/true` with the `config.json` the builder's runc sandbox writes for a step (same
namespaces, mounts and capabilities), as separate processes, sequentially; `cold_floor_ratio`
is the cold build's time over that. A build cannot do less than that per step.

The package's bytecode is compiled first (`compileall`), as on a regular installation (pip
compiles it when installing): the figures then measure the builder, not Python compiling its
sources at every start, which an editable install does when PYTHONDONTWRITEBYTECODE is set.
Needs root; makes its own loop-mounted btrfs and xfs.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pipeline
from pipeline.obuilder import spec as obuilder_spec
from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.protocols import SandboxConfig
from pipeline.obuilder.sandboxes.runc import RuncSandbox
from pipeline.obuilder.stores import open_store

STEPS = 10
COLD_RUNS = 3
"""Cold builds (and floors) per store: each needs a new store."""
CACHED_RUNS = 11
"""Fully cached rebuilds per store, and buildah's cached builds."""


def make_spec() -> str:
    """A 10-step busybox spec: runs and copies, each step cheap."""
    ops = []
    for i in range(STEPS):
        if i % 3 == 2:
            ops.append(f'(copy (src "file{i}.txt") (dst "/data/"))')
        else:
            ops.append(f'(run (shell "mkdir -p /data && echo step {i} >> /data/steps"))')
    return "((from busybox)\n " + "\n ".join(ops) + ")\n"


def make_image(directory: Path) -> Path:
    """A busybox rootfs tarball in the --image-dir layout."""
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                                 check=True).stdout.split():
        if not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    images = directory / "images"
    images.mkdir()
    with tarfile.open(images / "busybox.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    return images


def timed(argv: list[str], **kw: Any) -> float:
    """Wall-clock seconds of a command, which must succeed."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return elapsed


def median_of(runs: int, argv: list[str]) -> tuple[float, float, float]:
    """The median, lowest and highest wall-clock seconds of `runs` runs of a command."""
    times = [timed(argv) for _ in range(runs)]
    return statistics.median(times), min(times), max(times)


def btrfs_floor(root: Path, rootfs: Path) -> float:
    """Seconds for ten `btrfs subvolume snapshot`s, each of the one before (the first of a
    subvolume holding `rootfs`), each followed by `runc run /bin/true` over the snapshot with the
    builder's runc sandbox's `config.json`: what a cold 10-step build cannot go below."""
    root.mkdir()
    base = root / "floor-0"
    subprocess.run(["btrfs", "subvolume", "create", str(base)], check=True, capture_output=True)
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(base / "rootfs")], check=True)
    sandbox = RuncSandbox(root / "floor-sandbox")
    bundle = root / "floor-bundle"
    bundle.mkdir()
    hosts = bundle / "hosts"
    hosts.write_text("127.0.0.1 localhost builder\n")
    runc = ["runc", "--root", str(root / "floor-runc"), "run", "--bundle", str(bundle)]
    try:
        start = time.perf_counter()
        for step in range(1, STEPS + 1):
            snapshot = root / f"floor-{step}"
            subprocess.run(["btrfs", "subvolume", "snapshot", str(root / f"floor-{step - 1}"),
                            str(snapshot)], check=True, stdout=subprocess.DEVNULL)
            config = sandbox.oci_config(SandboxConfig(argv=["/bin/true"]), snapshot / "rootfs",
                                        hosts=hosts)
            (bundle / "config.json").write_text(json.dumps(config))
            subprocess.run([*runc, f"floor-{step}"], check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        sandbox.close()


def mount_loop(image: Path, mount_point: Path, mkfs: list[str]) -> None:
    """Make and loop-mount a 4 GiB filesystem image."""
    with open(image, "wb") as f:
        f.truncate(4 * 2**30)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    mount_point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)


SNAPSHOT_BASES = {
    # name: (number of files, bytes per file)
    "small": (1, 10_000),
    "big_files": (4, 128 * 2**20),
    "many_files": (20_000, 10_000),
}


async def snapshot_times(store_spec: str) -> dict[str, float]:
    """Seconds to snapshot a tiny rootfs, one of 512 MB in 4 files, and one of 20,000 files."""
    store = DbStore(open_store(store_spec))
    await store.clean()
    times = {}
    for name, (files, size) in SNAPSHOT_BASES.items():
        base_id = f"bench-{name}-base"

        async def fill(tmpdir: Path, files: int = files, size: int = size) -> None:
            def write() -> None:
                rootfs = tmpdir / "rootfs"
                block = os.urandom(min(size, 2**20))
                for i in range(files):
                    directory = rootfs / f"d{i // 1000}"
                    directory.mkdir(parents=True, exist_ok=True)
                    with open(directory / f"f{i}", "wb") as f:
                        for _ in range(max(1, size // len(block))):
                            f.write(block)
            await asyncio.to_thread(write)

        await store.build(None, base_id, fill)
        await asyncio.to_thread(os.sync)

        async def nothing(tmpdir: Path) -> None:
            return None

        start = time.perf_counter()
        await store.build(base_id, f"bench-{name}-snap", nothing)
        times[f"snapshot_{name}_s"] = round(time.perf_counter() - start, 4)
    return times


def build_argv(spec_file: Path, context: Path, images: Path) -> list[str]:
    """`pipeline obuilder build` of the spec, as a whole process (the store to be added)."""
    return [sys.executable, "-m", "pipeline", "obuilder", "build", "-f", str(spec_file),
            str(context), "--image-dir", str(images)]


def make_build(work: Path) -> tuple[Path, Path, Path]:
    """The 10-step build in `work`: its busybox image directory, its context (the files it
    copies and the Dockerfile converted from the spec, for buildah) and its spec file."""
    images = make_image(work / "image")
    context = work / "context"
    context.mkdir()
    for i in range(STEPS):
        (context / f"file{i}.txt").write_text(f"file {i}\n")
    spec_file = work / "build.spec"
    spec_file.write_text(make_spec())
    parsed = obuilder_spec.parse(spec_file.read_text())
    (context / "Dockerfile").write_text(
        obuilder_spec.to_dockerfile(parsed, buildkit=False, os="unix"))
    return images, context, spec_file


def buildah_times(context: Path, images: Path) -> dict[str, float]:
    """`buildah bud --layers` of the context's Dockerfile: one cold build (`--no-cache`) and the
    median of `CACHED_RUNS` cached ones, in seconds. The image `bench` and the busybox base it
    is built on are left for `remove_buildah_images`."""
    container = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True,
                               text=True).stdout.strip()
    subprocess.run(["buildah", "add", container, str(images / "busybox.tar"), "/"], check=True,
                   capture_output=True)
    subprocess.run(["buildah", "commit", "-q", container, "localhost/busybox:latest"],
                   check=True, capture_output=True)
    subprocess.run(["buildah", "rm", container], check=True, capture_output=True)
    bud = ["buildah", "bud", "--layers", "--pull=never", "-q", "-t", "bench", str(context)]
    cold = timed([*bud[:2], "--no-cache", *bud[2:]])
    cached, _, _ = median_of(CACHED_RUNS, bud)
    return {"cold_s": round(cold, 3), "cached_s": round(cached, 3)}


def remove_buildah_images() -> None:
    """Remove what `buildah_times` made."""
    subprocess.run(["buildah", "rmi", "-f", "bench", "localhost/busybox:latest"],
                   capture_output=True)


def measure(stores: list[str], work: Path) -> dict[str, Any]:
    """Run everything; return the figures."""
    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1)
    images, context, spec_file = make_build(work)

    results: dict[str, Any] = {"steps": STEPS, "stores": {}}
    results["buildah"] = buildah_times(context, images)
    buildah_cold, buildah_cached = results["buildah"]["cold_s"], results["buildah"]["cached_s"]

    for kind in stores:
        if kind == "btrfs":
            mount_loop(work / "btrfs.img", work / "btrfs", ["mkfs.btrfs", "-q"])
            root = work / "btrfs" / "store"
        elif kind == "xfs":
            mount_loop(work / "xfs.img", work / "xfs", ["mkfs.xfs", "-q", "-m", "reflink=1"])
            root = work / "xfs" / "store"
        else:
            root = work / kind
        colds = []
        for run in range(COLD_RUNS):
            # Each cold build in a store of its own, the last one kept for the cached builds.
            store_spec = f"{kind}:{root}-{run}"
            Path(f"{root}-{run}").mkdir(parents=True)
            colds.append(timed([*build_argv(spec_file, context, images), "--store", store_spec]))
        cold = statistics.median(colds)
        cached, fastest, slowest = median_of(
            CACHED_RUNS, [*build_argv(spec_file, context, images), "--store", store_spec])
        figures: dict[str, Any] = {
            "cold_s": round(cold, 3), "cold_range_s": [round(min(colds), 3), round(max(colds), 3)],
            "cached_s": round(cached, 3), "cached_range_s": [round(fastest, 3), round(slowest, 3)],
        }
        if kind == "btrfs":
            rootfs = work / "image" / "rootfs"
            floor = statistics.median(btrfs_floor(root.parent / f"floor-{run}", rootfs)
                                      for run in range(COLD_RUNS))
            figures["floor_s"] = round(floor, 3)
            figures["cold_floor_ratio"] = round(cold / floor, 3)
        figures.update(asyncio.run(snapshot_times(store_spec)))
        figures["cold_ratio"] = round(cold / buildah_cold, 3)
        figures["cached_ratio"] = round(cached / buildah_cached, 3)
        results["stores"][kind] = figures
    return results


def unmount_under(work: Path) -> None:
    """Unmount everything below `work`, deepest first: the overlayfs store's result views,
    then the loop-mounted filesystems."""
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for mount_point in sorted((p for p in points if p.startswith(f"{work}/")),
                              key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], capture_output=True)


def main() -> None:
    """Parse the arguments, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--stores", default="btrfs,overlayfs,xfs,rsync",
                        help="comma-separated store kinds (default: all four)")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipeline-builder-bench-", dir="/var/tmp"))
    try:
        figures = measure(options.stores.split(","), work)
    finally:
        unmount_under(work)
        remove_buildah_images()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=None if options.json else 2))


if __name__ == "__main__":
    main()
