"""Authentication to Docker registries (HTTP API v2): Basic and Bearer-token challenges.

A registry answers an unauthenticated request with 401 and a `WWW-Authenticate` challenge.
`RegistryAuth.authorization` turns that challenge into an `Authorization` header value:

- `Basic realm=...`: the user's credentials for that registry, if any.
- `Bearer realm=...,service=...,scope=...`: a token from the realm (Docker Hub's is
  auth.docker.io), asked for with the user's credentials when known and anonymously otherwise;
  tokens are cached per (registry, scope) until they expire.

Credentials come from Docker's `config.json` format (`load_credentials`), as also used by
podman, skopeo and buildah (`auth.json`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl

from pipeline.obuilder.protocols import BuildError

# Names under which Docker Hub's registry appears: in image references, as the host the API
# is served from, and as the key `docker login` writes into config.json.
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

# A token this close to its expiry is not reused: a request sent with it could arrive late.
_EXPIRY_MARGIN = 5.0
# Docker's token specification: a response without `expires_in` is valid for 60 seconds.
_DEFAULT_EXPIRES_IN = 60.0

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SPACE = re.compile(r"[ \t]*")


class RegistryAuthError(BuildError):
    """Credentials or a token could not be obtained for a reason other than refusal (a
    malformed config file, a token server answering with an error or with no token)."""


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: `scheme` lower-cased, parameter names
    lower-cased, values unquoted."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge] | None:
    """The challenges of a `WWW-Authenticate` value (RFC 9110 §11.6.1), in order.

    Quoted values may hold commas and backslash escapes; several challenges may be separated by
    commas. Returns None when the header does not follow the grammar (token68 forms included:
    registries never send them).
    """
    challenges: list[Challenge] = []
    params: dict[str, str] = {}
    pos = 0
    while True:
        while pos < len(header) and header[pos] in " \t,":
            pos += 1
        if pos == len(header):
            return challenges or None
        name = _TOKEN.match(header, pos)
        if name is None:
            return None
        after = _SPACE.match(header, name.end()).end()
        if challenges and after < len(header) and header[after] == "=":
            value_start = _SPACE.match(header, after + 1).end()
            quoted = _QUOTED.match(header, value_start)
            if quoted is not None:
                value = re.sub(r"\\(.)", r"\1", quoted.group(1))
                pos = quoted.end()
            else:
                token = _TOKEN.match(header, value_start)
                if token is None:
                    return None
                value = token.group(0)
                pos = token.end()
            params[name.group(0).lower()] = value
            # A parameter ends at a comma or at the end: `realm="a"b` is malformed.
            pos = _SPACE.match(header, pos).end()
            if pos < len(header) and header[pos] != ",":
                return None
        else:
            params = {}
            challenges.append(Challenge(name.group(0).lower(), params))
            pos = name.end()


def normalize_registry(registry: str) -> str:
    """The key credentials are stored under: `https://index.docker.io/v1/` and the other
    names of Docker Hub become `docker.io`; a scheme and a path are dropped."""
    host = registry.lower().removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _auth_file() -> Path:
    explicit = os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and (Path(runtime) / "containers" / "auth.json").exists():
        return Path(runtime) / "containers" / "auth.json"
    return Path.home() / ".docker" / "config.json"


def load_credentials(path: Path | None = None) -> dict[str, tuple[str, str]]:
    """Registry → (user, password) from a Docker `config.json`-format file.

    Without `path`, the file is `$REGISTRY_AUTH_FILE` if set, else
    `$XDG_RUNTIME_DIR/containers/auth.json` if it exists, else `~/.docker/config.json`; a
    missing file gives no credentials. An explicit `path` that does not exist raises
    FileNotFoundError. Keys are normalized (`normalize_registry`), so Docker Hub's
    `https://index.docker.io/v1/` is found as `docker.io`. Entries without an `auth` field
    (credential helpers, identity tokens) are skipped. A file that is not JSON of that shape,
    or an `auth` that is not base64 of `user:password`, raises RegistryAuthError naming the file.
    """
    if path is None:
        path = _auth_file()
        if not path.exists():
            return {}
    try:
        auths = json.loads(path.read_text()).get("auths", {})
        if not isinstance(auths, dict):
            raise TypeError("auths is not an object")
    except (ValueError, AttributeError, TypeError) as e:
        raise RegistryAuthError(f"{path}: not a registry credentials file: {e}") from e
    credentials: dict[str, tuple[str, str]] = {}
    for registry, entry in auths.items():
        encoded = entry.get("auth") if isinstance(entry, dict) else None
        if not encoded:
            continue
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise RegistryAuthError(f"{path}: credentials for {registry} are not base64") from e
        if not sep:
            raise RegistryAuthError(f"{path}: credentials for {registry} lack a ':'")
        credentials[normalize_registry(registry)] = (user, password)
    return credentials


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic() after which the token is not reused


class RegistryAuth:
    """Answers registries' 401 challenges; holds credentials and a cache of Bearer tokens.

    One instance may serve many concurrent requests: a token wanted by several of them at once
    is asked for once.
    """

    def __init__(self, credentials: Mapping[str, tuple[str, str]] | None = None) -> None:
        """`credentials` maps a registry host (`HOST[:PORT]`, Docker Hub under any of its
        names) to (user, password); without them every request is anonymous."""
        self.credentials = {normalize_registry(k): v for k, v in (credentials or {}).items()}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[str | None]] = {}

    def credentials_for(self, registry: str) -> tuple[str, str] | None:
        """The (user, password) for `registry`, or None."""
        return self.credentials.get(normalize_registry(registry))

    async def authorization(self, session: aiohttp.ClientSession, registry: str,
                            challenge: str, scope: str) -> str | None:
        """The `Authorization` value answering `challenge` (a 401's `WWW-Authenticate`).

        `scope` (e.g. `repository:library/busybox:pull`) is used for a Bearer token when the
        challenge names none; it may be "" (e.g. for `GET /v2/`). Returns None when there is no
        answer: an unparseable challenge, a Bearer challenge without a realm, an unknown scheme,
        Basic without credentials for `registry`, or a token server refusing (401/403, e.g.
        wrong password). Raises aiohttp.ClientError when the token server cannot be reached and
        RegistryAuthError when it answers with another error or without a token.
        """
        parsed = parse_challenges(challenge) or []
        # A registry offering both is asked for a token: credentials then never go to it.
        by_scheme = {c.scheme: c for c in reversed(parsed)}
        bearer = by_scheme.get("bearer")
        if bearer is not None:
            realm = bearer.params.get("realm")
            if not realm:
                return None
            wanted = bearer.params.get("scope", scope)
            return await self._bearer(session, registry, realm,
                                      bearer.params.get("service"), wanted)
        if "basic" in by_scheme:
            creds = self.credentials_for(registry)
            if creds is None:
                return None
            return _basic(creds)
        return None

    async def _bearer(self, session: aiohttp.ClientSession, registry: str, realm: str,
                      service: str | None, scope: str) -> str | None:
        key = (normalize_registry(registry), scope)
        cached = self._tokens.get(key)
        if cached is not None and time.monotonic() < cached.expires:
            return f"Bearer {cached.value}"
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                self._fetch_token(session, key, realm, service, scope))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        # Shielded: one waiter being cancelled must not cancel the request the others share.
        return await asyncio.shield(pending)

    async def _fetch_token(self, session: aiohttp.ClientSession, key: tuple[str, str],
                           realm: str, service: str | None, scope: str) -> str | None:
        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        # A challenge may ask for several scopes at once, separated by spaces.
        query += [("scope", s) for s in scope.split()]
        creds = self.credentials_for(key[0])
        headers = {}
        if creds is not None:
            query.append(("account", creds[0]))
            headers["Authorization"] = _basic(creds)
        url = yarl.URL(realm).extend_query(query)
        async with session.get(url, headers=headers) as response:
            if response.status in (401, 403):
                return None
            if response.status != 200:
                raise RegistryAuthError(
                    f"token server {realm} answered {response.status} for {key[0]}")
            try:
                body = json.loads(await response.read())
                token = body.get("token") or body.get("access_token")
                expires_in = body.get("expires_in")
                expires_in = _DEFAULT_EXPIRES_IN if expires_in is None else float(expires_in)
            except (ValueError, AttributeError, TypeError) as e:
                raise RegistryAuthError(
                    f"token server {realm} sent an unreadable answer for {key[0]}: {e}") from e
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"token server {realm} sent no token for {key[0]}")
        self._tokens[key] = _Token(token, time.monotonic() + expires_in - _EXPIRY_MARGIN)
        return f"Bearer {token}"
