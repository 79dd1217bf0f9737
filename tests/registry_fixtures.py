"""A real Docker registry (Debian's docker-registry) for tests, on 127.0.0.1.

`start_registry(directory, auth=...)` writes a temporary config and starts
`docker-registry serve`; `registry` is a plain one shared by a test session. Images are pushed
with skopeo (`push_oci_layout`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Registry:
    """A running registry: `host` is "127.0.0.1:PORT"."""

    host: str
    process: subprocess.Popen[bytes]
    directory: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(directory: Path, *, auth: str = "") -> Registry:
    """Start a registry storing under `directory`; `auth` is extra YAML for its `auth:` section
    (e.g. htpasswd or token settings), indented by two spaces per level."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry not found: apt-get install docker-registry")
    port = free_port()
    storage = directory / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = directory / "config.yml"
    text = (f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
    if auth:
        text += "auth:\n" + auth
    config.write_text(text)
    with open(directory / "registry.log", "wb") as log:
        # The child keeps its own copy of the descriptor.
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT)
    registry = Registry(f"127.0.0.1:{port}", process, directory)
    for _ in range(200):
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited: {(directory / 'registry.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://{registry.host}/v2/", timeout=1)
            return registry
        except urllib.error.HTTPError:
            return registry  # it answers (401 with auth): it is up
        except OSError:
            time.sleep(0.05)
    registry.stop()
    pytest.fail("docker-registry did not start")


def push_oci_layout(layout: Path, tag: str, destination: str, *,
                    creds: str | None = None, all_platforms: bool = False) -> None:
    """Copy the image `layout:tag` (an OCI layout directory) to `docker://destination`."""
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if creds:
        argv += ["--dest-creds", creds]
    if all_platforms:
        argv.append("--all")
    argv += [f"oci:{layout}:{tag}", f"docker://{destination}"]
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


# Imported here, not at the top, because this part was appended by another change.
from token_service import TokenService, start_token_service  # noqa: E402


@dataclass
class TokenRegistry:
    """A registry using token auth, and the token service it trusts (a fake of auth.docker.io):
    `user`/`password` may push and pull, anonymous clients may only pull."""

    registry: Registry
    tokens: TokenService
    user: str = "user"
    password: str = "pass"


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    directory = tmp_path_factory.mktemp("token-registry")
    tokens = start_token_service(directory / "tokens", {"user": "pass"})
    running = start_registry(directory, auth=tokens.registry_auth_yaml())
    yield TokenRegistry(running, tokens)
    running.stop()
    tokens.stop()
