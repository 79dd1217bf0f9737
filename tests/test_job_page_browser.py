"""The job page of a real build in a real browser: Debian's chromium driven by Playwright against
`pipeline run examples/build_repo.py`, building with the real builder (runc, rsync store).

The build's first step prints many lines, its last prints a very long line and fails. Its job
page opens the failing step and scrolls to it; Rebuild takes the browser to the new job, whose
first steps come from the cache and are folded. Nothing here measures time: every check waits
for a condition. Screenshots go to `tests/artifacts/` for review.
"""

from __future__ import annotations

import re
from pathlib import Path

import test_web_browser
from playwright.sync_api import Browser, Page, expect
from test_web_browser import ARTIFACTS, WAIT_MS, git, open_job, serve

browser = test_web_browser.browser
"""Headless Debian chromium: the fixture of the web UI's browser tests."""

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "build_repo.py"
LONG = 3000
"""Characters in the failing step's long line, without a space to break at."""
SPEC = f"""\
((from busybox)
 (run (shell "i=1; while [ $i -le 150 ]; do echo prepared $i; i=$((i+1)); done"))
 (run (shell "i=0; while [ $i -lt {LONG // 10} ]; do printf 0123456789; i=$((i+1)); done;
              echo; exit 1")))
"""


def wait_for_end(page: Page) -> None:
    expect(page.locator("#log")).to_have_attribute("data-complete", "true", timeout=WAIT_MS)


def check_failing_step(page: Page) -> None:
    """The failing step is open, scrolled to, and its long line wraps within the window."""
    failed = page.locator("#log details.step-failed")
    expect(failed).to_have_count(1)
    expect(failed).to_have_attribute("open", "")
    expect(failed.locator("summary")).to_contain_text("failed")
    expect(failed.locator("summary")).to_contain_text("exit 1")
    expect(failed.locator("summary")).to_be_in_viewport()
    long_line = failed.locator(".line", has_text="0123456789" * 20)
    box = long_line.bounding_box()
    width = page.evaluate("document.documentElement.clientWidth")
    assert box is not None and box["width"] <= width, (box, width)
    assert box["height"] > 3 * 16, "the long line wraps over several rows"
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "no sideways scroll"


def test_a_build_jobs_steps_fold_and_rebuild_follows_the_new_job(
        tmp_path: Path, browser: Browser, busybox_images: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch", "main")
    (repo / "build.spec").write_text(SPEC)
    git(repo, "add", "build.spec")
    git(repo, "commit", "--quiet", "-m", "a failing build")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--repo", str(repo), "--image-dir", str(busybox_images)]
    with serve(EXAMPLE, args, tmp_path) as (url, _):
        context = browser.new_context(viewport={"width": 1000, "height": 700},
                                      accept_downloads=True)
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        first = url + open_job(page, url, "build")
        wait_for_end(page)
        expect(page.locator("#job-state")).to_have_text("failed")

        # Built, not cached: the first steps stay open; the failing one is open and shown.
        steps = page.locator("#log details.step")
        expect(steps).to_have_count(3)
        expect(page.locator("#log details.step-saved[open]")).to_have_count(2)
        check_failing_step(page)
        page.screenshot(path=str(ARTIFACTS / "job-failed-build.png"))

        # The raw log, as the job wrote it.
        with page.expect_download() as download:
            page.locator("#log-download").click()
        job_id = first.partition("/job/")[2]
        raw = (tmp_path / "state" / "job" / f"{job_id}.log").read_bytes()
        assert Path(download.value.path()).read_bytes() == raw
        assert download.value.suggested_filename == job_id.replace("/", "-") + ".log"

        # Rebuild: the browser goes to the new job's page.
        page.locator("#rebuild").click()
        page.wait_for_url(lambda address: "/job/" in address and address != first)
        second = page.url
        wait_for_end(page)
        expect(page.locator("#job-state")).to_have_text("failed")
        cached = page.locator("#log details.step-cached")
        expect(cached).to_have_count(2)
        for index in range(2):
            section = cached.nth(index)
            expect(section).not_to_have_attribute("open", "")
            expect(section.locator("summary")).to_contain_text(
                re.compile(r'using cache [0-9a-f]{64}'))
            expect(section.locator(".step-body")).to_be_hidden()
        expect(cached.nth(0).locator("summary")).to_contain_text("(from busybox)")
        check_failing_step(page)
        page.screenshot(path=str(ARTIFACTS / "job-rebuilt.png"), full_page=True)

        # A link to a line inside a folded step opens the step and shows the line.
        line_id = cached.nth(1).locator(".step-body .line", has_text="prepared 75").get_attribute(
            "id")
        page.goto(f"{second}#{line_id}")
        wait_for_end(page)
        target = page.locator(f"#{line_id}")
        expect(target).to_be_visible()
        expect(target).to_be_in_viewport()
        expect(target).to_have_class(re.compile(r"\btarget\b"))

        # The old job's page links to the newer run.
        page.goto(first)
        expect(page.locator("#newer-run a")).to_have_attribute(
            "href", second.removeprefix(url))
        context.close()
