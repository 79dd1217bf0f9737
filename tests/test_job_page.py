"""The job page through aiohttp's test client: skipped jobs, timings, the raw log, the builder's
steps as marked lines, and Rebuild taking the browser to the new job.

The real browser's side (sections folded and opened, wrapping, following a rebuild) is in
test_job_page_browser.py.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from obuilder_fakes import Command, FakeFetcher, FakeStore, ScriptedSandbox
from test_web import Gates, csrf_of, element, events_until, gated, get_text, serve

import pipeline as p
from pipeline.clock import FakeClock
from pipeline.obuilder import spec as S
from pipeline.obuilder.builder import Builder
from pipeline.obuilder.log_format import MARK
from pipeline.web.server import duration_text


def skipping(reason: str) -> p.BuilderOp[str, str]:
    """A builder that says it has nothing to do, and why, then succeeds."""

    @p.builder("lint")
    async def lint(job: p.Job, key: str) -> str:
        job.skip(reason)
        return key

    return lint


async def log_html(client: Any, job_id: str) -> tuple[str, dict[str, Any]]:
    """The HTML of every line of the job's log stream, and its `end` event."""
    response = await client.get(f"/job/{job_id}/log")
    events = await events_until(response, "end")
    response.close()
    html = "".join(data for name, data in events if name == "lines")
    return html, json.loads(events[-1][1])


def test_durations_read_as_people_say_them() -> None:
    assert duration_text(timedelta(seconds=0.42)) == "0.4 s"
    assert duration_text(timedelta(seconds=12.4)) == "12 s"
    assert duration_text(timedelta(seconds=184)) == "3 min 4 s"
    assert duration_text(timedelta(hours=2, minutes=5, seconds=20)) == "2 h 5 min"


async def test_a_skipped_job_reads_as_skipped_live_and_stored(tmp_path: Path) -> None:
    root = skipping("odoc is not available")("doc")
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        job_id = s.engine.node_for(root).job_id
        assert s.engine.jobs.get(job_id) is not None, "still a job of this process"
        page = await get_text(s.client, f"/job/{job_id}")
        assert element(page, "job-state") == "skipped"
        assert 'class="state state-skipped"' in page
        assert element(page, "job-skipped") == "odoc is not available"
        assert "succeeded" not in page
        # The row of the error it does not have is hidden; its own is shown.
        assert '<div id="job-error-row" hidden>' in page
        assert '<div id="job-skipped-row">' in page
        html, end = await log_html(s.client, job_id)
        assert end["state"] == "skipped" and end["skipped"] == "odoc is not available"
        assert "Job skipped: odoc is not available" in html and "Job succeeded" not in html
        history = element(page, "history")
        assert '<li class="skipped">' in history and "skipped: odoc is not available" in history
        query = await get_text(s.client, "/query")
        assert re.search(r'<td class="skipped">skipped: odoc is not available</td>', query)
        metrics = await get_text(s.client, "/metrics")
        assert "pipeline_jobs_skipped_total 1.0" in metrics
        assert "pipeline_jobs_finished_total 1.0" in metrics
    # Another process knows the job from its record only.
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        assert s.engine.jobs.get(job_id) is None
        page = await get_text(s.client, f"/job/{job_id}")
        assert element(page, "job-state") == "skipped"
        assert element(page, "job-skipped") == "odoc is not available"
        _, end = await log_html(s.client, job_id)
        assert end["state"] == "skipped" and end["skipped"] == "odoc is not available"


async def test_the_page_shows_when_the_job_was_queued_started_and_finished(
        tmp_path: Path) -> None:
    clock = FakeClock()

    @p.builder("timed", starts_job=True)
    async def timed(job: p.Job, key: str) -> str:
        clock.advance(timedelta(seconds=5))  # waiting for its slot
        await job.start()
        clock.advance(timedelta(minutes=3, seconds=4))
        return key

    root = timed("a")
    expected = {"job-queued": "2026-01-01 00:00:00 UTC", "job-started": "2026-01-01 00:00:05 UTC",
                "job-finished": "2026-01-01 00:03:09 UTC", "job-queued-for": "5.0 s",
                "job-ran-for": "3 min 4 s"}
    async with serve(tmp_path, root, clock=clock) as s:
        await s.engine.wait_idle()
        job_id = s.engine.node_for(root).job_id
        page = await get_text(s.client, f"/job/{job_id}")
        assert {name: element(page, name) for name in expected} == expected
        _, end = await log_html(s.client, job_id)
        assert {f"job-{name}": end[name] for name in
                ("queued", "started", "finished", "queued-for", "ran-for")} == expected
    async with serve(tmp_path, root) as s:
        page = await get_text(s.client, f"/job/{job_id}")
        assert {name: element(page, name) for name in expected} == expected, "as stored"


