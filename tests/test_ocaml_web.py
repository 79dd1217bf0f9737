"""The OCaml CI pages of the web UI, from status files the tests write, and the hook that lets a
pipeline file add pages to `pipeline run`'s web UI."""

from __future__ import annotations

import asyncio
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
from ci_pages import get, job_ids, log_in_to_rebuild, rebuild, recorded_jobs, results

import pipeline as p
from pipeline import cli
from pipeline.ocaml.status import commit_path, status_dir, status_path
from pipeline.ocaml.web import routes
from pipeline.web import server
from pipeline.web.server import SECURITY_HEADERS, make_app

SHA_1 = "1111111111111111111111111111111111111111"
SHA_2 = "2222222222222222222222222222222222222222"
SHA_3 = "3333333333333333333333333333333333333333"
BUILD_ID = "2026-11-27/120000-build-aaaaaa"
FAILED_ID = "2026-11-27/120100-build-bbbbbb"


def write_commit(state_dir: Path, repo: str, **status: Any) -> None:
    path = commit_path(state_dir, repo, status["commit"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"repo": repo, **status}))


def write_status(state_dir: Path, repo: str, branch: str, **status: Any) -> None:
    path = status_path(state_dir, repo, branch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"repo": repo, "branch": branch, **status}))


def build(platform: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"name": platform, "kind": "build", "platform": platform, "state": state, **fields}


def lint(platform: str, kind: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"name": f"{platform} ({kind})", "kind": kind, "platform": platform, "state": state,
            **fields}


ANALYSIS = {"name": "(analysis)", "kind": "analysis", "state": "passed",
            "job_id": "2026-11-27/115900-analysis-cccccc"}
MAIN_JOBS = [
    ANALYSIS,
    build("debian-12-4.13", "passed", job_id=BUILD_ID, queued="2026-11-27T12:00:00+00:00",
          started="2026-11-27T12:00:02+00:00", finished="2026-11-27T12:01:07+00:00"),
    lint("debian-12-4.13", "lint-fmt", "skipped", reason="No .ocamlformat <file>"),
    lint("debian-12-4.13", "lint-doc", "pending"),
    build("debian-12-ocaml-5.2", "failed", job_id=FAILED_ID, experimental=True,
          reason="dune build: Error: Unbound value nme\nmore"),
]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "var"
    main = {"commit": SHA_1, "result": "passed", "message": "Greet\n\nBy name.",
            "author": "Ann <ann@example.com>", "date": "2026-11-27T11:00:00+01:00",
            "jobs": MAIN_JOBS}
    write_commit(state, "hello", **main)
    write_status(state, "hello", "main", **main, history=[
        {"commit": SHA_1, "result": "passed", "message": "Greet",
         "published": "2026-11-27T12:01:08+00:00"},
        {"commit": SHA_3, "result": "failed", "message": "<b>Broken</b>",
         "published": "2026-11-26T09:00:00+00:00"}])
    broken = {"commit": SHA_2, "result": "failed",
              "jobs": [ANALYSIS, build("debian-12-4.13", "failed", job_id=FAILED_ID,
                                       reason="Exit code 1")]}
    write_commit(state, "hello", **broken)
    write_status(state, "hello", "feature/broken", **broken, history=[
        {"commit": SHA_2, "result": "failed"}, {"commit": SHA_1, "result": "passed"}])
    skipped = {"commit": SHA_3, "result": "no-builds", "reason": "debian-12-4.13: no libfoo",
               "jobs": [ANALYSIS, build("debian-12-4.13", "skipped", reason="no libfoo")]}
    write_status(state, "hello", "all-skipped", **skipped)
    write_status(state, "<script>", "main", commit=SHA_1, result="pending", jobs=[])
    return state


@pytest.fixture
async def client(state_dir: Path) -> AsyncIterator[TestClient]:
    async with p.Engine(p.const(1), state_dir=state_dir) as engine:
        app = make_app(engine, extra_routes=routes(state_dir), extra_links=[("/ocaml", "OCaml")])
        async with TestClient(TestServer(app)) as test_client:
            yield test_client


def commit_result(page: str) -> list[str]:
    found = re.search(r'<dd id="result">.*?</dd>', page)
    assert found is not None, page
    return results(found.group())


def rows(page: str, attribute: str) -> dict[str, str]:
    return dict(re.findall(rf'<tr {attribute}="([^"]*)">(.*?)</tr>', page))


def cells(row: str) -> dict[str, str]:
    return dict(re.findall(r'<td data-kind="([^"]*)">(.*?)</td>', row))


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
    assert results(hello.group()) == ["failed", "no-builds", "passed"]


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
    branches = rows(page, "data-branch")
    assert set(branches) == {"main", "feature/broken", "all-skipped"}
    assert '<a href="/ocaml/hello/main">main</a>' in branches["main"]
    assert f'<a href="/ocaml/hello/commit/{SHA_1}"><code>{SHA_1[:12]}</code></a>' \
        in branches["main"]
    assert results(branches["main"]) == ["passed"]
    assert 'class="state state-ok"' in branches["main"]
    assert '<a href="/ocaml/hello/feature/broken">' in branches["feature/broken"]
    assert 'class="state state-failed"' in branches["feature/broken"]
    # No builds has a colour and words of its own.
    assert '<span class="state state-no-builds" data-result="no-builds">no builds</span>' \
        in branches["all-skipped"]


