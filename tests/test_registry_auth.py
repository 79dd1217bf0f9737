"""Registry authentication: challenge parsing, credential files, and real registries using
htpasswd (Basic) and token (Bearer) auth, the latter with a fake of Docker Hub's auth server."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from registry_fixtures import Registry, TokenRegistry, push_oci_layout, start_registry
from token_service import TokenService

from pipeline.obuilder.fetchers.registry import RegistryFetcher
from pipeline.obuilder.fetchers.registry_auth import (
    Challenge,
    RegistryAuth,
    RegistryAuthError,
    load_credentials,
    parse_challenges,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --- parsing ---------------------------------------------------------------------------------

def test_parses_docker_hub_challenge_with_commas_in_quotes() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/busybox:pull,push"')
    assert parse_challenges(header) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push"})]


def test_parses_several_challenges_tokens_escapes_and_case() -> None:
    header = ('Basic realm="basic-realm" , BEARER Realm="a\\"b,c", error=invalid_token,'
              'scope="x y"')
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "basic-realm"}),
        Challenge("bearer", {"realm": 'a"b,c', "error": "invalid_token", "scope": "x y"}),
    ]


def test_parses_a_scheme_without_parameters() -> None:
    assert parse_challenges("Negotiate") == [Challenge("negotiate", {})]


@pytest.mark.parametrize("header", [
    "", "  ,  ", 'realm="x"', 'Bearer realm="unterminated', 'Bearer realm="a"b',
    "Bearer =x", 'Bearer realm=,service="s"', "Bearer realm=\"x\" ; junk",
])
def test_rejects_malformed_challenges(header: str) -> None:
    assert parse_challenges(header) is None


async def test_answers_nothing_it_cannot_answer() -> None:
    auth = RegistryAuth({"example.org": ("user", "pass")})
    async with aiohttp.ClientSession() as session:
        for challenge in ['Bearer realm="unterminated', 'Bearer service="s"',
                          'Negotiate', 'Basic realm="r"']:
            # The last one: credentials exist, but for another registry.
            assert await auth.authorization(session, "other.org", challenge, "") is None


async def test_basic_answer_uses_the_registrys_credentials() -> None:
    auth = RegistryAuth({"https://index.docker.io/v1/": ("user", "pa:ss")})
    async with aiohttp.ClientSession() as session:
        answer = await auth.authorization(session, "registry-1.docker.io",
                                          'Basic realm="r"', "")
    assert answer == "Basic " + base64.b64encode(b"user:pa:ss").decode()


# --- credential files ------------------------------------------------------------------------

def write_auth(path: Path, auths: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


def encoded(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment where the three credential locations are under tmp_path, all absent."""
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_no_credential_file_means_no_credentials(auth_env: Path) -> None:
    assert load_credentials() == {}


def test_reads_docker_config_in_home(auth_env: Path) -> None:
    write_auth(auth_env / "home/.docker/config.json",
               {"https://index.docker.io/v1/": encoded("hub", "secret"),
                "127.0.0.1:5000": encoded("me", "pw:with:colons"),
                "helper.example": {}})  # e.g. left to a credential helper: skipped
    credentials = load_credentials()
    assert credentials == {"docker.io": ("hub", "secret"),
                           "127.0.0.1:5000": ("me", "pw:with:colons")}
    auth = RegistryAuth(credentials)
    assert auth.credentials_for("docker.io") == ("hub", "secret")
    assert auth.credentials_for("index.docker.io") == ("hub", "secret")
    assert auth.credentials_for("helper.example") is None


def test_runtime_auth_json_comes_before_docker_config(auth_env: Path) -> None:
    write_auth(auth_env / "home/.docker/config.json", {"r.example": encoded("home", "x")})
    write_auth(auth_env / "run/containers/auth.json", {"r.example": encoded("runtime", "y")})
    assert load_credentials() == {"r.example": ("runtime", "y")}


