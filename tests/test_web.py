"""The web UI through aiohttp's test client, against a real engine running small pipelines."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import pipeline as p
from pipeline.clock import Clock
from pipeline.primitives import git, git_webhook
from pipeline.web import diagram, webhooks
from pipeline.web.ansi import AnsiConverter, ansi_to_html
from pipeline.web.server import bound_port, make_app, sse_event, start_server

TOKEN = "s3cret-admin-token"
HOOK_SECRET = b"hook-secret"


class Gates:
    """Builders that wait for the test to let them finish."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}

    def of(self, key: str) -> tuple[asyncio.Event, asyncio.Event]:
        return (self.started.setdefault(key, asyncio.Event()),
                self.release.setdefault(key, asyncio.Event()))


def gated(gates: Gates, **options: Any) -> p.BuilderOp[str, str]:
    """A builder that logs, waits for its key's release, then fails for keys starting 'bad'."""

    @p.builder("step", **options)
    async def step(job: p.Job, key: str) -> str:
        started, release = gates.of(key)
        job.log(f"building {key}")
        started.set()
        await release.wait()
        if key.startswith("bad"):
            raise RuntimeError(f"{key} is broken")
        return key.upper()

    return step


@dataclass
class Served:
    engine: p.Engine
    client: TestClient


@asynccontextmanager
async def serve(tmp_path: Path, root: p.Term[Any], *, confirm: p.Level | None = None,
                clock: Clock | None = None, **app_options: Any) -> AsyncIterator[Served]:
    engine = p.Engine(root, state_dir=tmp_path / "var", confirm=confirm, clock=clock)
    await engine.start()
    client = TestClient(TestServer(make_app(engine, **app_options)))
    await client.start_server()
    try:
        yield Served(engine, client)
    finally:
        await client.close()
        await engine.stop()


def element(page: str, element_id: str) -> str:
    """The text of the element with `element_id` (no nested elements of the same tag)."""
    match = re.search(rf'<(\w+)[^>]* id="{re.escape(element_id)}"[^>]*>(.*?)</\1>', page, re.S)
    assert match, f"no element #{element_id}"
    return match.group(2)


def count_of(page: str, state: str) -> int:
    """The number shown for `state` in the main page's counts."""
    counts = dict(re.findall(r'<li data-state="([^"]+)">.*?class="count">(\d+)<',
                             element(page, "counts")))
    return int(counts[state])


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def get_text(client: TestClient, path: str, status: int = 200) -> str:
    response = await client.get(path)
    assert response.status == status, await response.text()
    return await response.text()


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """The next server-sent event: (event name, data); data that is a JSON string is decoded,
    objects stay JSON text."""
    name, data = "message", []
    while True:
        # A chunk of log is one data line of JSON: up to 64 KiB of log, escaped, as HTML.
        line = (await response.content.readline(max_line_length=2**24)).decode()
        assert line, "the event stream ended"
        line = line.rstrip("\n")
        if not line:
            assert len(data) == 1, data
            value = json.loads(data[0])
            return name, value if isinstance(value, str) else data[0]
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


async def events_until(response: aiohttp.ClientResponse, name: str, text: str = ""
                       ) -> list[tuple[str, str]]:
    """Events up to and including the first `name` event whose data contains `text`."""
    seen = []
    while True:
        event = await next_event(response)
        seen.append(event)
        if event[0] == name and text in event[1]:
            return seen


# Pages


