"""opam-repo-ci's pages (`pipeline.ocaml.web.OPAM_REPO_CI`, under `/opam`), from status files the
tests write with opam-repo-ci's kinds of job, served by the real web app: the pull requests of a
repository, a pull request, and a commit's analysis, lint and matrix of (package, platform) rows
with their builds, tests, lower bounds and reverse dependencies."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from ci_pages import get, job_ids, log_in_to_rebuild, rebuild, recorded_jobs, results

import pipeline as p
from pipeline.ocaml import status as St
from pipeline.ocaml.web import OCAML_CI, OPAM_REPO_CI, commit_url, routes
from pipeline.web.server import make_app

CI = OPAM_REPO_CI.ci
SHA_1 = "1" * 40
SHA_2 = "2" * 40
SHA_3 = "3" * 40
PLATFORM = "debian-12-4.13"
BUILD_ID = "2026-11-28/120000-opam-build-aaaaaa"
REVDEP_FAILED_ID = "2026-11-28/120200-opam-revdep-bbbbbb"
PUBLISHED = datetime(2026, 11, 28, 12, 5, tzinfo=UTC)
INFO = St.CommitInfo("Release foo.1.1\n\nWith tests.", "Ann <ann@example.com>",
                     "2026-11-28T11:00:00+01:00")


def job(kind: str, state: St.JobState, *, package: str | None = "foo.1.1",
        platform: str | None = PLATFORM, revdep: str | None = None,
        job_id: str | None = None, reason: str | None = None) -> St.JobStatus:
    name = " ".join(part for part in (platform, package, kind, revdep) if part)
    return St.JobStatus(name, kind, platform, state, job_id, reason, package=package,
                        revdep=revdep)


ANALYSIS = job("analysis", "passed", package=None, platform=None,
               job_id="2026-11-28/115900-opam-analysis-cccccc")
LINT_PASSED = job("lint", "passed", package=None, platform=None,
                  job_id="2026-11-28/115930-opam-lint-dddddd")
NEW_RELEASE_JOBS = (
    ANALYSIS, LINT_PASSED,
    job("build", "passed", job_id=BUILD_ID),
    job("test", "passed", job_id="2026-11-28/120100-opam-test-eeeeee"),
    job("lower-bounds", "skipped", reason="no lower bounds <solution>"),
    job("revdeps", "passed", job_id="2026-11-28/120110-opam-revdeps-ffffff"),
    job("revdep", "passed", revdep="bar.1.0", job_id="2026-11-28/120120-opam-revdep-gggggg"),
    job("revdep", "passed", revdep="bar.2.0", job_id="2026-11-28/120130-opam-revdep-hhhhhh"),
    job("revdep", "passed", revdep="baz.0.3", job_id="2026-11-28/120140-opam-revdep-iiiiii"),
    job("revdep", "failed", revdep="qux.0.1", job_id=REVDEP_FAILED_ID,
        reason="opam install qux.0.1: Error: Unbound module Foo\nmore"),
    job("build", "passed", package="quux.0.2", job_id="2026-11-28/120300-opam-build-jjjjjj"),
    job("revdeps", "passed", package="quux.0.2"),
)


def write(state_dir: Path, branch: str, commit: str, result: St.Result,
          jobs: tuple[St.JobStatus, ...], *, repo: str = "opam-repository",
          reason: str | None = None) -> None:
    St.write_status(state_dir, St.CommitStatus(repo, branch, commit, result, jobs, reason, INFO),
                    PUBLISHED, ci=CI)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "var"
    write(state, "new-release", SHA_3, "passed", (ANALYSIS, LINT_PASSED))
    write(state, "new-release", SHA_1, "failed", NEW_RELEASE_JOBS)
    write(state, "lint-error", SHA_2, "failed", (ANALYSIS, job(
        "lint", "failed", package=None, platform=None, job_id="2026-11-28/lint-kkkkkk",
        reason="packages/foo/foo.1.2/opam: maintainer-contact: no email <here>")))
    write(state, "<script>alert(1)</script>", SHA_2, "pending", (ANALYSIS,),
          repo="<img src=x>")
    return state


@pytest.fixture
async def client(state_dir: Path) -> AsyncIterator[TestClient]:
    async with p.Engine(p.const(1), state_dir=state_dir) as engine:
        app = make_app(engine, extra_routes=[*routes(state_dir, OPAM_REPO_CI),
                                             *routes(state_dir)])
        async with TestClient(TestServer(app)) as test_client:
            yield test_client


def element(page: str, pattern: str) -> str:
    found = re.search(pattern, page, re.DOTALL)
    assert found is not None, (pattern, page)
    return found.group()


def cells(row: str) -> dict[str, str]:
    return dict(re.findall(r'<td data-kind="([^"]*)">(.*?)</td>', row, re.DOTALL))


async def test_the_repositories_count_pull_requests(client: TestClient) -> None:
    page = await get(client, "/opam")
    assert "<title>opam-repo-ci" in page
    assert "<th>Pull requests</th>" in page
    row = element(page, r'<tr data-repo="opam-repository">.*?</tr>')
    assert '<a href="/opam/opam-repository">opam-repository</a>' in row
    assert results(row) == ["failed"]  # both pull requests' heads failed
    assert "failed</span> 2" in row
    # OCaml CI's pages read their own files: none here.
    assert "No repository has been built yet." in await get(client, "/ocaml")


async def test_the_pull_requests_of_a_repository(client: TestClient) -> None:
    page = await get(client, "/opam/opam-repository")
    assert "<th>Pull request</th><th>Commit</th><th>Result</th>" in page
    prs = dict(re.findall(r'<tr data-branch="([^"]*)">(.*?)</tr>', page))
    assert set(prs) == {"new-release", "lint-error"}
    assert '<a href="/opam/opam-repository/new-release">new-release</a>' in prs["new-release"]
    assert f'<a href="/opam/opam-repository/commit/{SHA_1}">' in prs["new-release"]
    assert results(prs["lint-error"]) == ["failed"]


async def test_a_pull_request_with_its_head_history_and_badge(client: TestClient) -> None:
    page = await get(client, "/opam/opam-repository/new-release")
    head = element(page, r'<dd id="head">.*?</dd>')
    assert f'href="/opam/opam-repository/commit/{SHA_1}"' in head and "Release foo.1.1" in head
    assert results(element(page, r'<dd id="result">.*?</dd>')) == ["failed"]
    assert re.findall(r'<tr data-commit="([^"]*)">', page) == [SHA_1, SHA_3]
    assert ('<img id="badge" src="/opam/opam-repository/new-release/badge.svg" '
            'alt="opam-repo-ci status">') in page
    badge = await client.get("/opam/opam-repository/new-release/badge.svg")
    assert badge.content_type == "image/svg+xml"
    assert re.findall(r"<text[^>]*>([^<]*)</text>", await badge.text()) == \
        ["opam-repo-ci", "failed"]


async def test_the_commit_page_has_analysis_lint_and_a_row_per_package_and_platform(
        client: TestClient) -> None:
    url = commit_url("opam-repository", SHA_1, OPAM_REPO_CI)
    assert url == f"/opam/opam-repository/commit/{SHA_1}"
    page = await get(client, url)
    assert f'<code id="commit">{SHA_1}</code>' in page
    assert "<dt>Pull requests</dt>" in page
    assert element(page, r'<dd id="branches">.*?</dd>') == (
        '<dd id="branches"><a href="/opam/opam-repository/new-release">new-release</a>'
        " (head)</dd>")
    analysis = element(page, r'<dd id="analysis">.*?</dd>')
    assert results(analysis) == ["passed"] and f'href="/job/{ANALYSIS.job_id}"' in analysis
    lint = element(page, r'<dd id="lint">.*?</dd>')
    assert results(lint) == ["passed"] and f'href="/job/{LINT_PASSED.job_id}"' in lint

    matrix = element(page, r'<table id="matrix">.*?</table>')
    assert re.findall(r"<th>([^<]*)</th>", matrix)[:6] == [
        "Package", "Platform", "build", "test", "lower-bounds", "revdeps"]
    rows = dict(((package, platform), row) for package, platform, row in re.findall(
        r'<tr data-package="([^"]*)" data-platform="([^"]*)">(.*?)</tr>', matrix, re.DOTALL))
    assert list(rows) == [("foo.1.1", PLATFORM), ("quux.0.2", PLATFORM)]
    foo = cells(rows["foo.1.1", PLATFORM])
    assert list(foo) == ["build", "test", "lower-bounds", "revdeps"]
    assert results(foo["build"]) == ["passed"] and f'href="/job/{BUILD_ID}"' in foo["build"]
    assert results(foo["test"]) == ["passed"]
    assert '<div class="reason">no lower bounds &lt;solution&gt;</div>' in foo["lower-bounds"]
    # The revdeps cell: the listing job, the count, then each revdep's build; opened, as one
    # failed.
    revdeps = foo["revdeps"]
    assert results(revdeps) == ["passed", "passed", "passed", "passed", "failed"]
    assert '<details class="listed" open><summary class="count">3 passed, 1 failed</summary>' \
        in revdeps
    listed = dict(re.findall(r'<li data-revdep="([^"]*)">(.*?)</li>', revdeps, re.DOTALL))
    assert list(listed) == ["bar.1.0", "bar.2.0", "baz.0.3", "qux.0.1"]
    assert listed["qux.0.1"].startswith("qux.0.1 ")
    assert f'<a class="log" href="/job/{REVDEP_FAILED_ID}">' in listed["qux.0.1"]
    assert '<div class="reason">opam install qux.0.1: Error: Unbound module Foo</div>' \
        in listed["qux.0.1"]
    quux = cells(rows["quux.0.2", PLATFORM])
    assert results(quux["build"]) == ["passed"] and quux["test"] == ""
    # Its revdeps' listing passed and found none: no count, nothing folded.
    assert results(quux["revdeps"]) == ["passed"] and "<details" not in quux["revdeps"]
    # On loopback without an admin token, everyone is a builder.
    assert 'id="rebuild-failed"' in page and 'id="rebuild-all"' in page
    action = element(page, r'<form class="action" method="post" action="[^"]*"')
    assert f'action="{url}/rebuild"' in action


async def test_a_lint_failure_shows_its_rule_and_no_matrix(client: TestClient) -> None:
    page = await get(client, f"/opam/opam-repository/commit/{SHA_2}")
    lint = element(page, r'<dd id="lint">.*?</dd>')
    assert results(lint) == ["failed"]
    assert ('<div class="reason">packages/foo/foo.1.2/opam: maintainer-contact: no email '
            "&lt;here&gt;</div>") in lint
    assert "No platform jobs (yet)." in page
    # Nothing to rebuild in the matrix: no buttons (the analysis and lint are not rebuilt).
    assert "rebuild-all" not in page


async def test_unknown_names_are_404(client: TestClient) -> None:
    await get(client, "/opam/nope", 404)
    await get(client, "/opam/opam-repository/nope", 404)
    await get(client, "/opam/opam-repository/nope/badge.svg", 404)
    await get(client, f"/opam/opam-repository/commit/{'4' * 40}", 404)
    await get(client, f"/opam/nope/commit/{SHA_1}", 404)
    # The OCaml CI pages do not show opam-repo-ci's files, nor the other way round.
    await get(client, "/ocaml/opam-repository", 404)
    await get(client, f"/ocaml/opam-repository/commit/{SHA_1}", 404)


async def test_hostile_names_are_text(client: TestClient) -> None:
    page = await get(client, "/opam")
    main = page.split("<main>")[1]
    assert "<img src=x>" not in main
    assert '<a href="/opam/%3Cimg%20src%3Dx%3E">&lt;img src=x&gt;</a>' in main
    page = await get(client, "/opam/%3Cimg%20src%3Dx%3E")
    main = page.split("<main>")[1]
    assert "<script>" not in main
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in main


async def test_rebuild_needs_the_builder_role_and_the_csrf_token(tmp_path: Path) -> None:
    keys = ("analysis", "lint", "build", "failing-revdep", "revdeps")
    root, runs = recorded_jobs("opam-test-job", keys)
    state = tmp_path / "var"
    async with p.Engine(root, state_dir=state) as engine:
        await engine.wait_idle()
        ids = job_ids(engine)
        write(state, "new-release", SHA_1, "failed", (
            job("analysis", "passed", package=None, platform=None, job_id=ids["analysis"]),
            job("lint", "passed", package=None, platform=None, job_id=ids["lint"]),
            job("build", "passed", job_id=ids["build"]),
            job("revdeps", "passed", job_id=ids["revdeps"]),
            job("revdep", "failed", revdep="qux.0.1", job_id=ids["failing-revdep"])))
        app = make_app(engine, admin_token="secret-token",
                       extra_routes=routes(state, OPAM_REPO_CI))
        async with TestClient(TestServer(app)) as client:
            url = f"/opam/opam-repository/commit/{SHA_1}"
            action, csrf = await log_in_to_rebuild(client, url, "secret-token")
            await rebuild(client, engine, action, csrf, "failed")
            assert sorted(runs) == sorted([*keys, "failing-revdep"])
            await rebuild(client, engine, action, csrf, "all")
            # The build, the listing and the revdep again; never the analysis nor the lint.
            assert sorted(runs) == sorted([*keys, "failing-revdep", "build", "failing-revdep",
                                           "revdeps"])


def test_the_two_sites_differ_only_in_their_parameters() -> None:
    assert (OCAML_CI.prefix, OCAML_CI.ci) == ("/ocaml", "ocaml-ci")
    assert (OPAM_REPO_CI.prefix, OPAM_REPO_CI.ci) == ("/opam", "opam-repo-ci")
    assert OPAM_REPO_CI.rebuilt_kinds == {"build", "test", "lower-bounds", "revdeps", "revdep"}
    assert "analysis" not in OCAML_CI.rebuilt_kinds
