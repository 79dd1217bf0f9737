"""The OCaml CI pages of the web UI, from status files the tests write, and the hook that lets a
pipeline file add pages to `pipeline run`'s web UI."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import pipeline as p
from pipeline import cli
from pipeline.ocaml.status import STATUS_DIR, status_path
from pipeline.ocaml.web import routes
from pipeline.web import server
from pipeline.web.server import SECURITY_HEADERS, make_app

SHA_1 = "1111111111111111111111111111111111111111"
SHA_2 = "2222222222222222222222222222222222222222"


def write_status(state_dir: Path, repo: str, branch: str, **status: Any) -> None:
    path = status_path(state_dir, repo, branch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"repo": repo, "branch": branch, **status}))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "var"
    write_status(state, "hello", "main", commit=SHA_1, result="passed", jobs=[
        {"name": "debian-12-system", "state": "passed", "job_id": "2026-11-27/120000-build-aaaaaa"},
        {"name": "(lint-fmt)", "state": "skipped", "reason": "No .ocamlformat <file>"},
        {"name": "(lint-doc)", "state": "pending"},
    ])
    write_status(state, "hello", "feature/broken", commit=SHA_2, result="failed", jobs=[
        {"name": "debian-12-system", "state": "failed", "job_id": "2026-11-27/120100-build-bbbbbb",
         "reason": "Exit code 1"},
    ])
    write_status(state, "hello", "all-skipped", commit=SHA_2, result="error",
                 reason="every job was skipped", jobs=[
                     {"name": "debian-12-system", "state": "skipped", "reason": "no libfoo"},
                     {"name": "(lint-opam)", "state": "failed", "experimental": True}])
    write_status(state, "<script>", "main", commit=SHA_1, result="pending", jobs=[])
    return state


@pytest.fixture
async def client(state_dir: Path) -> AsyncIterator[TestClient]:
    async with p.Engine(p.const(1), state_dir=state_dir) as engine:
        app = make_app(engine, extra_routes=routes(state_dir), extra_links=[("/ocaml", "OCaml")])
        async with TestClient(TestServer(app)) as test_client:
            yield test_client


async def get(client: TestClient, path: str, status: int = 200) -> str:
    response = await client.get(path)
    assert response.status == status, (path, await response.text())
    return await response.text()


def results(page: str) -> list[str]:
    return re.findall(r'data-result="([^"]*)"', page)


def commit_result(page: str) -> list[str]:
    found = re.search(r'<dd id="result">.*?</dd>', page)
    assert found is not None, page
    return results(found.group())


async def test_repositories(client: TestClient) -> None:
    response = await client.get("/ocaml")
    assert response.status == 200
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value
    page = await response.text()
    assert '<a href="/ocaml">OCaml</a>' in page  # the nav bar's extra link
    assert '<link rel="stylesheet" href="/static/app.css">' in page
    assert '<a href="/ocaml/hello">hello</a>' in page
    # A name is text, never markup; its link is quoted.
    assert "<script>" not in page.split("<main>")[1]
    assert '<a href="/ocaml/%3Cscript%3E">&lt;script&gt;</a>' in page
    hello = re.search(r'<tr data-repo="hello">.*?</tr>', page)
    assert hello is not None
    assert results(hello.group()) == ["error", "failed", "passed"]


async def test_extra_routes_cannot_replace_the_uis_own(tmp_path: Path) -> None:
    async def impostor(_request: web.Request) -> web.Response:
        return web.Response(text="impostor")

    async with p.Engine(p.const(1), state_dir=tmp_path) as engine:
        app = make_app(engine, extra_routes=[web.get("/jobs", impostor)])
        async with TestClient(TestServer(app)) as client:
            assert "impostor" not in await get(client, "/jobs")


async def test_no_status_files_yet(tmp_path: Path) -> None:
    async with p.Engine(p.const(1), state_dir=tmp_path) as engine, \
            TestClient(TestServer(make_app(engine, extra_routes=routes(tmp_path)))) as client:
        assert "No repository has been built yet." in await get(client, "/ocaml")
        await get(client, "/ocaml/hello", 404)


async def test_branches_with_their_heads_result(client: TestClient) -> None:
    page = await get(client, "/ocaml/hello")
    rows = dict(re.findall(r'<tr data-branch="([^"]*)">(.*?)</tr>', page))
    assert set(rows) == {"main", "feature/broken", "all-skipped"}
    assert '<a href="/ocaml/hello/main">main</a>' in rows["main"]
    assert SHA_1[:12] in rows["main"] and results(rows["main"]) == ["passed"]
    assert 'class="state state-ok"' in rows["main"]
    assert '<a href="/ocaml/hello/feature/broken">' in rows["feature/broken"]
    assert results(rows["feature/broken"]) == ["failed"]
    assert 'class="state state-failed"' in rows["feature/broken"]


async def test_commit_with_its_jobs(client: TestClient) -> None:
    page = await get(client, "/ocaml/hello/main")
    assert f'<code id="commit">{SHA_1}</code>' in page
    assert commit_result(page) == ["passed"]
    jobs = dict(re.findall(r'<tr data-job="([^"]*)">(.*?)</tr>', page))
    assert list(jobs) == ["debian-12-system", "(lint-fmt)", "(lint-doc)"]
    build = jobs["debian-12-system"]
    assert '<a href="/job/2026-11-27/120000-build-aaaaaa">' in build
    assert results(build) == ["passed"]
    # A skipped job says why (escaped) and, never having run, links nowhere.
    assert results(jobs["(lint-fmt)"]) == ["skipped"]
    assert "No .ocamlformat &lt;file&gt;" in jobs["(lint-fmt)"]
    assert "<a " not in jobs["(lint-fmt)"] and "<a " not in jobs["(lint-doc)"]
    assert 'class="state state-running"' in jobs["(lint-doc)"]

    broken = await get(client, "/ocaml/hello/feature/broken")
    assert commit_result(broken) == ["failed"]
    assert "Exit code 1" in broken and "/job/2026-11-27/120100-build-bbbbbb" in broken

    skipped = await get(client, "/ocaml/hello/all-skipped")
    assert re.search(r'<dd id="result">.*data-result="error".*every job was skipped</dd>',
                     skipped)
    jobs = dict(re.findall(r'<tr data-job="([^"]*)">(.*?)</tr>', skipped))
    assert "no libfoo" in jobs["debian-12-system"]
    assert "(lint-opam) (experimental)" in jobs["(lint-opam)"]


async def test_unknown_names_are_404(client: TestClient) -> None:
    await get(client, "/ocaml/nope", 404)
    await get(client, "/ocaml/hello/nope", 404)
    await get(client, "/ocaml/hello/feature", 404)  # a directory, not a branch


async def test_path_traversal_is_refused(client: TestClient, state_dir: Path) -> None:
    # A JSON file outside the status directory that a traversal would reach.
    write_status(state_dir, "..", "secret", commit="", result="passed", jobs=[])
    (state_dir / "secret.json").write_text(json.dumps({"commit": "leaked"}))
    for path in ("/ocaml/%2E%2E/secret", "/ocaml/hello/..%2F..%2F..%2Fsecret",
                 "/ocaml/hello/%2E%2E/%2E%2E/%2E%2E/secret", "/ocaml/..%2F..%2F..%2F/secret"):
        response = await client.get(path)
        assert response.status == 404, path
        assert "leaked" not in await response.text()


async def test_a_malformed_status_file_shows_as_unknown(client: TestClient,
                                                        state_dir: Path) -> None:
    (state_dir / STATUS_DIR / "hello" / "half.json").write_text('{"commit": "12')
    page = await get(client, "/ocaml/hello")
    rows = dict(re.findall(r'<tr data-branch="([^"]*)">(.*?)</tr>', page))
    assert results(rows["half"]) == ["unknown"]
    assert commit_result(await get(client, "/ocaml/hello/half")) == ["unknown"]


def test_pipeline_run_serves_the_pages_a_pipeline_file_adds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline run` gives the file's web_routes(state_dir) and web_links to the web UI."""
    state = tmp_path / "state"
    write_status(state, "hello", "main", commit=SHA_1, result="passed", jobs=[])
    file = tmp_path / "ci.py"
    file.write_text(textwrap.dedent("""
        import pipeline as p
        from pipeline.ocaml.web import routes

        web_links = [("/ocaml", "OCaml")]

        def pipeline(args):
            return p.const(1)

        def web_routes(state_dir):
            return routes(state_dir)
    """))
    pages: dict[str, str] = {}
    real_start = server.start_server

    async def start_and_fetch(engine: p.Engine, **options: Any) -> Any:
        # Fetch the pages from the real server before `--once` stops it.
        runner = await real_start(engine, **options)
        base = f"http://127.0.0.1:{server.bound_port(runner)}"
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/ocaml/hello"):
                async with session.get(base + path) as response:
                    pages[path] = await response.text()
        return runner

    monkeypatch.setattr(server, "start_server", start_and_fetch)
    status = cli.main(["run", str(file), "--once", "--port", "0", "--state-dir", str(state)])
    assert status == cli.EXIT_OK
    assert '<a href="/ocaml">OCaml</a>' in pages["/"]
    assert results(pages["/ocaml/hello"]) == ["passed"]


def test_an_error_in_web_routes_names_the_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "ci.py"
    file.write_text(textwrap.dedent("""
        import pipeline as p

        def pipeline(args):
            return p.const(1)

        def web_routes(state_dir):
            raise RuntimeError("no pages today")
    """))
    status = cli.main(["run", str(file), "--once", "--port", "0",
                       "--state-dir", str(tmp_path / "state")])
    assert status == cli.EXIT_USAGE
    assert f"{file}:8: RuntimeError: no pages today" in capsys.readouterr().err
