"""A fake of GitHub's commit statuses API (`POST /repos/OWNER/NAME/statuses/SHA`) on 127.0.0.1.

It records every request, answers 401 to a wrong token and 422 to a `target_url` that is not an
absolute http(s) URL as GitHub does, and can be told to fail the next requests with a given status
code.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class StatusRequest:
    """One request as received: path, headers and JSON body."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGitHubStatuses:
    """The fake's state: the token it accepts, what it received, and failures to come."""

    token: str
    requests: list[StatusRequest] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    """(status code, message) answered to the next requests, in order, before any success."""
    url: str = ""
    """The API's base URL, once serving."""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def _create_status(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(StatusRequest(request.path, dict(request.headers), body))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        target = body.get("target_url") if isinstance(body, dict) else None
        if target is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", str(target)):
            # GitHub's answer to a link that is not an absolute http(s) URL.
            return web.json_response({"message": "Validation Failed", "errors": [
                {"resource": "Status", "field": "target_url", "code": "custom"}]}, status=422)
        if self.failures:
            status, message = self.failures.pop(0)
            return web.json_response({"message": message}, status=status)
        # As GitHub answers: 201 Created and the status, with an id.
        return web.json_response({"id": next(self._ids), **body}, status=201)

    def app(self) -> web.Application:
        """The application answering the statuses endpoint."""
        app = web.Application()
        app.add_routes([web.post("/repos/{owner}/{name}/statuses/{sha}", self._create_status)])
        return app


@asynccontextmanager
async def github_statuses(token: str) -> AsyncIterator[FakeGitHubStatuses]:
    """Serve a fake accepting `token` on a free port of 127.0.0.1 until the block ends."""
    fake = FakeGitHubStatuses(token)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield fake
    finally:
        await runner.cleanup()
