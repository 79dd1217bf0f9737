"""Measure pulling an image from a registry into a store, against skopeo + umoci.

    python benchmarks/registry.py --json [--layers 5] [--layer-mb 20]

Builds a multi-layer image (random, incompressible files: about 100 MB by default) with buildah,
pushes it to a local Debian docker-registry, then times, each from a cold cache:
- ours: `RegistryFetcher.fetch` into a new result of an rsync store on the same disk;
- the peer: `skopeo copy docker://... oci:DIR` followed by `umoci unpack`.
Prints JSON with both times and the ratio ours/peer. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.obuilder.db_store import DbStore
from pipeline.obuilder.fetchers.registry import RegistryFetcher
from pipeline.obuilder.stores import open_store


class _Discard:
    def write(self, data: bytes) -> None:
        """Drop the log."""


def start_registry(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A docker-registry on a free loopback port; returns the process and "127.0.0.1:PORT"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = directory / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {directory / 'storage'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    process = subprocess.Popen(["docker-registry", "serve", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            return process, host
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("docker-registry did not start")


def push_image(work: Path, host: str, layers: int, layer_mb: int) -> str:
    """Build an image of `layers` layers of random data with buildah and push it."""
    context = work / "context"
    context.mkdir()
    lines = ["FROM scratch"]
    for i in range(layers):
        (context / f"layer{i}.bin").write_bytes(os.urandom(layer_mb * 2**20))
        lines.append(f"COPY layer{i}.bin /data/layer{i}.bin")
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    subprocess.run(["buildah", "bud", "--layers", "-q", "-t", "localhost/pullbench",
                    str(context)], check=True, capture_output=True)
    image = f"{host}/pullbench:latest"
    subprocess.run(["buildah", "push", "--tls-verify=false", "localhost/pullbench",
                    f"docker://{image}"], check=True, capture_output=True)
    return image


async def pull_ours(image: str, work: Path) -> float:
    """Seconds to fetch `image` into a new result of an rsync store, cold."""
    root = work / "store"
    root.mkdir()
    store = DbStore(open_store(f"rsync:{root}"))
    await store.clean()
    fetcher = RegistryFetcher(work / "layer-cache")

    async def fetch(tmpdir: Path) -> None:
        rootfs = tmpdir / "rootfs"
        rootfs.mkdir()
        await fetcher.fetch(image, rootfs, log=_Discard())

    start = time.perf_counter()
    await store.build(None, "pulled", fetch)
    return time.perf_counter() - start


def pull_peer(image: str, work: Path) -> float:
    """Seconds for skopeo copy to an OCI layout plus umoci unpack, cold."""
    start = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{image}",
                    f"oci:{work / 'oci'}:latest"], check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--image", f"{work / 'oci'}:latest",
                    str(work / "bundle")], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    """Parse the arguments, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON on one line")
    parser.add_argument("--layers", type=int, default=5, help="number of layers (default 5)")
    parser.add_argument("--layer-mb", type=int, default=20, help="MB per layer (default 20)")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipeline-registry-bench-", dir="/var/tmp"))
    registry_dir = work / "registry"
    registry_dir.mkdir()
    process, host = start_registry(registry_dir)
    try:
        image = push_image(work, host, options.layers, options.layer_mb)
        ours = asyncio.run(pull_ours(image, work))
        peer = pull_peer(image, work)
        figures: dict[str, Any] = {
            "image_mb": options.layers * options.layer_mb,
            "layers": options.layers,
            "ours_s": round(ours, 3),
            "skopeo_umoci_s": round(peer, 3),
            "ratio": round(ours / peer, 3),
        }
    finally:
        process.terminate()
        subprocess.run(["buildah", "rmi", "-f", "localhost/pullbench"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=None if options.json else 2))


if __name__ == "__main__":
    main()
