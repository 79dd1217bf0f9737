"""opam-repo-ci's pages in a real browser: Debian's chromium driven by Playwright against
`pipeline run` of a pipeline file serving `pipeline.ocaml.web.OPAM_REPO_CI`'s pages over status
files written as the status publisher writes them. Screenshots go to `tests/artifacts/`."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

from playwright.sync_api import Browser, expect

# The browser fixture is shared with the web UI's browser tests (pytest finds it by name here).
from test_web_browser import ARTIFACTS, WAIT_MS, browser, serve  # noqa: F401

from pipeline.ocaml import status as St
from pipeline.ocaml.web import OPAM_REPO_CI

SHA = "c0ffee" + "0" * 34
PLATFORM = "debian-12-4.13"
PIPELINE_FILE = """
    import pipeline as p
    from pipeline.ocaml import web

    web_links = [("/opam", "opam-repo-ci")]

    def pipeline(args):
        return p.const(1)

    def web_routes(state_dir):
        return web.routes(state_dir, web.OPAM_REPO_CI)
"""


def job(kind: str, state: St.JobState, package: str | None = "foo.1.1",
        revdep: str | None = None, reason: str | None = None) -> St.JobStatus:
    platform = None if package is None else PLATFORM
    name = " ".join(part for part in (platform, package, kind, revdep) if part)
    return St.JobStatus(name, kind, platform, state, reason=reason, package=package,
                        revdep=revdep)


def write_statuses(state_dir: Path) -> None:
    jobs = (job("analysis", "passed", None), job("lint", "passed", None),
            job("build", "passed"), job("test", "passed"),
            job("lower-bounds", "failed", reason="opam install foo.1.1: no solution"),
            job("revdeps", "passed"),
            *(job("revdep", "passed", revdep=f"bar.{n}.0") for n in range(1, 4)),
            job("build", "passed", package="baz.0.2"))
    St.write_status(state_dir, St.CommitStatus(
        "opam-repository", "new-release", SHA, "failed", jobs,
        info=St.CommitInfo("Release foo.1.1", "Ann <ann@example.com>",
                           "2026-11-28T11:00:00+00:00")),
        datetime(2026, 11, 28, 12, tzinfo=UTC), ci=OPAM_REPO_CI.ci)


def test_from_the_repositories_to_a_pull_requests_commit_and_its_revdeps(
        tmp_path: Path, browser: Browser) -> None:  # noqa: F811
    write_statuses(tmp_path / "state")
    file = tmp_path / "opam_pages.py"
    file.write_text(textwrap.dedent(PIPELINE_FILE))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serve(file, [], tmp_path) as (url, _output):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        page.goto(url + "/")
        page.get_by_role("link", name="opam-repo-ci").first.click()
        page.wait_for_url(url + "/opam")
        page.locator('#repositories a[href="/opam/opam-repository"]').click()
        page.locator('#branches tr[data-branch="new-release"] td a').first.click()
        page.wait_for_url(url + "/opam/opam-repository/new-release")
        expect(page.locator("#result [data-result]")).to_have_attribute("data-result", "failed")
        page.locator("#head a").click()
        page.wait_for_url(f"{url}/opam/opam-repository/commit/{SHA}")
        expect(page.locator("#lint [data-result]")).to_have_attribute("data-result", "passed")
        row = page.locator(f'#matrix tr[data-package="foo.1.1"][data-platform="{PLATFORM}"]')
        expect(row.locator('td[data-kind="lower-bounds"] .reason')).to_have_text(
            "opam install foo.1.1: no solution")
        revdeps = row.locator('td[data-kind="revdeps"]')
        expect(revdeps.locator("summary")).to_have_text("3 passed")
        # None failed: the list is folded until opened.
        listed = revdeps.locator("li[data-revdep]")
        expect(listed.first).to_be_hidden()
        revdeps.locator("summary").click()
        expect(listed).to_have_count(3)
        expect(listed.nth(1)).to_be_visible()
        expect(listed.nth(1)).to_contain_text("bar.2.0")
        expect(listed.nth(1).locator("[data-result]")).to_have_attribute("data-result",
                                                                         "passed")
        expect(page.locator('#matrix tr[data-package="baz.0.2"] td[data-kind="build"] '
                            "[data-result]")).to_have_attribute("data-result", "passed")
        page.screenshot(path=str(ARTIFACTS / "opam-repo-ci-commit.png"), full_page=True)
        context.close()
