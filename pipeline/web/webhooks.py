"""What the web UI gives the webhooks that primitives add to it (as pipelines add pages).

A webhook's sender is a machine that proves itself by signing its deliveries, not a browser with
a session: a handler marked with `webhook` is exempt from the CSRF check of POSTs. The UI keeps
the secret that deliveries are signed with (`pipeline run --webhook-secret-file`) and the
deliveries of the last hour, so that a handler can refuse a replay. Which headers carry the
signature and what a delivery means is the business of the primitive that adds the route (the
git primitive's is `pipeline.primitives.git_webhook`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MARK = "pipeline_webhook"
"""The attribute that `webhook` sets on a handler."""


class Deliveries:
    """The webhook deliveries accepted in the last `window` seconds, to refuse replays."""

    def __init__(self, window: float = 3600.0) -> None:
        """Remember deliveries for `window` seconds."""
        self.window = window
        self._seen: dict[str, float] = {}  # insertion order is arrival order

    def first_time(self, delivery: str, signature: str) -> bool:
        """Record a delivery (its id and its body's signature); False if either was seen."""
        now = time.monotonic()
        for key, when in list(self._seen.items()):
            if now - when < self.window:
                break
            del self._seen[key]
        keys = ("id:" + delivery, "body:" + signature)
        if any(key in self._seen for key in keys):
            return False
        self._seen.update(dict.fromkeys(keys, now))
        return True


SECRET = web.AppKey("webhook_secret", object)
"""The secret (bytes) that webhook deliveries are signed with, or None."""
DELIVERIES = web.AppKey("deliveries", Deliveries)


def webhook(handler: Handler) -> Handler:
    """Mark `handler` (a function) as a webhook: its POSTs need no CSRF token, since it checks
    their signature itself (with `secret`)."""
    setattr(handler, _MARK, True)
    return handler


def is_webhook(request: web.Request) -> bool:
    """Whether the request goes to a handler marked with `webhook`."""
    return getattr(request.match_info.handler, _MARK, False) is True


def secret(request: web.Request) -> bytes:
    """The secret that the request's delivery must be signed with; 404 when none is configured
    (the webhook is then off)."""
    value = request.app[SECRET]
    if not isinstance(value, bytes):
        raise web.HTTPNotFound(text="no webhook secret is configured")
    return value