async def test_a_branch_with_its_head_and_history(client: TestClient) -> None:
    page = await get(client, "/ocaml/hello/main")
    assert commit_result(page) == ["passed"]
    assert f'href="/ocaml/hello/commit/{SHA_1}"' in re.search(
        r'<dd id="head">.*?</dd>', page).group()  # type: ignore[union-attr]
    assert '<img id="badge" src="/ocaml/hello/main/badge.svg"' in page
    history = rows(page, "data-commit")
    assert list(history) == [SHA_1, SHA_3]
    assert results(history[SHA_1]) == ["passed"] and "2026-11-27 12:01:08" in history[SHA_1]
    # Messages are text; each entry links to its commit.
    assert "&lt;b&gt;Broken&lt;/b&gt;" in history[SHA_3]
    assert f'href="/ocaml/hello/commit/{SHA_3}"' in history[SHA_3]

    skipped = await get(client, "/ocaml/hello/all-skipped")
    assert re.search(r'<dd id="result">.*data-result="no-builds".*no libfoo</dd>', skipped)


async def test_the_commit_page_has_the_matrix(client: TestClient) -> None:
    page = await get(client, f"/ocaml/hello/commit/{SHA_1}")
    assert f'<code id="commit">{SHA_1}</code>' in page
    assert '<pre id="message">Greet\n\nBy name.</pre>' in page
    assert "Ann &lt;ann@example.com&gt;" in page and "2026-11-27 11:00:00 +0100" in page
    assert commit_result(page) == ["passed"]
    # Its branches: main has it as its head, feature/broken in its history.
    branches = re.search(r'<dd id="branches">(.*?)</dd>', page).group(1)  # type: ignore[union-attr]
    assert branches == ('<a href="/ocaml/hello/feature/broken">feature/broken</a>, '
                        '<a href="/ocaml/hello/main">main</a> (head)')
    analysis = re.search(r'<dd id="analysis">.*?</dd>', page).group()  # type: ignore[union-attr]
    assert results(analysis) == ["passed"] and "/job/2026-11-27/115900-analysis" in analysis
    matrix = re.search(r'<table id="matrix">.*?</table>', page, re.DOTALL).group()  # type: ignore[union-attr]
    assert re.findall(r"<th>([^<]*)</th>", matrix) == [
        "Platform", "build", "lint-opam", "lint-fmt", "lint-doc", "debian-12-4.13",
        "debian-12-ocaml-5.2 (experimental)"]
    platforms = rows(matrix, "data-platform")
    assert list(platforms) == ["debian-12-4.13", "debian-12-ocaml-5.2"]
    system = cells(platforms["debian-12-4.13"])
    assert results(system["build"]) == ["passed"]
    assert f'<a class="log" href="/job/{BUILD_ID}">' in system["build"]
    assert "queued 2.0 s, ran 1 min 5 s" in system["build"]
    assert system["lint-opam"] == ""
    # A skipped job says why (escaped) and, never having run, links nowhere.
    assert results(system["lint-fmt"]) == ["skipped"]
    assert '<div class="reason">No .ocamlformat &lt;file&gt;</div>' in system["lint-fmt"]
    assert "<a " not in system["lint-fmt"] and "<a " not in system["lint-doc"]
    assert 'class="state state-running"' in system["lint-doc"]
    assert "queued" not in system["lint-doc"]
    ocaml = platforms["debian-12-ocaml-5.2"]
    # The reason is one line.
    assert '<div class="reason">dune build: Error: Unbound value nme</div>' \
        in cells(ocaml)["build"]
    # On loopback without an admin token, everyone is a builder.
    assert 'id="rebuild-failed"' in page and 'id="rebuild-all"' in page
    passed = await get(client, f"/ocaml/hello/commit/{SHA_2}")
    assert 'id="rebuild-failed"' in passed


async def test_the_badge(client: TestClient) -> None:
    for branch, words, colour in (("main", "passed", "#4c1"),
                                  ("feature/broken", "failed", "#e05d44"),
                                  ("all-skipped", "no builds", "#9f9f9f")):
        response = await client.get(f"/ocaml/hello/{branch}/badge.svg")
        assert response.status == 200
        assert response.content_type == "image/svg+xml"
        assert "no-cache" in response.headers["Cache-Control"]
        svg = await response.text()
        assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
        assert re.findall(r"<text[^>]*>([^<]*)</text>", svg) == ["ocaml-ci", words]
        assert f'fill="{colour}"' in svg
    response = await client.get("/ocaml/%3Cscript%3E/main/badge.svg")
    assert re.findall(r"<text[^>]*>([^<]*)</text>", await response.text()) == \
        ["ocaml-ci", "running"]
    await get(client, "/ocaml/hello/nope/badge.svg", 404)
    await get(client, "/ocaml/nope/main/badge.svg", 404)


