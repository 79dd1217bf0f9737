"""Measure the web UI: the diagram of a 1,000-node pipeline, and log lines reaching a browser.

    python benchmarks/web.py --json

(a) An in-process engine runs a `list_map` over N items (3 nodes each: the item, a map, a cached
builder); the web app serves it on a free loopback port. The first `GET /pipeline.svg` runs
graphviz; the following ones (the pipeline unchanged) should be served from the cached drawing.
Then, under load, C clients (in the same process, like the server) each request `/pipeline.svg`
back to back, gzip accepted as browsers do, for S seconds while one item changes every 0.25 s
(its builder runs again, so the diagram changes): the p99 of those requests, and how many were
served the previous drawing while the next was drawn.
(b) Debian's chromium (Playwright, headless) opens the page of a job that is held running; the job
then writes lines one at a time, and a MutationObserver in the page records when each line
arrives (SSE). The delay is the browser's receipt time minus the time just before the write (one
machine, one clock). Prints JSON; targets: under 1 s and under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import async_playwright

import pipeline as p

# This file is called web.py: its directory, first on sys.path when it runs as a script, would
# shadow the `web` package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

OBSERVER_JS = """
() => {
  window.__seen = {};
  const look = (node) => {
    const m = /bench-mark (\\d+)/.exec(node.textContent || '');
    if (m && !(m[1] in window.__seen)) {
      window.__seen[m[1]] = performance.timeOrigin + performance.now();
    }
  };
  new MutationObserver((records) => {
    for (const r of records) {
      for (const n of r.addedNodes) look(n);
      if (r.type === 'characterData') look(r.target);
    }
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}
"""
"""Record, per `bench-mark N` line, the wall-clock time (ms) at which it entered the page."""


def free_port() -> int:
    """A TCP port free on loopback at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(engine: p.Engine, port: int) -> Any:
    """Serve `engine`'s web UI on 127.0.0.1:`port`; returns the aiohttp runner."""
    from pipeline.web.server import start_server as start

    return await start(engine, host="127.0.0.1", port=port)


@p.builder("compile", auto_cancel=True)
async def compile_item(job: p.Job, key: list[Any]) -> str:
    """A cheap stand-in for a build."""
    return f"{key[0]}@{key[1]}"


async def measure_svg(items: int, repeats: int, clients: int, seconds: float,
                      state_dir: Path) -> dict[str, Any]:
    """Serve `/pipeline.svg` of a list_map over `items` items: first and cached request times,
    then request times under load while the pipeline changes."""

    def per_item(item: p.Term[tuple[str, int]]) -> p.Term[str]:
        return compile_item(item.map(lambda it: [it[0], it[1]], label="key"))

    values = p.Variable([(f"item{i}", 1) for i in range(items)], label="items")
    engine = p.Engine(p.list_map(per_item, values, key=lambda it: it[0], label="items"),
                      state_dir=state_dir)
    await engine.start()
    await engine.wait_idle()
    nodes = p.pipeline_graph(engine.root, engine).number_of_nodes()
    port = free_port()
    server = await start_server(engine, port)
    url = f"http://127.0.0.1:{port}/pipeline.svg"
    try:
        # Compressed bodies are read as they come: the clients share the server's process and
        # loop, and decompressing every answer would measure the clients.
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def get() -> tuple[float, bytes, str]:
                start = time.perf_counter()
                async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                    body = await response.read()
                    response.raise_for_status()
                return (time.perf_counter() - start, body,
                        response.headers.get("Content-Encoding", ""))

            first, body, encoding = await get()
            size = len(gzip.decompress(body) if encoding == "gzip" else body)
            cached = [(await get())[0] for _ in range(repeats)]
            loaded = await _under_load(url, values, items, clients, seconds)
    finally:
        await server.cleanup()
        await engine.stop()
    return {
        "nodes": nodes,
        "svg_bytes": size,
        "sent_bytes": len(body),
        "first_request_s": round(first, 4),
        "cached_request_median_s": round(statistics.median(cached), 5),
        "cached_request_max_s": round(max(cached), 5),
        "target_s": 1.0,
        "loaded": loaded,
    }


async def _under_load(url: str, values: p.Variable[list[tuple[str, int]]], items: int,
                      clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients request `url` back to back for `seconds` while the pipeline changes."""
    times: list[float] = []
    stale = 0
    changes = 0
    end = time.perf_counter() + seconds
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def client() -> None:
            nonlocal stale
            while time.perf_counter() < end:
                start = time.perf_counter()
                async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                    await response.read()
                    response.raise_for_status()
                    stale += response.headers.get("X-Diagram") == "stale"
                times.append(time.perf_counter() - start)

        async def change() -> None:
            nonlocal changes
            while time.perf_counter() < end:
                await asyncio.sleep(0.25)
                changes += 1
                values.set([(f"item{i}", 1 + (changes if i == changes % items else 0))
                            for i in range(items)])

        await asyncio.gather(change(), *(client() for _ in range(clients)))
    times.sort()
    return {
        "clients": clients,
        "seconds": seconds,
        "pipeline_changes": changes,
        "requests": len(times),
        "served_previous_drawing": stale,
        "median_s": round(statistics.median(times), 4),
        "p99_s": round(times[min(len(times) - 1, int(len(times) * 0.99))], 4),
        "max_s": round(times[-1], 4),
    }


_held: asyncio.Future[p.Job] | None = None
_release: asyncio.Event | None = None


@p.builder("held")
async def held_job(job: p.Job, key: str) -> str:
    """A job that stays running until the benchmark releases it."""
    assert _held is not None and _release is not None
    _held.set_result(job)
    await _release.wait()
    return key


async def measure_sse(lines: int, state_dir: Path) -> dict[str, Any]:
    """Delay from `job.log(line)` to the line's arrival in chromium's job page, per line."""
    global _held, _release
    _held, _release = asyncio.get_running_loop().create_future(), asyncio.Event()
    engine = p.Engine(held_job(p.const("bench")), state_dir=state_dir)
    await engine.start()
    job = await _held
    port = free_port()
    server = await start_server(engine, port)
    delays: list[float] = []
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/job/{job.id}")
            await page.wait_for_selector("#log")
            await page.evaluate(OBSERVER_JS)
            # A first line makes sure the stream is connected before anything is timed.
            job.log("bench-mark warmup")
            await page.wait_for_function("() => 'warmup' in window.__seen || "
                                         "document.querySelector('#log').textContent"
                                         ".includes('bench-mark warmup')", timeout=60_000)
            for i in range(lines):
                await asyncio.sleep(0.05)
                written = time.time() * 1000
                job.log(f"bench-mark {i}")
                await page.wait_for_function(f"() => '{i}' in window.__seen", timeout=60_000)
                seen = await page.evaluate(f"() => window.__seen['{i}']")
                delays.append(seen - written)
            await browser.close()
    finally:
        _release.set()
        await engine.wait_idle()
        await server.cleanup()
        await engine.stop()
    return {
        "lines": lines,
        "median_ms": round(statistics.median(delays), 2),
        "max_ms": round(max(delays), 2),
        "min_ms": round(min(delays), 2),
        "target_ms": 100.0,
    }


async def run(items: int, repeats: int, clients: int, seconds: float, lines: int
              ) -> dict[str, Any]:
    """Both measurements, each with its own engine and state directory."""
    with tempfile.TemporaryDirectory() as svg_state, tempfile.TemporaryDirectory() as sse_state:
        svg = await measure_svg(items, repeats, clients, seconds, Path(svg_state))
        sse = await measure_sse(lines, Path(sse_state))
    return {"pipeline_svg": svg, "log_to_browser": sse}


def main() -> None:
    """Parse the options, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=330,
                        help="list_map items, 3 nodes each (default: 330, about 1,000 nodes)")
    parser.add_argument("--repeats", type=int, default=20, help="cached requests to time")
    parser.add_argument("--clients", type=int, default=16,
                        help="clients requesting /pipeline.svg under load (default: 16)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long the load lasts (default: 10)")
    parser.add_argument("--lines", type=int, default=20, help="log lines to time")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    options = parser.parse_args()
    result = asyncio.run(run(options.items, options.repeats, options.clients, options.seconds,
                             options.lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
