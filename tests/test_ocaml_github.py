"""The GitHub commit-status publisher against a fake of GitHub's statuses API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from github_statuses import github_statuses

import pipeline as p
from pipeline.cache.instances import PrimitiveNode
from pipeline.ocaml.github import github_status, status_body

TOKEN = "ghp_test-token"
REPO = "ocurrent/ocaml-hello"
SHA = "0123456789abcdef0123456789abcdef01234567"
KEY = (REPO, SHA, "ocaml-ci")
HANG_GUARD = 60
"""Seconds before a test that should be idle is reported as hanging instead."""


async def settle(engine: p.Engine) -> None:
    await asyncio.wait_for(engine.wait_idle(), HANG_GUARD)


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "github-token"
    path.write_text(token + "\n")
    return path


def status(state: str, description: str, target_url: str | None = None) -> dict[str, Any]:
    value = {"state": state, "description": description}
    if target_url is not None:
        value["target_url"] = target_url
    return value


def node_of(engine: p.Engine, term: p.Term[Any]) -> PrimitiveNode:
    node = engine.node_for(term)
    assert isinstance(node, PrimitiveNode), node
    return node


async def test_publishes_once_per_value_as_github_expects(tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as github:
        value = p.Variable(status("pending", "Building", "http://ci.example/ocaml/x/main"))
        term = github_status(KEY, value, token_file=token_file(tmp_path), api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            assert engine.root_output() == p.Ok(None)
            [request] = github.requests
            assert request.path == f"/repos/{REPO}/statuses/{SHA}"
            assert request.body == {"state": "pending", "description": "Building",
                                    "context": "ocaml-ci",
                                    "target_url": "http://ci.example/ocaml/x/main"}
            assert request.headers["Authorization"] == f"Bearer {TOKEN}"
            assert request.headers["Accept"] == "application/vnd.github+json"
            assert request.headers["Content-Type"] == "application/json"
            assert request.headers["X-GitHub-Api-Version"] == "2022-11-28"

            # The same value again: nothing is sent.
            engine.schedule(node_of(engine, term))
            value.set(status("pending", "Building", "http://ci.example/ocaml/x/main"))
            await settle(engine)
            assert len(github.requests) == 1

            value.set(status("success", "Passed"))
            await settle(engine)
            assert engine.root_output() == p.Ok(None)
            assert [r.body for r in github.requests[1:]] == [
                {"state": "success", "description": "Passed", "context": "ocaml-ci"}]

        # After a restart, what was published last is not published again.
        term = github_status(KEY, status("success", "Passed"), token_file=token_file(tmp_path),
                             api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            assert engine.root_output() == p.Ok(None)
        assert len(github.requests) == 2


async def test_a_bad_token_fails_the_job_with_the_code(tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as github:
        term = github_status(KEY, status("failure", "Failed"),
                             token_file=token_file(tmp_path, "wrong"), api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            output = engine.root_output()
            assert isinstance(output, p.Failed)
            assert "401" in output.message and "Bad credentials" in output.message
            job_id = node_of(engine, term).job_id
            assert job_id is not None
            job = engine.jobs.get(job_id)
            assert job is not None and job.state == p.JobState.FAILED
            # The token is sent, never logged.
            assert "wrong" not in job.log_path.read_text()
        assert github.requests[0].headers["Authorization"] == "Bearer wrong"


async def test_an_error_answer_fails_the_job_then_a_new_value_is_published(
        tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as github:
        github.failures.append((422, "Validation Failed"))
        value = p.Variable(status("pending", "Building"))
        term = github_status(KEY, value, token_file=token_file(tmp_path), api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            output = engine.root_output()
            assert isinstance(output, p.Failed)
            assert "422" in output.message and "Validation Failed" in output.message
            value.set(status("success", "Passed"))
            await settle(engine)
            assert engine.root_output() == p.Ok(None)
        assert [r.body["state"] for r in github.requests] == ["pending", "success"]


async def test_a_target_url_must_be_an_absolute_link_as_github_says(tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as github:
        value = p.Variable(status("pending", "Building", "/ocaml/x/commit/" + SHA))
        term = github_status(KEY, value, token_file=token_file(tmp_path), api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            output = engine.root_output()
            assert isinstance(output, p.Failed) and "422" in output.message
            value.set(status("pending", "Building", "https://ci.example/ocaml/x/commit/" + SHA))
            await settle(engine)
            assert engine.root_output() == p.Ok(None)


async def test_different_api_urls_are_different_statuses(tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as one, github_statuses(TOKEN) as two:
        value = status("success", "Passed")
        term = p.pair(github_status(KEY, value, token_file=token_file(tmp_path), api_url=one.url),
                      github_status(KEY, value, token_file=token_file(tmp_path), api_url=two.url))
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            assert isinstance(engine.root_output(), p.Ok)
        assert len(one.requests) == 1 and len(two.requests) == 1


async def test_a_missing_token_file_fails_without_sending(tmp_path: Path) -> None:
    async with github_statuses(TOKEN) as github:
        term = github_status(KEY, status("success", "Passed"), token_file=tmp_path / "nope",
                             api_url=github.url)
        async with p.Engine(term, state_dir=tmp_path / "var") as engine:
            await settle(engine)
            output = engine.root_output()
            assert isinstance(output, p.Failed) and "cannot read the GitHub token" in output.message
        assert github.requests == []


@pytest.mark.parametrize(("key", "value", "error"), [
    (("ocurrent/x/../y", SHA, "ci"), status("success", ""), "not a GitHub repository"),
    ((REPO, "abc123", "ci"), status("success", ""), "not a full commit hash"),
    ((REPO, SHA, "ci"), status("passed", ""), "not one of pending, success, failure, error"),
])
def test_malformed_keys_and_values_are_refused(key: tuple[str, str, str], value: dict[str, Any],
                                               error: str) -> None:
    with pytest.raises(ValueError, match=error):
        status_body(key, value)


def test_a_long_description_is_cut_to_githubs_limit() -> None:
    body = status_body(KEY, status("failure", "x" * 200))
    assert len(body["description"]) == 140 and body["description"].endswith("…")