def test_registry_auth_file_comes_first(auth_env: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_auth(auth_env / "run/containers/auth.json", {"r.example": encoded("runtime", "y")})
    explicit = write_auth(auth_env / "mine.json", {"r.example": encoded("explicit", "z")})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert load_credentials() == {"r.example": ("explicit", "z")}


def test_explicit_path(auth_env: Path) -> None:
    path = write_auth(auth_env / "given.json", {"docker.io": encoded("a", "b")})
    assert load_credentials(path) == {"docker.io": ("a", "b")}
    with pytest.raises(FileNotFoundError):
        load_credentials(auth_env / "missing.json")


@pytest.mark.parametrize("content", [
    "not json", '["a list"]', '{"auths": []}', '{"auths": {"r": {"auth": "!!!"}}}',
    '{"auths": {"r": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}',
])
def test_malformed_credential_file_names_the_file(auth_env: Path, content: str) -> None:
    path = auth_env / "bad.json"
    path.write_text(content)
    with pytest.raises(RegistryAuthError, match=r"bad\.json"):
        load_credentials(path)


# --- a registry with htpasswd (Basic) auth ---------------------------------------------------

@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("basic-registry")
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(subprocess.run(["htpasswd", "-Bbn", "user", "pass"], check=True,
                                       capture_output=True, text=True).stdout)
    running = start_registry(directory, auth=f"  htpasswd:\n    realm: basic-realm\n"
                                             f"    path: {htpasswd}\n")
    yield running
    running.stop()


async def retry_with(auth: RegistryAuth, session: aiohttp.ClientSession, method: str,
                     url: str, registry: str, scope: str) -> int:
    """Send a request; on 401 answer the challenge and send it again: the final status."""
    async with session.request(method, url) as first:
        if first.status != 401:
            return first.status
        challenge = first.headers["WWW-Authenticate"]
    answer = await auth.authorization(session, registry, challenge, scope)
    assert answer is not None
    headers = {"Authorization": answer}
    async with session.request(method, url, headers=headers) as second:
        return second.status


async def test_basic_auth_against_a_real_registry(basic_registry: Registry) -> None:
    host = basic_registry.host
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}/v2/") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert await retry_with(RegistryAuth({host: ("user", "pass")}), session, "GET",
                                f"http://{host}/v2/", host, "") == 200
        assert await retry_with(RegistryAuth({host: ("user", "wrong")}), session, "GET",
                                f"http://{host}/v2/", host, "") == 401
        assert await RegistryAuth().authorization(
            session, host, 'Basic realm="basic-realm"', "") is None


# --- a registry with token (Bearer) auth -----------------------------------------------------

