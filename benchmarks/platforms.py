"""Measure builds for other architectures (under emulation) and the docker backend.

    python benchmarks/platforms.py --json [--arches amd64,arm64,...] [--store overlayfs:DIR]
                                          [--engine podman]

Per architecture, on Debian 13 (`(from debian:13)` for that platform; Debian 12, beside amd64's
Debian 12, where the mirror lacks Debian 13 for it): the time of one `run`
step of `true` (the median of `STEP_RUNS`, each a new step on a cached base, timed in-process
around `Builder.build`), and of compiling the demo project (`examples/ocaml-hello`, `dune build
@install`, the median of `COMPILE_RUNS`) on the OCaml CI base stage of that architecture (Debian's
OCaml, dune and findlib). `*_ratio` is an architecture's time over the host's (amd64, native):
the cost of emulation. The bases are made first and not timed (debootstrap, its second stage and
apt under emulation take minutes each); give `--store` a store already holding them (the OCaml CI
pipeline's, after a `--platforms all` run) to skip that.

The docker backend (`--store docker:PREFIX`, with `--engine`): a cold (the median of
`builder.COLD_RUNS`, each with a new prefix) and a fully cached (the median of
`builder.CACHED_RUNS`) 10-step busybox build as a whole `pipeline obuilder build` process, the
same build with the runc sandbox on an overlayfs store, and `buildah bud --layers` of the
Dockerfile converted from the spec, in the same run (the spec, image and buildah timing are
`benchmarks/builder.py`'s). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from builder import (
    CACHED_RUNS,
    COLD_RUNS,
    build_argv,
    buildah_times,
    make_build,
    median_of,
    remove_buildah_images,
    timed,
    unmount_under,
)

import pipeline
from pipeline.obuilder import spec as S
from pipeline.obuilder.platforms import ARCHITECTURES, host_platform
from pipeline.obuilder.protocols import BuildError
from pipeline.obuilder.setup import open_builder
from pipeline.ocaml import platforms as ocaml_platforms

STEP_RUNS = 5
COMPILE_RUNS = 3
DEMO = Path(__file__).resolve().parent.parent / "examples" / "ocaml-hello"


RELEASES = {"trixie": "debian:13", "bookworm": "debian:12"}
"""The releases tried, in order: an architecture the mirror lacks Debian 13 for is measured on
Debian 12, beside amd64 on Debian 12."""


def ocaml_base(release: str, arch: str) -> S.Spec:
    """The OCaml CI base stage (Debian's OCaml, dune, findlib) of `release` on `arch` (an OCI
    architecture name): its steps are those of the pipeline's builds of that release, so a
    store the pipeline used has them cached."""
    platform = ocaml_platforms.Platform(f"bench-{release}-{arch}", RELEASES[release], "system",
                                        release, f"linux/{arch}")
    return S.parse(ocaml_platforms.base_stage(platform))


def with_ops(base: S.Spec, text: str) -> S.Spec:
    """`base` followed by the ops of the spec text `text` (parsed on a dummy `from`)."""
    extra = S.parse(f"((from none) {text})")
    return S.Spec(from_=base.from_, ops=(*base.ops, *extra.ops))


async def arch_times(store: str, release: str, arch: str, context: Path) -> dict[str, Any]:
    """The `true` step's and the demo's compile times on `release` and `arch` (see the module's
    doc); raises BuildError if the base cannot be built."""
    builder = await open_builder(store, platform=f"linux/{arch}")

    def discard(_: bytes) -> None:
        return None

    async def timed_build(spec: S.Spec) -> float:
        start = time.perf_counter()
        await builder.build(spec, context, log=discard)
        return time.perf_counter() - start

    try:
        base = ocaml_base(release, arch)
        start = time.perf_counter()
        await builder.build(base, context, log=discard)
        base_s = time.perf_counter() - start
        nonce = uuid.uuid4().hex
        steps = [await timed_build(with_ops(base, f'(run (shell "true # {nonce} {i}"))'))
                 for i in range(STEP_RUNS)]
        compiles = [await timed_build(with_ops(base, f"""
            (user (uid 1000) (gid 1000)) (workdir /src) (env BENCH_RUN {nonce}-{i})
            (copy (src .) (dst /src/) (exclude .git _build))
            (run (shell "dune build @install"))"""))
                    for i in range(COMPILE_RUNS)]
    finally:
        builder.close()
    return {"release": release, "base_s": round(base_s, 1),
            "true_step_s": round(statistics.median(steps), 3),
            "compile_s": round(statistics.median(compiles), 3)}


def platform_figures(store: str, arches: list[str], work: Path) -> dict[str, Any]:
    """`arch_times` of each architecture on the first release of `RELEASES` it builds on
    (why the others failed under `failed`), with the ratios to the host's on the same
    release."""
    context = work / "demo"
    shutil.copytree(DEMO, context)
    host = host_platform().removeprefix("linux/")
    figures: dict[str, Any] = {}
    for arch in arches:
        failed = {}
        for release in RELEASES:
            try:
                figures[arch] = asyncio.run(arch_times(store, release, arch, context))
                break
            except BuildError as exc:
                failed[release] = str(exc)
        else:
            figures[arch] = {}
        if failed:
            figures[arch]["failed"] = failed
    native = {figures[host]["release"]: figures[host]} if "release" in figures.get(host, {}) \
        else {}
    for arch_figures in list(figures.values()):
        release = arch_figures.get("release")
        if release is None:
            continue
        if release not in native:
            native[release] = asyncio.run(arch_times(store, release, host, context))
            figures[f"{host} ({release})"] = native[release]
        for name in ("true_step", "compile"):
            arch_figures[f"{name}_ratio"] = round(
                arch_figures[f"{name}_s"] / native[release][f"{name}_s"], 2)
    return figures


def cold_and_cached(argv: list[str], stores: list[str]) -> dict[str, Any]:
    """A cold build in each of `stores` (the median), then `CACHED_RUNS` cached ones in the
    last."""
    colds = [timed([*argv, "--store", store]) for store in stores]
    cached, _, _ = median_of(CACHED_RUNS, [*argv, "--store", stores[-1]])
    return {"cold_s": round(statistics.median(colds), 3),
            "cold_range_s": [round(min(colds), 3), round(max(colds), 3)],
            "cached_s": round(cached, 3)}


def docker_figures(engine: str, work: Path) -> dict[str, Any]:
    """The 10-step build on the docker backend, on runc + overlayfs, and with buildah."""
    work.mkdir()
    images, context, spec_file = make_build(work)
    argv = build_argv(spec_file, context, images)
    prefixes = [f"pipeline-bench-{uuid.uuid4().hex[:8]}" for _ in range(COLD_RUNS)]
    overlays = []
    for run in range(COLD_RUNS):
        (work / f"overlayfs-{run}").mkdir()
        overlays.append(f"overlayfs:{work / f'overlayfs-{run}'}")
    figures: dict[str, Any] = {"engine": engine}
    try:
        figures["docker"] = cold_and_cached(
            [*argv, "--engine", engine], [f"docker:{prefix}" for prefix in prefixes])
    finally:
        for prefix in prefixes:
            # Every result was used before now: pruning deletes them all, images included.
            subprocess.run([sys.executable, "-m", "pipeline", "obuilder", "prune", "--before",
                            "2999-01-01", "--store", f"docker:{prefix}", "--engine", engine],
                           capture_output=True)
    figures["runc_overlayfs"] = cold_and_cached(argv, overlays)
    figures["buildah"] = buildah_times(context, images)
    for name in ("docker", "runc_overlayfs"):
        for kind in ("cold", "cached"):
            figures[name][f"{kind}_ratio_to_buildah"] = round(
                figures[name][f"{kind}_s"] / figures["buildah"][f"{kind}_s"], 2)
    return figures


def main() -> None:
    """Parse the arguments, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--arches", default=",".join(ARCHITECTURES),
                        help="comma-separated architectures (default: all five)")
    parser.add_argument("--store", metavar="KIND:DIR",
                        help="the store of the platform builds (default: a new overlayfs one)")
    parser.add_argument("--engine", default="podman", choices=("docker", "podman"),
                        help="the docker backend's engine (default: podman)")
    options = parser.parse_args()
    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="pipeline-platforms-bench-", dir="/var/tmp"))
    try:
        store = options.store
        if store is None:
            (work / "store").mkdir()
            store = f"overlayfs:{work / 'store'}"
        figures = {
            "arches": platform_figures(store, options.arches.split(","), work),
            "docker_backend": docker_figures(options.engine, work / "docker"),
        }
    finally:
        unmount_under(work)
        remove_buildah_images()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=None if options.json else 2))


if __name__ == "__main__":
    main()
