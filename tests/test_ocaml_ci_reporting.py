"""The OCaml CI pipeline's reporting: GitHub commit statuses, its pages in the web UI and its
diagram.

A repository without opam files fails at the analysis, which needs no sandbox: enough to see
the result travel to the GitHub stand-in and to the pipeline's pages. The demo project with a
fetcher that has no images draws every node without running a step.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp.test_utils import TestClient, TestServer
from github_statuses import github_statuses
from ocaml_fixtures import assert_labels_for_people

import pipeline as p
from pipeline.web.server import make_app

TOKEN = "ghp_stand-in-token"
HOOK_SECRET = b"hook-secret"


def _load_ocaml_ci() -> ModuleType:
    """`pipelines/ocaml_ci.py`, loaded by path as `pipeline run` loads it."""
    path = Path(__file__).parent.parent / "pipelines" / "ocaml_ci.py"
    spec = importlib.util.spec_from_file_location("ocaml_ci_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ocaml_ci = _load_ocaml_ci()


def make_repo(path: Path) -> str:
    """A git repository whose only commit has no opam file; returns the commit hash."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    path.mkdir()
    (path / "README").write_text("no OCaml here\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True,
                          capture_output=True, text=True).stdout.strip()


async def test_result_goes_to_github_and_to_the_pages(tmp_path: Path, debian_mirror: str) -> None:
    commit = make_repo(tmp_path / "project")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    state_dir = tmp_path / "var"
    async with github_statuses(TOKEN) as github:
        root = ocaml_ci.pipeline([
            "--repo", str(tmp_path / "project"), "--store", "rsync:store",
            "--github-token-file", str(token_file), "--github-api-url", github.url,
            "--github-repo", "owner/project", "--debian-mirror", debian_mirror,
            "--public-url", "https://ci.example/",
        ])
        async with p.Engine(root, state_dir=state_dir) as engine:
            await engine.wait_idle()
            assert isinstance(engine.root_output(), p.Failed)
            assert {r.path for r in github.requests} == {
                f"/repos/owner/project/statuses/{commit}"}
            states = [r.body["state"] for r in github.requests]
            # "pending" is published while the analysis runs, if the publisher is quick enough.
            assert states[-1] == "failure" and set(states) <= {"pending", "failure"}
            assert all(r.body["context"] == "ocaml-ci" for r in github.requests)
            # Each links to the commit's page, on the web UI's public address.
            commit_page = f"/ocaml/project/commit/{commit}"
            assert {r.body["target_url"] for r in github.requests} == {
                f"https://ci.example{commit_page}"}

            app = make_app(engine, extra_routes=ocaml_ci.web_routes(state_dir),
                           extra_links=ocaml_ci.web_links, webhook_secret=HOOK_SECRET)
            async with TestClient(TestServer(app)) as client:
                index = await client.get("/ocaml")
                assert index.status == 200 and "project" in await index.text()
                page = await client.get("/ocaml/project/main")
                text = await page.text()
                assert page.status == 200
                assert commit[:7] in text
                page = await client.get(commit_page)
                text = await page.text()
                assert page.status == 200
                assert commit in text and "No opam files found" in text
                home = await client.get("/")
                assert 'href="/ocaml"' in await home.text()
                # The pipeline adds the git primitive's webhook: a push to the watched
                # repository makes its monitor read it again.
                body = json.dumps({"repository": {"url": str(tmp_path / "project")}}).encode()
                signature = hmac.new(HOOK_SECRET, body, hashlib.sha256).hexdigest()
                hook = await client.post("/webhooks/git", data=body, headers={
                    "X-Hub-Signature-256": f"sha256={signature}", "X-GitHub-Delivery": "d1"})
                assert hook.status == 200 and await hook.json() == {"refreshed": 1}


async def test_the_live_diagram_of_the_demo_has_labels_for_people(
        tmp_path: Path, debian_mirror: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    async with github_statuses(TOKEN) as github:
        root = ocaml_ci.pipeline([
            "--demo", "--demo-dir", str(tmp_path / "demo"), "--store", "rsync:store",
            "--fetcher", f"local:{no_images}",
            # The longest platform name of all; each index is some seconds to read.
            "--platforms", "debian-12-4.13,debian-13-5.3,debian-13-5.3_ppc64le",
            "--github-token-file", str(token_file), "--github-api-url", github.url,
            "--github-repo", "owner/demo", "--debian-mirror", debian_mirror])
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=tmp_path / "demo",
                                check=True, capture_output=True, text=True).stdout.strip()
        async with p.Engine(root, state_dir=tmp_path / "var") as engine, \
                TestClient(TestServer(make_app(engine))) as client:
            await engine.wait_idle()
            response = await client.get("/pipeline.dot")
            assert response.status == 200
            labels = assert_labels_for_people(await response.text())
    # Without --public-url, statuses link nowhere.
    assert github.requests and all("target_url" not in r.body for r in github.requests)
    # Every part was drawn: the analysis, the Debian index of each release and architecture,
    # each platform's build and the lints on one (each failed for want of an image), and the
    # GitHub status of the commit.
    assert {"analysis", "demo main", f"owner/demo@{commit}", "bookworm/amd64 index",
            "trixie/amd64 index", "trixie/ppc64el index", "debian-13-5.3 lint-opam",
            "debian-13-5.3 lint-fmt", "debian-13-5.3 lint-doc", "debian-12-4.13 build",
            "debian-13-5.3 build", "debian-13-5.3_ppc64le build"} <= set(labels), labels
    lints = [label for label in labels if " lint-" in label]
    assert lints and all(label.startswith("debian-13-5.3 lint-") for label in lints), labels


def test_a_host_without_a_debian_mirror_is_told_to_give_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_mirror() -> str:
        raise ocaml_ci.BuildError("no Debian mirror found in the apt sources under /etc/apt")

    # A host whose apt sources name no Debian mirror (this one has one).
    monkeypatch.setattr(ocaml_ci, "find_mirror", no_mirror)
    with pytest.raises(SystemExit) as exit_:
        ocaml_ci.parse_args(["--repo", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: no Debian mirror in this host's apt sources: give --debian-mirror URL")
    # Given one, or with no system platform, nothing is looked for.
    assert ocaml_ci.parse_args(["--repo", str(tmp_path), "--debian-mirror", "http://m/debian"]) \
        .debian_mirror == "http://m/debian"
    assert ocaml_ci.parse_args(["--repo", str(tmp_path), "--platforms",
                                "debian-12-ocaml-5.2"]).debian_mirror is None
