"""Who may do what: roles, the login cookie, CSRF tokens, and where the UI may listen.

Anyone may view. Actions need the builder role, which only the admin has: a request carrying
`Authorization: Bearer TOKEN`, or a browser that logged in with the token (a cookie). When no
token is configured the server listens on loopback only and everyone there may act.

Nothing is stored on the server. A browser gets a random session cookie on its first page; the
login cookie and the CSRF token are HMACs of that session under a secret made per application,
so they are bound to the browser's session and worthless after a restart.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets

from aiohttp import web

SESSION_COOKIE = "pipeline_session"
NEW_SESSION = web.RequestKey("new_session", str)
LOGIN_COOKIE = "pipeline_login"


class Role(enum.IntEnum):
    """What a request may do; a higher role may do everything a lower one may."""

    VIEWER = 0
    BUILDER = 1
    ADMIN = 2


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to listen on) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, admin_token: str | None) -> None:
    """Raise ValueError if listening on `host` without an admin token would let others act."""
    if admin_token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve the web UI on {host} without an admin token: anyone who can "
            "reach it could rebuild and cancel jobs. Give --admin-token-file, or listen on "
            "127.0.0.1")


class Access:
    """The access rules of one application: its admin token and its secret."""

    def __init__(self, admin_token: str | None) -> None:
        """Check requests against `admin_token` (None: anyone on loopback may act)."""
        self.admin_token = admin_token
        self._secret = secrets.token_bytes(32)

    def _mac(self, purpose: str, session: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{session}".encode(), hashlib.sha256).hexdigest()

    def has_bearer(self, request: web.Request) -> bool:
        """Whether the request carries the admin token as a bearer header."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and self.check_token(token)

    def role(self, request: web.Request) -> Role:
        """The role of the request's sender."""
        if self.admin_token is None:
            # Only reachable on loopback (start_server refuses anything else without a token);
            # the check guards against a proxy in front forwarding outside requests.
            return Role.ADMIN if is_loopback(request.remote or "") else Role.VIEWER
        if self.has_bearer(request):
            return Role.ADMIN
        session = request.cookies.get(SESSION_COOKIE, "")
        login = request.cookies.get(LOGIN_COOKIE, "")
        if session and hmac.compare_digest(login.encode(), self._mac("login", session).encode()):
            return Role.ADMIN
        return Role.VIEWER

    def check_token(self, token: str) -> bool:
        """Whether `token` (typed into the login form) is the admin token."""
        return self.admin_token is not None and hmac.compare_digest(
            token.strip().encode(), self.admin_token.encode())

    def session(self, request: web.Request) -> str:
        """The browser's session id: its cookie, or a new one that `remember` will set."""
        session = request.cookies.get(SESSION_COOKIE) or request.get(NEW_SESSION)
        if not session:
            session = request[NEW_SESSION] = secrets.token_urlsafe(24)
        return session

    def csrf_token(self, request: web.Request) -> str:
        """The CSRF token that the request's forms must send back."""
        return self._mac("csrf", self.session(request))

    def check_csrf(self, request: web.Request, token: str) -> bool:
        """Whether `token` is the CSRF token of the request's session."""
        session = request.cookies.get(SESSION_COOKIE)
        return bool(session) and hmac.compare_digest(
            token.encode(), self._mac("csrf", session).encode())

    def remember(self, request: web.Request, response: web.StreamResponse) -> None:
        """Set the session cookie that `session` made for this request, if it made one."""
        if NEW_SESSION in request:
            _set_cookie(response, SESSION_COOKIE, request[NEW_SESSION])

    def log_in(self, request: web.Request, response: web.StreamResponse) -> None:
        """Give the request's session the admin role (after the token was checked)."""
        _set_cookie(response, LOGIN_COOKIE, self._mac("login", self.session(request)))
        self.remember(request, response)


def _set_cookie(response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", path="/")
