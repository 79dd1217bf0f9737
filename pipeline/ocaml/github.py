"""GitHub commit statuses, as a publisher: `github_status(key, value, token_file=...)`.

Each status is a POST to GitHub's REST API, `/repos/OWNER/NAME/statuses/SHA`
(https://docs.github.com/en/rest/commits/statuses). Being a publisher, a status is sent again only
when its value (state, description, target URL) changes, also across restarts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

import pipeline as p
from pipeline.level import Level
from pipeline.term import Term

DEFAULT_API_URL = "https://api.github.com"
STATES = ("pending", "success", "failure", "error")
DESCRIPTION_LIMIT = 140
"""GitHub refuses (422) a description longer than this."""
TIMEOUT = aiohttp.ClientTimeout(total=60)

_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
# A full commit hash, SHA-1 or SHA-256: GitHub does not take abbreviated ones.
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class GitHubAPI:
    """Which GitHub the statuses go to (`api_url`, no trailing slash) and the file holding the
    token allowed to set them."""

    api_url: str
    token_file: Path


def _key_digest(key: tuple[str, str, str], api: GitHubAPI) -> str:
    # A status set on one server (say, a GitHub Enterprise) is not set on another; the token
    # file is not part of it: a new token does not send the statuses again.
    return p.digest([api.api_url, *key])


@p.publisher("github-status", level=Level.ABOVE_AVERAGE, config=GitHubAPI,
             key_digest=_key_digest, pp=lambda key: f"{key[0]}@{str(key[1])[:12]} {key[2]}")
async def _publish(job: p.Job, key: tuple[str, str, str], value: dict[str, Any],
                   api: GitHubAPI) -> None:
    repo, sha, context = key
    url = f"{api.api_url}/repos/{repo}/statuses/{sha}"
    body = status_body(key, value)
    token = _read_token(api.token_file)
    job.log(f"POST {url}: {body['state']}: {body['description']}")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "pipeline-ocaml-ci"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.post(url, json=body, headers=headers) as response:
        text = await response.text()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"GitHub answered {response.status} {response.reason} "
                               f"for {repo}@{sha}: {_message(text)}")
    job.log(f"GitHub answered {response.status}: {context} is {body['state']} on {sha}")


def github_status(key: Term[tuple[str, str, str]] | tuple[str, str, str],
                  value: Term[dict[str, Any]] | dict[str, Any], *, token_file: Path,
                  api_url: str = DEFAULT_API_URL) -> Term[None]:
    """Set the status `value` of a commit on GitHub.

    `key` is (repository "owner/name", commit hash, context: the status's name, e.g. "ocaml-ci");
    `value` is {"state": "pending" | "success" | "failure" | "error", "description": text,
    "target_url": a link (optional)}. `token_file` holds a token allowed to set statuses; it is
    read at each publication, so it may be replaced while the pipeline runs. A non-2xx answer
    fails the job with GitHub's status code and message.
    """
    return _publish(key, value, config=GitHubAPI(api_url.rstrip("/"), Path(token_file)))


def status_body(key: tuple[str, str, str], value: dict[str, Any]) -> dict[str, str]:
    """The JSON body GitHub expects for `value` under `key`; ValueError if either is malformed.

    Checked before sending because the repository and hash become part of the URL.
    """
    repo, sha, context = key
    if not _REPO.fullmatch(repo):
        raise ValueError(f"{repo!r} is not a GitHub repository (owner/name)")
    if not _SHA.fullmatch(sha):
        raise ValueError(f"{sha!r} is not a full commit hash")
    state = value.get("state")
    if state not in STATES:
        raise ValueError(f"status state {state!r} is not one of {', '.join(STATES)}")
    description = str(value.get("description", ""))
    if len(description) > DESCRIPTION_LIMIT:
        description = description[:DESCRIPTION_LIMIT - 1] + "…"
    body = {"state": state, "description": description, "context": context}
    if value.get("target_url"):
        body["target_url"] = str(value["target_url"])
    return body


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"{path}: cannot read the GitHub token: {exc.strerror}") from None
    if not token:
        raise RuntimeError(f"{path}: the GitHub token file is empty")
    return token


def _message(text: str) -> str:
    """GitHub's error message: the `message` of its JSON answer, else the start of the text."""
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text[:200]
