"""The web UI in a real browser: Debian's chromium driven by Playwright against `pipeline run`.

The demo pipeline `examples/web_demo.py` runs as a real process with the web UI on a free
loopback port. Its jobs are steered through the control directory: `NAME.hold` keeps a job
running, lines appended to `NAME.say` go to its log. Nothing here measures time: every check
waits (generously) for a condition. Screenshots go to `tests/artifacts/` for review.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "web_demo.py"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000
"""How long a browser-side condition may take before the test fails (generous on purpose)."""

COLOURS = {"ok": "#90ee90", "running": "#ffa500", "failed": "#ff4500", "blocked": "#d3d3d3"}
"""Node fills from the README's table of states."""

NODE_FILL_JS = """
(label) => {
  for (const g of document.querySelectorAll('#diagram svg g.node')) {
    const texts = [...g.querySelectorAll('text')].map(t => t.textContent.trim());
    if (texts.join(' ') === label) {
      const shape = g.querySelector('path[fill], polygon[fill], ellipse[fill]');
      return shape ? shape.getAttribute('fill').toLowerCase() : null;
    }
  }
  return null;
}
"""
"""The fill colour of the diagram node labelled `label` (null if there is none)."""


def free_port() -> int:
    """A TCP port free on loopback at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Demo:
    """A running `pipeline run examples/web_demo.py` with its web UI."""

    url: str
    control: Path
    output: list[str]

    def hold(self, name: str) -> None:
        """Keep job NAME running once it reaches the end of its steps."""
        (self.control / f"{name}.hold").touch()

    def release(self, name: str) -> None:
        """Let job NAME finish."""
        (self.control / f"{name}.hold").unlink()

    def say(self, name: str, line: str) -> None:
        """Make the held job NAME write `line` to its log."""
        with (self.control / f"{name}.say").open("a") as f:
            f.write(line + "\n")


def _pump(stream: Iterator[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def serve(file: Path, args: list[str], tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """Run `pipeline run FILE --port FREE -- ARGS` until the caller is done; yield its URL and
    output so far; stop it with SIGINT and check it exits 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(file), "--state-dir", str(tmp_path / "state"),
         "--port", str(port), "--", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=WAIT_MS / 1000)
            except queue.Empty:
                pytest.fail("pipeline run printed no 'Web UI:' line:\n" + "".join(output))
            if line is None:
                pytest.fail("pipeline run exited before serving:\n" + "".join(output))
            output.append(line)
            found = re.search(r"Web UI: (http://\S+)", line)
            if found:
                url = found.group(1).rstrip("/")
        assert url == f"http://127.0.0.1:{port}", url
        yield url, output
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=WAIT_MS / 1000)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail("pipeline run did not stop on SIGINT")
        while (line := lines.get()) is not None:
            output.append(line)
    assert process.returncode == 0, "".join(output)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """Start the demo with `build-debian-12` and `test-alpine-3.19` held; stop it with SIGINT."""
    control = tmp_path / "control"
    control.mkdir()
    (control / "build-debian-12.hold").touch()
    (control / "test-alpine-3.19.hold").touch()
    with serve(DEMO, [str(control)], tmp_path) as (url, output):
        yield Demo(url, control, output)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Debian chromium (never a downloaded browser)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (setup.sh does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def node(page: Page, label: str) -> Locator:
    """The diagram node whose text is exactly `label`."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return page.locator("#diagram svg g.node").filter(has=page.locator("text", has_text=exact))


def node_link(page: Page, label: str) -> str:
    """Where the node labelled `label` links to (its job page)."""
    link = node(page, label).locator("a").first
    href = link.evaluate("(a) => a.getAttribute('xlink:href') || a.getAttribute('href')")
    return str(href)


def wait_fill(page: Page, label: str, state: str) -> None:
    """Wait until the node labelled `label` is drawn in `state`'s colour."""
    page.wait_for_function(
        f"(label) => ({NODE_FILL_JS})(label) === {COLOURS[state]!r}", arg=label, timeout=WAIT_MS
    )


def open_job(page: Page, url: str, label: str) -> str:
    """Open `/`, click the node labelled `label`, wait for its job page; return the job path."""
    page.goto(url + "/")
    link = node(page, label).locator("a").first
    expect(link).to_have_count(1, timeout=WAIT_MS)
    link.click()
    page.wait_for_url(re.compile(r"/job/"), timeout=WAIT_MS)
    expect(page.locator("#job-state")).to_be_visible(timeout=WAIT_MS)
    return page.url.removeprefix(url)


def test_the_web_ui_in_chromium(demo: Demo, browser: Browser) -> None:
    """Diagram, job links, live logs, Rebuild (orange then green, live) and Cancel."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    main = context.new_page()
    main.goto(demo.url + "/")

    # The diagram: inline SVG with every node of the demo.
    expect(main.locator("#diagram svg")).to_be_visible()
    expect(main.locator("#overall-state")).to_be_visible()
    expect(main.locator("#counts")).to_be_visible()
    labels = ["file version", "fetch", "platform list", "build debian-12", "build alpine-3.19",
              "test debian-12", "test alpine-3.19", "lint", "all"]
    for label in labels:
        expect(node(main, label)).to_have_count(1)
    # From here on the page must update itself: a reload would drop this marker.
    main.evaluate("window.__notReloaded = true")
    wait_fill(main, "build debian-12", "running")
    wait_fill(main, "lint", "failed")
    wait_fill(main, "build alpine-3.19", "ok")
    wait_fill(main, "test alpine-3.19", "running")
    main.screenshot(path=str(ARTIFACTS / "main.png"))

    # A job node links to its job page, whose log streams lines written after it opened.
    job = context.new_page()
    first_job = open_job(job, demo.url, "build debian-12")
    state = job.locator("#job-state")
    log = job.locator("#log")
    expect(state).to_contain_text(re.compile("running", re.I))
    expect(log).to_contain_text("Held: waiting")
    demo.say("build-debian-12", "a line written after the page opened")
    expect(log).to_contain_text("a line written after the page opened")
    demo.say("build-debian-12", "and another one")
    expect(log).to_contain_text("and another one")
    job.screenshot(path=str(ARTIFACTS / "job.png"))
    demo.release("build-debian-12")
    expect(state).to_contain_text(re.compile(r"\bok\b", re.I))
    expect(log).to_contain_text("Released")
    wait_fill(main, "build debian-12", "ok")

    # Rebuild: a new job runs (orange, held), then finishes (green), seen live on `/`.
    demo.hold("build-debian-12")
    job.locator("#rebuild").click()
    wait_fill(main, "build debian-12", "running")
    rebuilt = node_link(main, "build debian-12")
    assert rebuilt.startswith("/job/") and rebuilt != first_job, (rebuilt, first_job)
    demo.release("build-debian-12")
    wait_fill(main, "build debian-12", "ok")

    # Cancel: the held test job stops, fails with "Cancelled", and turns red on `/`.
    open_job(job, demo.url, "test alpine-3.19")
    expect(job.locator("#job-state")).to_contain_text(re.compile("running", re.I))
    job.locator("#cancel").click()
    expect(job.locator("#job-state")).to_contain_text(re.compile("failed", re.I))
    expect(job.locator("#log")).to_contain_text("Cancelled")
    wait_fill(main, "test alpine-3.19", "failed")

    assert main.evaluate("window.__notReloaded") is True, "the main page was reloaded"
    main.screenshot(path=str(ARTIFACTS / "main-after.png"))
    context.close()


def git(repo: Path, *args: str) -> None:
    """Run git in `repo` as a fixed author."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


def test_a_commit_turns_the_branch_orange_then_green(
    tmp_path: Path, browser: Browser, busybox_images: Path
) -> None:
    """examples/build_repo.py with the UI open: a commit re-builds its branch, seen live."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "build.spec").write_text(
        '((from busybox)\n (copy (src "version") (dst /version))\n'
        ' (run (shell "sleep 2; cat /version")))\n')
    (repo / "version").write_text("1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    args = ["--repo", str(repo), "--image-dir", str(busybox_images)]
    with serve(ROOT / "examples" / "build_repo.py", args, tmp_path) as (url, _):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        expect(node(page, "build")).to_have_count(1, timeout=WAIT_MS)
        wait_fill(page, "build", "ok")
        page.evaluate("window.__notReloaded = true")
        first = node_link(page, "build")
        (repo / "version").write_text("2\n")
        git(repo, "commit", "-q", "-am", "two")
        wait_fill(page, "build", "running")
        wait_fill(page, "build", "ok")
        assert node_link(page, "build") != first, "a new build job ran"
        assert page.evaluate("window.__notReloaded") is True, "the page was reloaded"
        page.close()


SPOOFER = """
import asyncio
from pathlib import Path

import pipeline as p


@p.builder("spoofer")
async def spoofer(job, control):
    while not (Path(control) / "go").exists():
        await asyncio.sleep(0.05)
    job.write(b'harmless\\r\\revent: end\\rdata: {"state": "ok", "finished": "spoofed", '
              b'"error": "SPOOFED by log"}\\r\\rx\\n')
    job.write("downloading 10%\\rdownloading 50%\\rdownloading 100%\\n")
    job.log("the rest of the log")
    raise RuntimeError("the real error")


def pipeline(args):
    return spoofer(p.const(args[0]))
"""
"""A job that, once `go` exists in its control directory, logs a line forging an `end` event
(EventSource ends lines at CR), a progress line, one more line, then fails."""


LINE_TEXTS_JS = """
() => [...document.querySelectorAll('#log .line')].map(
  (line) => line.textContent.slice(line.querySelector('.ln').textContent.length))
"""
"""The text of each line of a job page's log, without its line number."""


def test_a_log_cannot_forge_events(tmp_path: Path, browser: Browser) -> None:
    """The job page shows the real failure and the whole log, whatever bytes the log holds."""
    (tmp_path / "spoofer.py").write_text(SPOOFER)
    control = tmp_path / "control"
    control.mkdir()
    with serve(tmp_path / "spoofer.py", [str(control)], tmp_path) as (url, _):
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)  # clicks and waits; expect() is given WAIT_MS
        page.goto(url + "/jobs")
        page.locator("a[href^='/job/']").first.click()
        page.wait_for_url(re.compile(r"/job/"))
        log, error = page.locator("#log"), page.locator("#job-error")
        expect(log).to_contain_text("Job started", timeout=WAIT_MS)
        (control / "go").touch()
        expect(page.locator("#job-state")).to_have_text("failed", timeout=WAIT_MS)
        expect(error).to_have_text("RuntimeError: the real error", timeout=WAIT_MS)
        expect(log).to_contain_text("Job failed: RuntimeError: the real error", timeout=WAIT_MS)
        assert page.locator("#log").get_attribute("data-complete") == "true"
        texts = page.evaluate(LINE_TEXTS_JS)
        forged = texts.index("x")
        assert texts[forged + 1] == "downloading 100%", texts
        assert texts[forged + 2].endswith("the rest of the log"), texts
        assert "SPOOFED" not in page.content() and "spoofed" not in page.content()
        # Loaded again after the end, the finished log shows the same.
        page.reload()
        expect(error).to_have_text("RuntimeError: the real error", timeout=WAIT_MS)
        expect(log).to_contain_text("the rest of the log", timeout=WAIT_MS)
        assert "SPOOFED" not in page.content()
        page.close()
