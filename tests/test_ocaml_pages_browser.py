"""The OCaml CI's pages in a real browser: Debian's chromium driven by Playwright against
`pipeline run pipelines/ocaml_ci.py`, building a real project (the demo with a broken test) in
the session's shared store.

Nothing here measures time: every check waits (generously) for a condition. Screenshots go to
`tests/artifacts/` for review.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from ocaml_fixtures import HANG_GUARD
from playwright.sync_api import Browser, Page, expect

# The browser fixture is shared with the web UI's browser tests (pytest finds it by name here).
from test_web_browser import ARTIFACTS, browser, serve  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = ROOT / "pipelines" / "ocaml_ci.py"
EXAMPLE = ROOT / "examples" / "ocaml-hello"
BROKEN_GREET = 'let greet name = "Goodbye, " ^ name ^ "!"\n'
WAIT_MS = HANG_GUARD * 1000
"""The first build of the session may install Debian's OCaml: as long as the hang guard."""


def broken_repo(path: Path) -> str:
    """A git repository of the demo project whose test fails; returns the commit's hash."""
    shutil.copytree(EXAMPLE, path, ignore=shutil.ignore_patterns("_build"))
    (path / "src" / "hello.ml").write_text(BROKEN_GREET)
    git = ["git", "-c", "user.name=Ann", "-c", "user.email=ann@example.com"]
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["commit", "-q", "-m", "Say goodbye\n\nThe test will not like it."]):
        subprocess.run([*git, *args], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True,
                          capture_output=True, text=True).stdout.strip()


def reload_until(page: Page, condition: str) -> None:
    """Reload the page until the JavaScript expression `condition` holds (the pages do not
    update live)."""
    deadline = time.monotonic() + HANG_GUARD
    while not page.evaluate(f"() => Boolean({condition})"):
        assert time.monotonic() < deadline, f"never true: {condition}"
        page.wait_for_timeout(500)
        page.reload()


def test_the_commit_page_rebuild_failed_and_the_badge(
        tmp_path: Path, browser: Browser, ocaml_store: str, debian_mirror: str,  # noqa: F811
        ) -> None:
    """Matrix with durations, the failing test quoted as the reason, Rebuild failed making a new
    job, the branch's history and its badge."""
    commit = broken_repo(tmp_path / "hello")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--repo", str(tmp_path / "hello"), "--store", ocaml_store,
            "--debian-mirror", debian_mirror]
    with serve(PIPELINE_FILE, args, tmp_path) as (url, _output):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        commit_page = f"{url}/ocaml/hello/commit/{commit}"
        page.goto(url + "/ocaml/hello/main")
        reload_until(page, "document.querySelector('#result [data-result=\"failed\"]')")
        # The branch's history links to the commit's page.
        page.locator(f'#history tr[data-commit="{commit}"] a').click()
        page.wait_for_url(commit_page)
        # The commit failed with its first failed build: the other jobs may still run.
        reload_until(page, "!document.querySelector('#matrix [data-result=\"pending\"]')")
        expect(page.locator("#message")).to_contain_text("Say goodbye")
        expect(page.locator("#author")).to_have_text("Ann <ann@example.com>")
        expect(page.locator("#branches")).to_have_text("main (head)")

        cell = page.locator('#matrix tr[data-platform="debian-12-4.13"] td[data-kind="build"]')
        expect(cell.locator("[data-result]")).to_have_attribute("data-result", "failed")
        # The reason quotes alcotest's failure (both tests fail: "Goodbye, !" too).
        expect(cell.locator(".reason")).to_have_text(re.compile(
            r"^dune build @install @check @runtest: \[FAIL\] greet \d (world|empty)\.$"))
        expect(cell.locator(".durations")).to_have_text(
            re.compile(r"^queued [\d.]+ s, ran (\d+ min )?[\d.]+ s$"))
        # Debian 13's row too, with the lints: odoc is Debian's ocaml-odoc, ocamlformat
        # Debian's 0.27.0, which the demo's .ocamlformat asks for.
        expect(page.locator('#matrix tr[data-platform="debian-13-5.3"] td[data-kind="build"] '
                            '[data-result]')).to_have_attribute("data-result", "failed")
        for lint in ("lint-opam", "lint-fmt", "lint-doc"):
            lint_cell = page.locator('#matrix tr[data-platform="debian-13-5.3"] '
                                     f'td[data-kind="{lint}"]')
            expect(lint_cell.locator("[data-result]")).to_have_attribute("data-result", "passed")
        old_job = cell.locator("a.log").get_attribute("href")
        page.screenshot(path=str(ARTIFACTS / "ocaml-commit-page.png"), full_page=True)

        # Rebuild failed: the failed build runs again, as a new job.
        with page.expect_navigation():
            page.locator("#rebuild-failed").click()
        assert page.url == commit_page
        reload_until(page, f"""(() => {{
            const cell = document.querySelector(
                '#matrix tr[data-platform="debian-12-4.13"] td[data-kind="build"]');
            const link = cell && cell.querySelector('a.log');
            return link && link.getAttribute('href') !== {old_job!r}
                && cell.querySelector('[data-result="failed"]');
        }})()""")
        new_job = cell.locator("a.log").get_attribute("href")
        assert new_job is not None and new_job != old_job
        expect(cell.locator(".reason")).to_contain_text("[FAIL] greet ")
        cell.locator("a.log").click()
        page.wait_for_url(re.compile(re.escape(new_job) + "$"))

        badge = page.goto(url + "/ocaml/hello/main/badge.svg")
        assert badge is not None and badge.ok
        assert badge.headers["content-type"].startswith("image/svg+xml")
        assert "no-cache" in badge.headers["cache-control"]
        assert "failed" in badge.text() and "ocaml-ci" in badge.text()
        context.close()
