"""Reading a CI's pages (`pipeline.ocaml.web`) in tests: a page, its results, the rebuild form
of a commit's page as a viewer and then a builder meet it, and jobs to rebuild; shared by the
tests of OCaml CI's and opam-repo-ci's pages."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

import pipeline as p


async def get(client: TestClient, path: str, status: int = 200) -> str:
    """The page at `path`, checking its HTTP status."""
    response = await client.get(path)
    assert response.status == status, (path, await response.text())
    return await response.text()


def results(page: str) -> list[str]:
    """The results and job states shown in `page` (or a part of it), in order."""
    return re.findall(r'data-result="([^"]*)"', page)


async def log_in_to_rebuild(client: TestClient, url: str, admin_token: str) -> tuple[str, str]:
    """Check that a viewer of the commit page at `url` sees no rebuild buttons and may not
    post, log in with `admin_token`, check that the builder gets both buttons and that a post
    without the CSRF token is refused; return the form's action and CSRF token."""
    page = await get(client, url)
    assert "rebuild-failed" not in page and "rebuild-all" not in page
    csrf = re.search(r'name="csrf" value="([^"]*)"', await get(client, "/login"))
    assert csrf is not None
    refused = await client.post(url + "/rebuild", data={"csrf": csrf.group(1), "jobs": "all"})
    assert refused.status == 403
    login = await client.post("/login", data={"csrf": csrf.group(1), "token": admin_token})
    assert login.status == 200
    page = await get(client, url)
    assert 'id="rebuild-failed"' in page and 'id="rebuild-all"' in page
    form = re.search(r'action="([^"]*/rebuild)">.*?name="csrf" value="([^"]*)"', page)
    assert form is not None and form.group(1) == url + "/rebuild"
    assert (await client.post(form.group(1), data={"jobs": "failed"})).status == 403
    return form.group(1), form.group(2)


async def rebuild(client: TestClient, engine: p.Engine, action: str, csrf: str,
                  jobs: str) -> None:
    """Post the rebuild form (`jobs`: "failed" or "all"), check that it leads back to the
    commit's page, and wait for the rebuilds to end."""
    done = await client.post(action, data={"csrf": csrf, "jobs": jobs}, allow_redirects=False)
    assert done.status == 303 and done.headers["Location"] == action.removesuffix("/rebuild")
    await engine.wait_idle()


def recorded_jobs(op: str, keys: tuple[str, ...]) -> tuple[p.Term[Any], list[str]]:
    """A job of the builder `op` per key, each appending its key to the list returned when it
    runs; those whose key starts with "failing" fail."""
    runs: list[str] = []

    @p.builder(op)
    async def run(job: p.Job, key: str) -> str:
        runs.append(key)
        if key.startswith("failing"):
            raise RuntimeError("the build failed")
        return key

    return p.all(*(p.catch(run(key)) for key in keys)), runs


def job_ids(engine: p.Engine) -> dict[str, str]:
    """The id of each job the engine ran, by its key."""
    return {entry.key_pp.strip("'"): entry.job_id for entry in engine.cache.db.query()}