async def test_unknown_names_are_404(client: TestClient) -> None:
    await get(client, "/ocaml/nope", 404)
    await get(client, "/ocaml/hello/nope", 404)
    await get(client, "/ocaml/hello/feature", 404)  # a directory, not a branch
    await get(client, f"/ocaml/hello/commit/{SHA_3}", 404)  # a history entry, no file
    await get(client, f"/ocaml/nope/commit/{SHA_1}", 404)


async def test_path_traversal_is_refused(client: TestClient, state_dir: Path) -> None:
    # A JSON file outside the status directory that a traversal would reach.
    write_status(state_dir, "..", "secret", commit="", result="passed", jobs=[])
    (state_dir / "secret.json").write_text(json.dumps({"commit": "leaked"}))
    (status_dir(state_dir) / "hello" / "commits" / f"{'a' * 40}.json").symlink_to(
        state_dir / "secret.json")
    for path in ("/ocaml/%2E%2E/secret", "/ocaml/hello/..%2F..%2F..%2Fsecret",
                 "/ocaml/hello/%2E%2E/%2E%2E/%2E%2E/secret", "/ocaml/..%2F..%2F..%2F/secret",
                 "/ocaml/hello/..%2F..%2F..%2Fsecret/badge.svg",
                 "/ocaml/hello/commit/..%2F..%2F..%2F..%2Fsecret",
                 f"/ocaml/hello/commit/{'a' * 40}"):
        response = await client.get(path)
        assert response.status == 404, path
        assert "leaked" not in await response.text()


async def test_a_malformed_status_file_shows_as_unknown(client: TestClient,
                                                        state_dir: Path) -> None:
    (status_dir(state_dir) / "hello" / "half.json").write_text('{"commit": "12')
    page = await get(client, "/ocaml/hello")
    assert results(rows(page, "data-branch")["half"]) == ["unknown"]
    assert commit_result(await get(client, "/ocaml/hello/half")) == ["unknown"]


async def test_rebuild_buttons_rebuild_the_commits_jobs_for_builders_only(
        tmp_path: Path) -> None:
    root, runs = recorded_jobs("ocaml-test-job", ("failing", "passing", "analysis"))
    state = tmp_path / "var"
    async with p.Engine(root, state_dir=state) as engine:
        await engine.wait_idle()
        ids = job_ids(engine)
        write_commit(state, "hello", commit=SHA_1, result="failed", jobs=[
            {**ANALYSIS, "job_id": ids["analysis"]},
            build("debian-12-4.13", "failed", job_id=ids["failing"]),
            lint("debian-12-4.13", "lint-opam", "passed", job_id=ids["passing"])])
        app = make_app(engine, admin_token="secret-token", extra_routes=routes(state))
        async with TestClient(TestServer(app)) as client:
            url = f"/ocaml/hello/commit/{SHA_1}"
            action, csrf = await log_in_to_rebuild(client, url, "secret-token")
            await rebuild(client, engine, action, csrf, "failed")
            assert sorted(runs) == ["analysis", "failing", "failing", "passing"]
            await rebuild(client, engine, action, csrf, "all")
            # Every platform job, not the analysis.
            assert sorted(runs) == ["analysis", "failing", "failing", "failing", "passing",
                                    "passing"]
            bad = await client.post(action, data={"csrf": csrf, "jobs": "x"})
            assert bad.status == 400


async def test_a_pending_cell_links_to_the_job_that_runs_it_and_says_for_how_long(
        tmp_path: Path) -> None:
    gate = asyncio.Event()

    @p.builder("ocaml-test-job")
    async def job(job: p.Job, key: str) -> str:
        await gate.wait()
        return key

    state = tmp_path / "var"
    async with p.Engine(job("build"), state_dir=state) as engine:
        async with asyncio.timeout(30):
            while not engine.jobs.active() or not engine.jobs.active()[0].started:
                await asyncio.sleep(0.01)
        [running] = engine.jobs.active()
        instance = engine.cache.find(running.id)
        assert instance is not None
        key = instance.key_digest
        write_commit(state, "hello", commit=SHA_1, result="pending", jobs=[
            ANALYSIS, build("debian-12-4.13", "pending", op="ocaml-test-job", key=key),
            lint("debian-12-4.13", "lint-opam", "pending", op="ocaml-test-job", key="other")])
        app = make_app(engine, extra_routes=routes(state))
        async with TestClient(TestServer(app)) as client:
            page = await get(client, f"/ocaml/hello/commit/{SHA_1}")
            matrix = re.search(r'<table id="matrix">.*?</table>', page, re.DOTALL).group()  # type: ignore[union-attr]
            system = cells(rows(matrix, "data-platform")["debian-12-4.13"])
            assert f'<a class="log" href="/job/{running.id}">' in system["build"]
            assert re.search(r"queued [0-9.]+ s, has run [0-9.]+ s", system["build"])
            # A key no job runs: its state only.
            assert "<a " not in system["lint-opam"] and "queued" not in system["lint-opam"]
        gate.set()


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
