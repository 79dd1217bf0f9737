"""A fake of Docker Hub's auth server (auth.docker.io) for tests: issues registry tokens.

It implements Docker's token specification closely enough for Debian's docker-registry
(distribution 2.8) and for skopeo: `GET /token?service=...&scope=...` answers
`{"token", "access_token", "expires_in", "issued_at"}` with an RS256 JWT whose header carries
the signing certificate (`x5c`), which the registry verifies against its `rootcertbundle`.
Anonymous requests get `pull` only; a known user with the right password also gets `push`; a
wrong password gets 401, as Docker Hub answers. The key and the self-signed certificate are made
with the openssl CLI, which also signs tokens.

The server runs on 127.0.0.1 in its own thread and event loop, so that tests may block on
subprocesses (skopeo) that talk to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issued:
    """One token request: who asked (None: anonymous), the scopes asked for, what was granted."""

    user: str | None
    scopes: list[str]
    access: list[dict[str, object]]


@dataclass
class TokenService:
    """The server: `realm` is the URL of its token endpoint, `certificate` the PEM file the
    registry must trust. `issued` records every granted request; `token_fields` and
    `expires_in` shape the answers (tests change them to exercise clients)."""

    directory: Path
    users: Mapping[str, str]
    service: str = "test-registry"
    issuer: str = "test-issuer"
    expires_in: int | None = 300
    token_fields: tuple[str, ...] = ("token", "access_token")
    issued: list[Issued] = field(default_factory=list)
    port: int = field(default=0, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def certificate(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth_yaml(self) -> str:
        """The `auth:` section (for `start_registry(auth=...)`) making a registry trust us."""
        return (f"  token:\n    realm: {self.realm}\n    service: {self.service}\n"
                f"    issuer: {self.issuer}\n    rootcertbundle: {self.certificate}\n")

    def start(self) -> None:
        """Make the key and certificate, then serve until `stop`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(self.key), "-out", str(self.certificate), "-days", "2",
                        "-subj", "/CN=test-token-service"], check=True, capture_output=True)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("token service did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_get("/token", self._token)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def _user(self, request: web.Request) -> tuple[str | None, bool]:
        """(user, accepted): anonymous is (None, True)."""
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, True
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, self.users.get(user) == password

    async def _token(self, request: web.Request) -> web.Response:
        if request.query.get("service") != self.service:
            return web.json_response({"details": "unknown service"}, status=400)
        user, accepted = self._user(request)
        if not accepted:
            return web.json_response({"details": "incorrect username or password"},
                                     status=401)
        allowed = {"pull", "push"} if user is not None else {"pull"}
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        access: list[dict[str, object]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue  # e.g. registry:catalog:* - nobody gets it here
            granted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": "repository", "name": name, "actions": granted})
        self.issued.append(Issued(user, scopes, access))
        token = await self._jwt(user or "", access)
        body: dict[str, object] = {name: token for name in self.token_fields}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        body["issued_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return web.json_response(body)

    async def _jwt(self, subject: str, access: list[dict[str, object]]) -> str:
        # The PEM body is the base64 of the DER certificate, which is what x5c holds.
        der = "".join(line for line in self.certificate.read_text().splitlines()
                      if not line.startswith("-----"))
        header = {"typ": "JWT", "alg": "RS256", "x5c": [der]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + (self.expires_in or 60), "nbf": now - 1, "iat": now,
                  "jti": secrets.token_hex(16), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        # RS256 is RSASSA-PKCS1-v1_5 over SHA-256, which is what `openssl dgst -sign` makes.
        process = await asyncio.create_subprocess_exec(
            "openssl", "dgst", "-sha256", "-sign", str(self.key),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        signature, error = await process.communicate(signing_input.encode())
        if process.returncode != 0:
            raise RuntimeError(f"openssl dgst failed: {error.decode()}")
        return signing_input + "." + _b64url(signature)


def start_token_service(directory: Path, users: Mapping[str, str]) -> TokenService:
    """Start a token service for `users` (name → password), keeping its key in `directory`."""
    service = TokenService(directory, users)
    service.start()
    return service
