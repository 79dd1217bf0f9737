"""The git primitive's webhook: a GitHub push delivery makes the pushed repository's monitors
read it again at once (`git.refresh`), instead of at their next poll.

A pipeline file adds it to the web UI as it adds its own pages:

    def web_routes(state_dir):
        return git_webhook.routes()

and `pipeline run --webhook-secret-file FILE` gives the secret that deliveries are signed with
(without one, the route answers 404). The web package (`pipeline.web.webhooks`) exempts the
route from the CSRF check and keeps the deliveries of the last hour; the checks below are
GitHub's way of signing.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from aiohttp import web

from pipeline.primitives import git
from pipeline.web import webhooks

PATH = "/webhooks/git"

_URL_FIELDS = ("clone_url", "ssh_url", "html_url", "url")


def routes() -> list[web.RouteDef]:
    """The webhook's route, `POST /webhooks/git`, for a pipeline file's `web_routes`."""
    return [web.post(PATH, receive)]


@webhooks.webhook
async def receive(request: web.Request) -> web.Response:
    """A GitHub push webhook: re-read the pushed repository's monitors now.

    The body must be signed (`X-Hub-Signature-256: sha256=HEX`, HMAC-SHA256 under the secret);
    otherwise 403 and nothing happens. 404 when no secret is configured. A signed delivery
    seen in the last hour (the same `X-GitHub-Delivery` id, or the same signed body, since the
    id is not signed) is a replay: 409. A body that is not a JSON object whose `repository` is
    an object with string URLs is 400.
    """
    secret = webhooks.secret(request)
    body = await request.read()
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    signature = request.headers.get("X-Hub-Signature-256", "")
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise web.HTTPForbidden(text="bad or missing X-Hub-Signature-256")
    delivery = request.headers.get("X-GitHub-Delivery", "")
    if not 0 < len(delivery) <= 100:
        raise web.HTTPBadRequest(text="missing or overlong X-GitHub-Delivery")
    urls = _pushed_urls(body)
    if not request.app[webhooks.DELIVERIES].first_time(delivery, expected):
        raise web.HTTPConflict(text=f"delivery {delivery} was already received: a replay")
    refreshed = sum(git.refresh(url) for url in urls)
    return web.json_response({"refreshed": refreshed})


def _pushed_urls(body: bytes) -> set[str]:
    """The repository URLs of a push event's body; 400 unless it has that shape."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bytes that are not UTF-8 and integers of over 4,300 digits.
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    repository = event.get("repository") if isinstance(event, dict) else None
    if not isinstance(repository, dict):
        raise web.HTTPBadRequest(text="the body is not a JSON object with a repository object")
    urls = {field: repository[field] for field in _URL_FIELDS if field in repository}
    if not urls or not all(isinstance(url, str) and url for url in urls.values()):
        raise web.HTTPBadRequest(
            text=f"the repository needs one of {', '.join(_URL_FIELDS)}, as non-empty strings")
    return set(urls.values())