def tiny_oci_layout(directory: Path) -> Path:
    """An OCI layout holding `latest`: one gzip layer with /hello.txt."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        content = b"hello\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    layer = blob(gzip.compress(tar.getvalue(), mtime=0),
                 "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{hashlib.sha256(tar.getvalue()).hexdigest()}"]},
    }).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                "config": config, "layers": [layer]}).encode(), OCI_MANIFEST)
    manifest["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                      "manifests": [manifest]}))
    return directory


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_oci_layout(tmp_path_factory.mktemp("tiny") / "layout")


@pytest.fixture(scope="module")
def pushed(token_registry: TokenRegistry, tiny_layout: Path) -> str:
    """`tiny` pushed by skopeo with credentials, through the token service."""
    push_oci_layout(tiny_layout, "latest", f"{token_registry.registry.host}/tiny:latest",
                    creds=f"{token_registry.user}:{token_registry.password}")
    return "tiny"


def test_skopeo_pushes_through_the_token_service(token_registry: TokenRegistry,
                                                 pushed: str) -> None:
    granted = [i for i in token_registry.tokens.issued if i.user == token_registry.user]
    assert any({"type": "repository", "name": pushed, "actions": ["pull", "push"]} in i.access
               for i in granted)


def test_skopeo_push_with_a_wrong_password_fails(token_registry: TokenRegistry,
                                                 tiny_layout: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        push_oci_layout(tiny_layout, "latest", f"{token_registry.registry.host}/nope:latest",
                        creds=f"{token_registry.user}:wrong")
    assert b"401" in failure.value.stderr or b"unauthorized" in failure.value.stderr.lower()


async def test_anonymous_pull_through_the_token_service(token_registry: TokenRegistry,
                                                        pushed: str) -> None:
    host = token_registry.registry.host
    url = f"http://{host}/v2/{pushed}/manifests/latest"
    auth = RegistryAuth()
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
        assert f'scope="repository:{pushed}:pull"' in challenge
        answer = await auth.authorization(session, host, challenge, f"repository:{pushed}:pull")
        assert answer is not None and answer.startswith("Bearer ")
        async with session.get(url, headers={"Accept": OCI_MANIFEST,
                                             "Authorization": answer}) as response:
            assert response.status == 200
            assert json.loads(await response.read())["mediaType"] == OCI_MANIFEST


class BytesLog:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


async def test_registry_fetcher_pulls_anonymously_through_the_token_service(
        token_registry: TokenRegistry, pushed: str, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    fetcher = RegistryFetcher(tmp_path / "cache", auth=RegistryAuth())
    image = f"{token_registry.registry.host}/{pushed}:latest"
    info = await fetcher.fetch(image, rootfs, log=BytesLog())
    assert (rootfs / "hello.txt").read_text() == "hello\n"
    assert info.env["PATH"] == "/bin"
    assert any(i.user is None and {"type": "repository", "name": pushed, "actions": ["pull"]}
               in i.access for i in token_registry.tokens.issued)


async def test_only_users_with_credentials_may_push(token_registry: TokenRegistry) -> None:
    host = token_registry.registry.host
    url = f"http://{host}/v2/pushable/blobs/uploads/"
    scope = "repository:pushable:pull,push"
    credentials = {host: (token_registry.user, token_registry.password)}
    async with aiohttp.ClientSession() as session:
        # Anonymous: the token service grants pull only, so the registry still refuses.
        assert await retry_with(RegistryAuth(), session, "POST", url, host, scope) == 401
        assert await retry_with(RegistryAuth(credentials), session, "POST", url, host,
                                scope) == 202


async def test_bad_credentials_get_no_token(token_registry: TokenRegistry) -> None:
    host = token_registry.registry.host
    auth = RegistryAuth({host: (token_registry.user, "wrong")})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}/v2/") as response:
            challenge = response.headers["WWW-Authenticate"]
        assert await auth.authorization(session, host, challenge, "") is None


# --- token handling, against the token service alone -----------------------------------------

@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[TokenService]:
    service = TokenService(tmp_path, {"user": "pass"})
    service.start()
    yield service
    service.stop()


def challenge_for(tokens: TokenService, service: str = "test-registry") -> str:
    return f'Bearer realm="{tokens.realm}",service="{service}"'


async def test_tokens_are_cached_per_scope(tokens: TokenService) -> None:
    auth = RegistryAuth()
    async with aiohttp.ClientSession() as session:
        first = await auth.authorization(session, "r", challenge_for(tokens), "repository:a:pull")
        again = await auth.authorization(session, "r", challenge_for(tokens), "repository:a:pull")
        other = await auth.authorization(session, "r", challenge_for(tokens), "repository:b:pull")
    assert first == again != other
    assert [i.scopes for i in tokens.issued] == [["repository:a:pull"], ["repository:b:pull"]]


async def test_expired_tokens_are_asked_for_again(tokens: TokenService) -> None:
    tokens.expires_in = 0
    auth = RegistryAuth()
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            await auth.authorization(session, "r", challenge_for(tokens), "repository:a:pull")
    assert len(tokens.issued) == 2


async def test_concurrent_requests_share_one_token_request(tokens: TokenService) -> None:
    auth = RegistryAuth({"r": ("user", "pass")})
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(
            auth.authorization(session, "r", challenge_for(tokens), "repository:a:pull,push")
            for _ in range(8)))
    assert len(set(answers)) == 1 and answers[0] is not None
    assert len(tokens.issued) == 1
    assert tokens.issued[0].user == "user"
    assert tokens.issued[0].access[0]["actions"] == ["pull", "push"]


async def test_access_token_field_and_default_expiry(tokens: TokenService) -> None:
    tokens.token_fields = ("access_token",)
    tokens.expires_in = None
    auth = RegistryAuth()
    async with aiohttp.ClientSession() as session:
        answer = await auth.authorization(session, "r", challenge_for(tokens), "")
        # Without expires_in the token is good for 60 s: the second call hits the cache.
        assert await auth.authorization(session, "r", challenge_for(tokens), "") == answer
    assert answer is not None and answer.startswith("Bearer ey")
    assert len(tokens.issued) == 1


async def test_challenge_scope_wins_over_the_callers(tokens: TokenService) -> None:
    challenge = challenge_for(tokens) + ',scope="repository:x:pull repository:y:pull"'
    async with aiohttp.ClientSession() as session:
        await RegistryAuth().authorization(session, "r", challenge, "repository:z:pull")
    assert tokens.issued[0].scopes == ["repository:x:pull", "repository:y:pull"]


async def test_a_token_server_error_is_raised(tokens: TokenService) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(RegistryAuthError, match="answered 400"):
            await RegistryAuth().authorization(session, "r", challenge_for(tokens, "other"), "")