async def test_main_page_shows_state_counts_and_clickable_diagram(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job_id = s.engine.node_for(root).job_id
        page = await get_text(s.client, "/")
        assert element(page, "overall-state") == "running"
        assert count_of(page, "running") == 1 and count_of(page, "ok") == 1
        diagram_html = element(page, "diagram")
        assert diagram_html.lstrip().startswith("<svg")
        assert f'href="/job/{job_id}"' in diagram_html
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        page = await get_text(s.client, "/")
        assert element(page, "overall-state") == "ok"
        assert count_of(page, "ok") == 2 and count_of(page, "running") == 0


async def test_svg_and_dot_with_expanded_groups(tmp_path: Path) -> None:
    source = p.const("x", label="source")
    inner = source.map(str.upper, label="inner-step")
    root = p.collapse("group", "g1", input=source, output=inner)
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        dot = await get_text(s.client, "/pipeline.dot")
        assert "inner-step" not in dot and "?expand=group=g1" in dot
        expanded = await get_text(s.client, "/pipeline.dot?expand=group%3Dg1")
        assert "inner-step" in expanded
        response = await s.client.get("/pipeline.svg?expand=group%3Dg1")
        assert response.content_type == "image/svg+xml"
        assert "inner&#45;step" in await response.text()


async def test_hostile_labels_errors_and_groups_are_drawn_as_text(tmp_path: Path) -> None:
    error = '<b>no</b> \\N \\l "q" &amp;'

    def fail(value: str) -> str:
        raise ValueError(error)

    source = p.const("x", label="<b>source</b>")
    root = p.collapse('<k"ey>', "a&b #c", input=source,
                      output=source.map(fail, label="<i>inner</i>"))
    async with serve(tmp_path, root) as s:
        await s.engine.wait_idle()
        assert "&lt;b&gt;source&lt;/b&gt;" in element(await get_text(s.client, "/"), "diagram")
        xlink = "{http://www.w3.org/1999/xlink}"
        links = ElementTree.fromstring(await get_text(s.client, "/pipeline.svg")).iter(
            "{http://www.w3.org/2000/svg}a")
        # The group's link, as graphviz wrote it, opens the group.
        (expand,) = [a.get(f"{xlink}href") for a in links if "expand" in a.get(f"{xlink}href")]
        expanded = ElementTree.fromstring(await get_text(s.client, f"/pipeline.svg{expand}"))
        texts = [text.text for text in expanded.iter("{http://www.w3.org/2000/svg}text")]
        assert "<b>source</b>" in texts and "<i>inner</i>" in texts
        tooltips = [a.get(f"{xlink}title") for a in expanded.iter("{http://www.w3.org/2000/svg}a")]
        assert any(error in (tooltip or "") for tooltip in tooltips), tooltips


async def test_svg_is_drawn_again_only_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[str] = []
    real_render = diagram.dot_to_svg

    def counting_render(dot: str) -> str:
        drawn.append(dot)
        return real_render(dot)

    monkeypatch.setattr(diagram, "dot_to_svg", counting_render)
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        first = await get_text(s.client, "/pipeline.svg")
        assert await get_text(s.client, "/pipeline.svg") == first
        await get_text(s.client, "/")
        assert len(drawn) == 1, "nothing changed: graphviz must not run again"
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        # The previous drawing is served, marked stale, while graphviz draws the new one.
        response = await s.client.get("/pipeline.svg")
        assert response.headers["X-Diagram"] == "stale" and await response.text() == first
        assert await current_svg(s.client) != first
        assert len(drawn) == 2
        assert p.COLOURS["ok"] in drawn[1] and p.COLOURS["running"] in drawn[0]


async def current_svg(client: TestClient, path: str = "/pipeline.svg") -> str:
    """The SVG once the server says it shows the pipeline's current state."""
    while True:
        response = await client.get(path)
        assert response.status == 200, await response.text()
        if response.headers["X-Diagram"] == "current":
            return await response.text()
        await asyncio.sleep(0.05)


async def test_svg_is_sent_compressed_to_clients_that_accept_gzip(tmp_path: Path) -> None:
    async with serve(tmp_path, p.const("x", label="a-constant")) as s:
        await s.engine.wait_idle()
        svg = await current_svg(s.client)
        assert "a&#45;constant" in svg
        url = s.client.make_url("/pipeline.svg")
        async with aiohttp.ClientSession(auto_decompress=False) as raw:
            for accept, encoded in (("gzip, deflate", True), ("br;q=1, GZip;q=0.5", True),
                                    ("identity", False), ("gzip;q=0", False)):
                async with raw.get(url, headers={"Accept-Encoding": accept}) as response:
                    body = await response.read()
                    assert response.headers["Vary"] == "Accept-Encoding"
                    assert response.headers.get("Content-Encoding") == \
                        ("gzip" if encoded else None), accept
                    assert (gzip.decompress(body) if encoded else body).decode() == svg


async def test_events_announce_changes(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        response = await s.client.get("/events")
        assert response.content_type == "text/event-stream"
        name, data = await next_event(response)
        assert name == "changed" and json.loads(data)["state"] == "running"
        gates.of("a")[1].set()
        while json.loads(data)["state"] != "ok":
            name, data = await next_event(response)
        assert json.loads(data)["counts"]["ok"] == 2
        response.close()


async def test_job_page_shows_state_actions_and_earlier_runs(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job_id = s.engine.node_for(root).job_id
        page = await get_text(s.client, f"/job/{job_id}")
        assert element(page, "job-state") == "running"
        assert element(page, "job-label") == "step"
        assert 'id="cancel"' in page
        assert re.search(r'<form [^>]*hidden><input[^>]*><button id="rebuild"', page), \
            "rebuild is hidden while the job runs"
        assert f'data-src="/job/{job_id}/log"' in page
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        s.engine.rebuild(job_id)
        await s.engine.wait_idle()
        second = s.engine.node_for(root).job_id
        page = await get_text(s.client, f"/job/{job_id}")
        assert element(page, "job-state") == "ok"
        assert re.search(r'<form [^>]*"><input[^>]*><button id="rebuild"', page)
        assert 'id="cancel"' not in page
        history = element(page, "history")
        assert f'href="/job/{second}"' in history and f'href="/job/{job_id}"' in history


async def test_unknown_job_is_404(tmp_path: Path) -> None:
    async with serve(tmp_path, p.const(1)) as s:
        for path in ("/job/2020-01-01/000000-nothing-000000", "/job/2020-01-01/..%2F..%2Fetc",
                     "/job/2020-01-01/000000-nothing-000000/log"):
            assert (await s.client.get(path)).status == 404
        response = await s.client.post("/job/2020-01-01/000000-nothing-000000/rebuild",
                                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status in (403, 404)


async def test_log_stream_delivers_lines_written_after_connecting(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job = s.engine.jobs.get(s.engine.node_for(root).job_id)
        response = await s.client.get(f"/job/{job.id}/log")
        await events_until(response, "lines", "building a")
        job.write("later <line> \x1b[32mgreen\x1b[0m\n")
        events = await events_until(response, "lines", "later")
        html = events[-1][1]
        assert '&lt;line&gt; <span class="ansi-fg-2">green</span>' in html
        number = re.search(r'id="L(\d+)"><a class="ln" href="#L\1">\1</a>later', html)
        assert number, html
        gates.of("a")[1].set()
        end = await events_until(response, "end")
        outcome = json.loads(end[-1][1])
        assert outcome["state"] == "ok" and outcome["error"] is None and outcome["finished"]
        assert any("Job succeeded" in data for name, data in end if name == "lines")


async def test_log_stream_of_a_large_finished_log_is_complete(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job = s.engine.jobs.get(s.engine.node_for(root).job_id)
        job.write("".join(f"line {i}\n" for i in range(100_000)))
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        response = await s.client.get(f"/job/{job.id}/log")
        events = await events_until(response, "end")
        chunks = [data for name, data in events if name == "lines"]
        assert len(chunks) > 1, "a large log is sent in several chunks"
        text = "".join(chunks)
        assert text.count('class="line"') == 100_000 + 4
        assert '<a class="ln" href="#L100003">100003</a>line 99999<' in text


INJECTION = (b'harmless\r\revent: end\rdata: {"state": "ok", "finished": "spoofed", '
             b'"error": "SPOOFED by log"}\r\rx\n')
"""A log line that ends fields at CR, as EventSource does, to forge an `end` event."""


def parse_sse(stream: bytes) -> list[tuple[str, str]]:
    """Events as the HTML standard's EventSource parses them: lines end at CRLF, LF or CR."""
    events, name, data = [], "message", []
    for line in re.split(r"\r\n|\r|\n", stream.decode()):
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return events


def test_event_data_is_one_line_of_json_whatever_the_log_holds() -> None:
    for text in (INJECTION.decode(), "a\nb", "a\r\nb", "\r", "\x00\x85\u2028\u2029 é",
                 "data: x\n\nevent: end"):
        stream = sse_event("lines", text, "12:3")
        assert stream.count(b"\n") == 4 and b"\r" not in stream, stream
        assert parse_sse(stream) == [("lines", json.dumps(text, ensure_ascii=False))]
        assert json.loads(parse_sse(stream)[0][1]) == text
    assert parse_sse(sse_event("end", {"state": "failed"})) == [("end", '{"state": "failed"}')]


async def test_log_stream_cannot_be_forged_and_shows_progress_lines_last(tmp_path: Path
                                                                         ) -> None:
    gates = Gates()
    root = gated(gates)("bad")
    async with serve(tmp_path, root) as s:
        await gates.of("bad")[0].wait()
        job = s.engine.jobs.get(s.engine.node_for(root).job_id)
        job.write(INJECTION)
        job.write("10%\r50%\r\x1b[32m100%\r\nafter the injection\n")
        gates.of("bad")[1].set()
        await s.engine.wait_idle()
        response = await s.client.get(f"/job/{job.id}/log")
        raw = await response.read()
        events = parse_sse(raw)
        assert [name for name, _ in events].count("end") == 1 and events[-1][0] == "end"
        assert json.loads(events[-1][1])["state"] == "failed"
        assert json.loads(events[-1][1])["error"] == "RuntimeError: bad is broken"
        html = "".join(json.loads(data) for name, data in events if name == "lines")
        numbered = re.findall(r'href="#L(\d+)">\1</a>(.*?)</span>\n', html)
        texts = [text for _, text in numbered]
        assert [int(n) for n, _ in numbered] == list(range(1, len(numbered) + 1))
        assert texts[3:6] == ["x", '<span class="ansi-fg-2">100%</span>',
                              '<span class="ansi-fg-2">after the injection</span>'], texts
        assert "SPOOFED" not in html and "Job failed" in html


async def test_last_event_id_resumes_or_is_refused(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        job = s.engine.jobs.get(s.engine.node_for(root).job_id)
        job.write("one\ntwo\n")
        gates.of("a")[1].set()
        await s.engine.wait_idle()
        url = f"/job/{job.id}/log"
        first = await events_until(await s.client.get(url), "lines", "two")
        resume = re.search(r'id="L(\d+)">[^<]*<a[^>]*>\d+</a>one<', first[-1][1])
        assert resume, first
        size = job.log_path.stat().st_size
        text = job.log_path.read_bytes()
        offset = text.index(b"two\n")
        response = await s.client.get(url, headers={"Last-Event-ID": f"{offset}:{resume[1]}"})
        lines = (await events_until(response, "lines"))[-1][1]
        assert "two" in lines and "one" not in lines
        assert f'id="L{int(resume[1]) + 1}"' in lines
        for bad in ("9" * 5000 + ":1", "1" * 30 + ":1", "²:1", "1:²", "1:2:3", "-1:0", "x",
                    f"{size + 1}:0", "4:5"):
            response = await s.client.get(url, headers={"Last-Event-ID": bad})
            assert response.status == 400, (bad[:20], response.status)
            assert "Last-Event-ID" in await response.text()


async def test_jobs_page_lists_active_jobs(tmp_path: Path) -> None:
    gates = Gates()
    pool = p.Pool("workers", 1)
    step = gated(gates, pool=pool)
    root = p.pair(step("a"), step("b"))
    async with serve(tmp_path, root) as s:
        await gates.of("a")[0].wait()
        table = element(await get_text(s.client, "/jobs"), "jobs")
        assert table.count('data-state="running"') == 1
        assert table.count('data-state="ready"') == 1
        gates.of("a")[1].set()
        gates.of("b")[1].set()
        await s.engine.wait_idle()
        assert "<td>" not in element(await get_text(s.client, "/jobs"), "jobs")


async def test_query_filters_and_rebuilds_selected(tmp_path: Path) -> None:
    gates = Gates()
    step = gated(gates)
    bad = step("bad")
    root = p.pair(step("good"), bad)
    for key in ("good", "bad"):
        gates.of(key)[1].set()
    async with serve(tmp_path, root, admin_token=TOKEN) as s:
        await s.engine.wait_idle()
        bad_job = s.engine.node_for(bad).job_id
        everything = element(await get_text(s.client, "/query"), "entries")
        assert everything.count('type="checkbox"') == 2
        failed = element(await get_text(s.client, "/query?ok=false"), "entries")
        assert bad_job in failed and "bad is broken" in failed and "GOOD" not in failed
        assert element(await get_text(s.client, "/query?ok=true&op=step"), "entries") \
            .count('type="checkbox"') == 1
        assert element(await get_text(s.client, "/query?since=2999-01-01"), "entries") \
            .count('type="checkbox"') == 0
        assert element(await get_text(s.client, "/query?op=nothing"), "entries") \
            .count('type="checkbox"') == 0
        await get_text(s.client, "/query?since=yesterday", status=400)
        await get_text(s.client, "/query?ok=maybe", status=400)
        response = await s.client.post("/query/rebuild", data={"job": bad_job},
                                       headers={"Authorization": f"Bearer {TOKEN}"},
                                       allow_redirects=False)
        assert response.status == 303
        await s.engine.wait_idle()
        assert s.engine.node_for(bad).job_id != bad_job


# Access


async def test_actions_need_the_admin_token(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    async with serve(tmp_path, root, admin_token=TOKEN) as s:
        await gates.of("a")[0].wait()
        job_id = s.engine.node_for(root).job_id
        cancel = f"/job/{job_id}/cancel"
        page = await get_text(s.client, f"/job/{job_id}")
        csrf = csrf_of(page)
        # A viewer with a valid CSRF token is still not allowed.
        assert (await s.client.post(cancel, data={"csrf": csrf})).status == 403
        assert (await s.client.post(cancel, headers={"Authorization": "Bearer wrong"})).status \
            == 403
        assert s.engine.job_actions(job_id) == {"cancel"}, "nothing happened"
        response = await s.client.post(cancel, headers={"Authorization": f"Bearer {TOKEN}"},
                                       allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == f"/job/{job_id}"
        await s.engine.wait_idle()
        assert s.engine.jobs.get(job_id).error == "Cancelled"
        # Cancelling again is not possible any more.
        assert (await s.client.post(cancel, headers={"Authorization": f"Bearer {TOKEN}"})
                ).status == 409


async def test_login_cookie_and_csrf(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates)("a")
    gates.of("a")[1].set()
    async with serve(tmp_path, root, admin_token=TOKEN) as s:
        await s.engine.wait_idle()
        job_id = s.engine.node_for(root).job_id
        login_page = await get_text(s.client, "/login")
        csrf = csrf_of(login_page)
        wrong = await s.client.post("/login", data={"csrf": csrf, "token": "nope"})
        assert wrong.status == 403
        no_csrf = await s.client.post("/login", data={"token": TOKEN})
        assert no_csrf.status == 403
        response = await s.client.post("/login", data={"csrf": csrf, "token": TOKEN},
                                       allow_redirects=False)
        assert response.status == 303
        cookie = response.headers.getall("Set-Cookie")
        assert any("pipeline_login=" in c and "HttpOnly" in c and "SameSite=Strict" in c
                   for c in cookie)
        rebuild = f"/job/{job_id}/rebuild"
        assert (await s.client.post(rebuild, data={"csrf": "0" * 64})).status == 403
        assert (await s.client.post(rebuild)).status == 403
        assert s.engine.node_for(root).job_id == job_id, "nothing happened"
        page = await get_text(s.client, f"/job/{job_id}")
        assert "admin" in element(page, "role")
        response = await s.client.post(rebuild, data={"csrf": csrf_of(page)},
                                       allow_redirects=False)
        assert response.status == 303
        await s.engine.wait_idle()
        assert s.engine.node_for(root).job_id != job_id
        # Another browser (another session) cannot reuse this session's token.
        async with TestClient(TestServer(s.client.app)) as other:
            assert (await other.post(rebuild, data={"csrf": csrf})).status == 403


async def test_without_a_token_loopback_may_act_with_csrf(tmp_path: Path) -> None:
    gates = Gates()
    root = gated(gates, level=p.Level.DANGEROUS)("a")
    gates.of("a")[1].set()
    async with serve(tmp_path, root, confirm=p.Level.AVERAGE) as s:
        await s.engine.wait_idle()
        job_id = s.engine.node_for(root).job_id
        page = await get_text(s.client, f"/job/{job_id}")
        assert element(page, "job-state") == "waiting-for-confirmation"
        assert 'id="start-now"' in page and 'id="cancel"' in page
        start = f"/job/{job_id}/start"
        assert (await s.client.post(start)).status == 403, "no CSRF token"
        response = await s.client.post(start, data={"csrf": csrf_of(page)},
                                       allow_redirects=False)
        assert response.status == 303
        await s.engine.wait_idle()
        assert s.engine.root_output() == p.Ok("A")


async def test_security_headers_on_every_response(tmp_path: Path) -> None:
    async with serve(tmp_path, p.const(1)) as s:
        await s.engine.wait_idle()
        for path in ("/", "/pipeline.svg", "/static/app.js", "/metrics", "/nowhere",
                     "/job/2020-01-01/000000-x-000000"):
            headers = (await s.client.get(path)).headers
            csp = headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
            assert headers["X-Frame-Options"] == "DENY"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "same-origin"
        assert "<script>" not in await get_text(s.client, "/")


async def test_start_server_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    async with p.Engine(p.const(1), state_dir=tmp_path) as engine:
        with pytest.raises(ValueError, match="admin token"):
            await start_server(engine, host="0.0.0.0", port=0)
        runner = await start_server(engine, host="127.0.0.1", port=0, admin_token=TOKEN)
        try:
            port = bound_port(runner)
            async with aiohttp.ClientSession(trust_env=False) as session, \
                    session.get(f"http://127.0.0.1:{port}/") as response:
                assert response.status == 200
        finally:
            await runner.cleanup()


# Machines


async def test_metrics(tmp_path: Path) -> None:
    gates = Gates()
    pool = p.Pool("workers", 1)
    step = gated(gates, pool=pool)
    root = p.pair(step("good"), step("bad"))
    async with serve(tmp_path, root) as s:
        await gates.of("good")[0].wait()
        text = await get_text(s.client, "/metrics")
        assert 'pipeline_pool_slots_in_use{pool="workers"} 1.0' in text
        assert 'pipeline_pool_queue_length{pool="workers"} 1.0' in text
        assert 'pipeline_nodes{state="running"} 1.0' in text
        assert 'pipeline_nodes{state="ready"} 1.0' in text
        assert all(f'pipeline_nodes{{state="{state}"}}' in text for state in p.NodeState)
        assert "pipeline_jobs_started_total 1.0" in text
        gates.of("good")[1].set()
        gates.of("bad")[1].set()
        await s.engine.wait_idle()
        text = await get_text(s.client, "/metrics")
        assert "pipeline_jobs_started_total 2.0" in text
        assert "pipeline_jobs_finished_total 2.0" in text
        assert "pipeline_jobs_failed_total 1.0" in text
        assert 'pipeline_nodes{state="failed"} 1.0' in text
        assert 'pipeline_pool_slots_in_use{pool="workers"} 0.0' in text
        count = re.search(r"^pipeline_evaluation_seconds_count (\S+)$", text, re.M)
        assert count and float(count.group(1)) >= 1


def signed(body: bytes, secret: bytes = HOOK_SECRET, delivery: str = "") -> dict[str, str]:
    """Headers of a GitHub delivery of `body` (a fresh delivery id unless one is given)."""
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "Content-Type": "application/json"}


@pytest.fixture
def refreshed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The repositories the webhook refreshes (git.refresh is replaced: it finds one monitor)."""
    repos: list[str] = []

    def fake_refresh(repo: str) -> int:
        repos.append(repo)
        return 1

    monkeypatch.setattr(git, "refresh", fake_refresh)
    return repos


async def test_webhook_checks_the_signature(tmp_path: Path, refreshed: list[str]) -> None:
    body = json.dumps({"ref": "refs/heads/main", "repository": {
        "clone_url": "https://github.com/o/r.git", "ssh_url": "git@github.com:o/r.git",
        "html_url": "https://github.com/o/r", "url": "https://github.com/o/r"}}).encode()
    async with serve(tmp_path, p.const(1), extra_routes=git_webhook.routes()) as s:
        response = await s.client.post("/webhooks/git", data=body, headers=signed(body))
        assert response.status == 404 and "no webhook secret" in await response.text()
    async with serve(tmp_path, p.const(1), webhook_secret=HOOK_SECRET,
                     extra_routes=git_webhook.routes()) as s:
        for headers in ({}, signed(body, b"wrong"), signed(body + b" ")):
            response = await s.client.post("/webhooks/git", data=body, headers=headers)
            assert response.status == 403
        assert refreshed == []
        response = await s.client.post("/webhooks/git", data=body, headers=signed(body))
        assert response.status == 200
        assert await response.json() == {"refreshed": 3}
        assert sorted(refreshed) == ["git@github.com:o/r.git", "https://github.com/o/r",
                                     "https://github.com/o/r.git"]


async def test_webhook_refuses_malformed_bodies_and_replays(tmp_path: Path,
                                                           refreshed: list[str]) -> None:
    malformed = [b'{"repository": "x"}', b"[]", b'"x"', b"null", b"5", b"{}", b"not json",
                 b'{"repository": {}}', b'{"repository": {"url": 5}}',
                 b'{"repository": {"url": ["a"]}}', b'{"repository": {"url": {"a": 1}}}',
                 b'{"repository": {"url": ""}}', b'{"repository": {"url": null}}',
                 b'{"repository": {"url": "a", "ssh_url": 1}}', b'{"repository": []}',
                 b'{"repository": {"url": "\xff\xfe"}}', b"\xff\xfe\x00{",
                 b'{"repository": {"url": "a"}, "n": ' + b"9" * 5000 + b"}",
                 b"[" * 100_000 + b"]" * 100_000, b""]
    async with serve(tmp_path, p.const(1), webhook_secret=HOOK_SECRET,
                     extra_routes=git_webhook.routes()) as s:
        for body in malformed:
            response = await s.client.post("/webhooks/git", data=body, headers=signed(body))
            assert response.status == 400, (body[:40], response.status)
        body = json.dumps({"repository": {"url": "https://example.com/r.git"}}).encode()
        headers = signed(body)
        del headers["X-GitHub-Delivery"]
        response = await s.client.post("/webhooks/git", data=body, headers=headers)
        assert response.status == 400 and "X-GitHub-Delivery" in await response.text()
        assert refreshed == []
        headers = signed(body, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
        response = await s.client.post("/webhooks/git", data=body, headers=headers)
        assert response.status == 200 and refreshed == ["https://example.com/r.git"]
        # The same delivery again, or its signed body under a new (unsigned) delivery id.
        for again in (headers, signed(body)):
            response = await s.client.post("/webhooks/git", data=body, headers=again)
            assert response.status == 409, response.status
            assert "replay" in await response.text()
        other = json.dumps({"repository": {"url": "https://example.com/s.git"}}).encode()
        response = await s.client.post("/webhooks/git", data=other, headers=signed(other))
        assert response.status == 200
        assert refreshed == ["https://example.com/r.git", "https://example.com/s.git"]


def test_deliveries_are_forgotten_after_the_window() -> None:
    deliveries = webhooks.Deliveries(window=0.2)
    assert deliveries.first_time("d1", "sha256=a")
    assert not deliveries.first_time("d1", "sha256=b") and not deliveries.first_time("d2",
                                                                                    "sha256=a")
    time.sleep(0.3)
    assert deliveries.first_time("d1", "sha256=a"), "an hour later it is a new delivery"


async def test_only_handlers_marked_as_webhooks_skip_the_csrf_check(tmp_path: Path) -> None:
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request.path)
        return web.json_response({"secret": webhooks.secret(request).decode()})

    # The same work under two paths: only the first handler is marked as a webhook.
    async def page(request: web.Request) -> web.Response:
        return await hook(request)

    routes = [web.post("/hooks/mine", webhooks.webhook(hook)), web.post("/pages/mine", page)]
    async with serve(tmp_path, p.const(1), webhook_secret=HOOK_SECRET,
                     extra_routes=routes) as s:
        response = await s.client.post("/pages/mine", data=b"{}")
        assert response.status == 403 and "CSRF" in await response.text()
        assert received == []
        response = await s.client.post("/hooks/mine", data=b"{}")
        assert response.status == 200 and await response.json() == {"secret": "hook-secret"}
        assert received == ["/hooks/mine"]


async def test_webhook_refreshes_a_real_local_repository_monitor(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    reads: list[int] = []

    def count(commits: list[git.Commit]) -> int:
        reads.append(len(commits))
        return len(commits)

    root = git.local_heads(repo).map(count)
    body = json.dumps({"repository": {"url": str(repo)}}).encode()
    async with serve(tmp_path, root, webhook_secret=HOOK_SECRET,
                     extra_routes=git_webhook.routes()) as s:
        await s.engine.wait_idle()
        assert reads == [1]
        response = await s.client.post("/webhooks/git", data=body, headers=signed(body))
        assert response.status == 200
        assert await response.json() == {"refreshed": 1}
        other = json.dumps({"repository": {"url": str(tmp_path / "other")}}).encode()
        response = await s.client.post("/webhooks/git", data=other, headers=signed(other))
        assert await response.json() == {"refreshed": 0}, "nothing watches that one"


TICKER = """
import asyncio
from pathlib import Path

import pipeline as p


@p.builder("ticker")
async def ticker(job, stop):
    while not Path(stop).exists():
        job.log("tick")
        await asyncio.sleep(0.05)
    return "stopped"


def pipeline(args):
    return ticker(p.const(args[0]))
"""
"""A job that logs a line every 50 ms until its file exists."""


def test_a_closed_tab_prints_no_traceback(tmp_path: Path) -> None:
    """Event streams whose browser went away end quietly in a real `pipeline run --port`."""
    (tmp_path / "ticker.py").write_text(TICKER)
    stop, stderr = tmp_path / "stop", tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "ticker.py", "--port", "0", "--", str(stop)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert process.stdout is not None
        found = re.match(r"Web UI: http://127\.0\.0\.1:(\d+)/", process.stdout.readline())
        assert found, stderr.read_text()
        port = int(found[1])

        def get(path: str) -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
                conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                return b"".join(iter(lambda: conn.recv(65536), b"")).decode()

        while not (job := re.search(r'href="/job/([^"]+)"', get("/jobs"))):
            time.sleep(0.05)
        tabs = []
        for path in ("/events", f"/job/{job[1]}/log"):
            tab = socket.create_connection(("127.0.0.1", port), timeout=60)
            tab.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            while b"event: " not in received:
                received += tab.recv(65536)
            tabs.append(tab)
        for tab in tabs:
            tab.close()
        # Both streams write again: the log at its next tick, the events when the job ends.
        time.sleep(0.5)
        stop.touch()
        while "ticker" in get("/jobs"):
            time.sleep(0.05)
        time.sleep(0.5)
        assert "state-ok" in get("/")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    errors = stderr.read_text()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors and "ConnectionResetError" not in errors, errors


# Helpers


def test_ansi_to_html() -> None:
    assert ansi_to_html("plain <b> & 'q'") == "plain &lt;b&gt; &amp; 'q'"
    assert ansi_to_html("\x1b[31mred\x1b[0m normal") == '<span class="ansi-fg-1">red</span> normal'
    assert ansi_to_html("\x1b[1;92;44mx") == '<span class="ansi-bold ansi-fg-10 ansi-bg-4">x</span>'
    assert ansi_to_html("\x1b[38;5;196mx\x1b[39my") == "xy", "256 colours are dropped, whole"
    assert ansi_to_html("\x1b[2K\x1b[1Gdone") == "done", "other escapes are dropped"
    converter = AnsiConverter()
    assert converter.convert("\x1b[33mstart") == '<span class="ansi-fg-3">start</span>'
    assert converter.convert("next line") == '<span class="ansi-fg-3">next line</span>'
    assert converter.convert("\x1b[m") == "" and converter.convert("after") == "after"


def test_cli_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    file = tmp_path / "p.py"
    file.write_text(textwrap.dedent("""
        import pipeline as p

        def pipeline(args):
            return p.const(1)
    """))
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(file), "--host",
                             "0.0.0.0"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "without an admin token" in result.stderr and "--admin-token-file" in result.stderr
    served = subprocess.run([sys.executable, "-m", "pipeline", "run", str(file), "--once",
                             "--port", "0"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert served.returncode == 0, served.stderr
    assert re.match(r"Web UI: http://127\.0\.0\.1:[1-9][0-9]*/$", served.stdout.splitlines()[0])
    quiet = subprocess.run([sys.executable, "-m", "pipeline", "run", str(file), "--once"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "Web UI" not in quiet.stdout