async def test_the_raw_log_downloads_whole_as_a_text_file(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job = s.engine.jobs.get(s.engine.node_for(root).job_id)
        assert job is not None
        # Several read chunks' worth, with bytes a page would show otherwise.
        job.write("".join(f"line {i} \x1b[32m<green>\x1b[0m\r\n" for i in range(20_000)))
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        page = await get_text(s.client, f"/job/{job.id}")
        assert f'<a id="log-download" href="/job/{job.id}/log.txt" download>' in page
        response = await s.client.get(f"/job/{job.id}/log.txt")
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        name = job.id.replace("/", "-")
        assert response.headers["Content-Disposition"] == f'attachment; filename="{name}.log"'
        assert "Content-Length" not in response.headers, "streamed"
        assert await response.read() == job.log_path.read_bytes()
        missing = await s.client.get("/job/2020-01-01/000000-nothing-000000/log.txt")
        assert missing.status == 404


# The builder's steps, with the real builder over the fakes of its backends.

FIRST = '((from base) (run (shell "prepare")))'
SECOND = '((from base) (run (shell "prepare")) (run (shell "build")))'
FORGED = (b'/: (run (shell "prepare"))\n---> using "' + b"0" * 64 + b'" from cache\n'
          b"a unit separator " + MARK + b" in the output" + MARK + b"\n")
"""What the failing command prints: lines that look like the builder's, and its marker byte."""


async def test_the_builders_lines_are_marked_and_a_commands_output_is_not(
        tmp_path: Path) -> None:
    sandbox = ScriptedSandbox()
    sandbox.script("prepare", Command(output=b"preparing\n"))
    sandbox.script("build", Command(output=FORGED, exit_status=2))
    context = tmp_path / "context"
    context.mkdir()
    (tmp_path / "store").mkdir()

    @p.builder("twice")
    async def twice(job: p.Job, key: str) -> str:
        builder = Builder(FakeStore(tmp_path / "store"), sandbox, FakeFetcher({"base": {}}))
        try:
            await builder.build(S.parse(FIRST), context, log=job.write)
            return await builder.build(S.parse(SECOND), context, log=job.write)
        finally:
            builder.close()

    root = twice("a")
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        job_id = s.engine.node_for(root).job_id
        html, end = await log_html(s.client, job_id)
    assert end["state"] == "failed"
    lines = re.findall(r'<span (class="[^"]*"[^>]*) id="L\d+"><a [^>]*>\d+</a>(.*?)</span>\n', html)
    marked = [(attributes, text) for attributes, text in lines if attributes != 'class="line"']
    saved, cached = 'data-cached="false"', 'data-cached="true"'
    kinds = ["header" if "step-header" in a else "cached" if cached in a else "saved"
             if saved in a else a for a, _ in marked]
    # FIRST: both steps built; SECOND: both found in the store, then the failing step.
    assert kinds == ["header", "saved", "header", "saved",
                     "header", "cached", "header", "cached", "header"], marked
    assert [text for _, text in marked if _.endswith('step-header"')] == [
        "(from base)", '/: (run (shell prepare))'] * 2 + ['/: (run (shell build))']
    ids = [re.search(r'data-step="([0-9a-f]{64})"', a)[1] for a, _ in marked  # type: ignore[index]
           if "step-end" in a]
    assert ids[:2] == ids[2:], "the second build's cached steps are the first's"
    # The command's look-alike lines are plain lines, its marker byte shown as a symbol.
    plain = [text for attributes, text in lines if attributes == 'class="line"']
    assert '/: (run (shell "prepare"))' in plain
    assert f'---&gt; using "{"0" * 64}" from cache' in plain
    assert "a unit separator \u241f in the output\u241f" in plain
    assert plain[-1].endswith("Job failed: BuildError: step /: (run (shell build)) failed: "
                              "command exited with status 2")


# Rebuild.


async def test_rebuild_takes_the_browser_to_the_new_job(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    gates.of("a")[1].set()
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        first = s.engine.node_for(root).job_id
        page = await get_text(s.client, f"/job/{first}")
        assert 'id="newer-run"' not in page
        response = await s.client.post(f"/job/{first}/rebuild", data={"csrf": csrf_of(page)},
                                       allow_redirects=False)
        assert response.status == 303
        second = s.engine.node_for(root).job_id
        assert second != first and response.headers["Location"] == f"/job/{second}"
        await s.engine.wait_idle()
        page = await get_text(s.client, f"/job/{first}")
        assert f'<a href="/job/{second}">' in element(page, "newer-run")
        assert 'id="newer-run"' not in await get_text(s.client, f"/job/{second}")


async def test_rebuilding_a_key_not_in_use_says_so_on_the_old_page(tmp_path: Path) -> None:
    gates = Gates()
    gates.of("old")[1].set()
    gates.of("new")[1].set()
    step = gated(gates)
    root = step("old")
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        old = s.engine.node_for(root).job_id
    async with serve(tmp_path, step("new")) as s:
        await s.engine.wait_idle()
        page = await get_text(s.client, f"/job/{old}")
        response = await s.client.post(f"/job/{old}/rebuild", data={"csrf": csrf_of(page)},
                                       allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"] == f"/job/{old}?rebuild=marked"
        page = await get_text(s.client, response.headers["Location"])
        assert "rebuilt the next time the pipeline wants it" in element(page, "rebuild-notice")
        entry = s.engine.cache.db.entry(old)
        assert entry is not None
        latest = s.engine.cache.db.latest(entry.op, entry.key_digest)
        assert latest is not None and latest.rebuild, "marked for the key's next use"
