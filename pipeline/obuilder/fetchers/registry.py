"""A fetcher pulling images from a Docker Registry (HTTP API v2), without a Docker daemon.

Image references are parsed as Docker does (`parse_reference`). A tag is resolved to a manifest
digest once and recorded in `CACHE/tags.json`, so later builds use the same image until
`refresh` resolves it again. Manifests, configs and layers are kept by digest in
`CACHE/blobs/sha256/<hex>`, each verified before it gets there, so images sharing layers download
them once, and a pull of a recorded tag whose blobs are cached asks the registry nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import ipaddress
import json
import os
import platform as host
import re
import tarfile
import tempfile
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import zstandard

from pipeline.obuilder.fetchers.local import DEFAULT_ENV
from pipeline.obuilder.fetchers.registry_auth import RegistryAuth, RegistryAuthError
from pipeline.obuilder.fetchers.unpack import extract
from pipeline.obuilder.protocols import BuildError, ImageInfo, Log

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEXES = (DOCKER_LIST, OCI_INDEX)

# Layers download this many at a time: enough to fill a link, few enough not to thrash a disk.
PARALLEL_DOWNLOADS = 4
CHUNK = 1 << 16
# A progress line per this many bytes of one layer, so a big pull shows it is moving.
PROGRESS_STEP = 16 << 20

# Docker's grammar (distribution/reference): lowercase path components joined by separators.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")

# platform.machine() -> (GOARCH, variant), as image indexes name architectures.
_ARCHITECTURES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: `registry` as written (`docker.io` for Docker Hub),
    `repository` with Docker Hub's `library/` added, and a tag and/or digest (a digest wins)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host serving the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tag}{digest}"


def parse_reference(text: str) -> Reference:
    """Parse an image reference the way `docker pull` does.

    The first path component is a registry when it holds a `.` or a `:` or is `localhost`;
    otherwise the registry is Docker Hub, where a single-component name gets `library/`. A
    reference with neither tag nor digest means tag `latest`. Raises BuildError naming the
    reference when it breaks Docker's grammar (uppercase names, bad tags, digests other than
    64-hex-digit sha256).
    """
    rest, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise BuildError(f"invalid image reference {text!r}: bad digest {digest!r}")
    name, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        name, tag = rest, ""
    elif not _TAG.fullmatch(tag):
        raise BuildError(f"invalid image reference {text!r}: bad tag {tag!r}")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise BuildError(f"invalid image reference {text!r}: bad registry {first!r}")
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.fullmatch(repository):
        raise BuildError(f"invalid image reference {text!r}: bad repository name "
                         f"{repository!r} (lowercase letters, digits and . _ - separators)")
    return Reference(registry, repository, tag or (None if at else "latest"), digest or None)


def uses_plain_http(registry: str, insecure: Collection[str] = ()) -> bool:
    """Whether `registry` ("HOST[:PORT]") is reached over plain HTTP: only on loopback
    (127.0.0.0/8, ::1, localhost) or when listed in `insecure`."""
    if registry in insecure:
        return True
    hostname = re.sub(r":[0-9]+$", "", registry).strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Platform:
    """An image platform: `os/architecture[/variant]` with GOOS/GOARCH names."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse "os/arch[/variant]"; BuildError for anything else."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise BuildError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """This machine's platform (linux, with the machine name mapped to GOARCH)."""
        machine = host.machine()
        architecture, variant = _ARCHITECTURES.get(machine, (machine, None))
        return cls("linux", architecture, variant)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        """Whether an index entry's `platform` object is this one; a platform without a
        variant accepts any variant."""
        return (entry.get("os") == self.os and entry.get("architecture") == self.architecture
                and (self.variant is None or entry.get("variant") == self.variant))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


class RegistryFetcher:
    """Pulls images from registries into a rootfs; implements the `Fetcher` protocol.

    One fetcher may serve concurrent fetches. Two processes sharing `cache_dir` are safe for
    blobs (each is renamed into place whole); a tag recorded by both at once keeps one of the
    two records, and the other is resolved again next time.
    """

    def __init__(self, cache_dir: Path, *, platform: str | None = None,
                 insecure: Collection[str] = (), auth: RegistryAuth | None = None) -> None:
        """Keep blobs and tag records under `cache_dir`; pick `platform` ("os/arch[/variant]",
        default the host's) from multi-platform images; reach the registries named in
        `insecure` ("HOST:PORT") over plain HTTP; answer authentication challenges with `auth`
        (default: anonymous). Raises BuildError for a malformed `platform`."""
        self.cache_dir = cache_dir
        self.blobs = cache_dir / "blobs" / "sha256"
        self.platform = Platform.parse(platform) if platform else Platform.host()
        self.insecure = frozenset(insecure)
        self.auth = auth if auth is not None else RegistryAuth()
        self._tags_lock = asyncio.Lock()

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """Unpack `image` into the empty directory `rootfs`; return its config's `Env` (with
        Docker's default `PATH` if it sets none) and the digest the reference resolved to.

        A tag recorded in `tags.json` is used as recorded; otherwise it is resolved and recorded.
        The log says which digest is used, each layer's download and its unpacking. Raises
        BuildError (one line naming the image and the registry) for a malformed reference, an
        unknown image, tag or platform, refused authentication, a digest mismatch, an
        unsupported manifest or layer, or a network failure. On failure no unverified blob is
        kept in the cache, and `rootfs` may hold part of the image: the store discards it with
        the step.
        """
        ref = parse_reference(image)
        async with self._client(image, ref) as client:
            digest = ref.digest or self._tags().get(str(ref))
            if digest is None:
                digest = await self._resolve(client, ref)
                log.write(f"{image} resolved to {digest}\n".encode())
            else:
                log.write(f"{image} is {digest}\n".encode())
            manifest = await self._image_manifest(client, digest, log)
            config = await self._blob(client, manifest["config"], log)
            await self._unpack(client, manifest["layers"], rootfs, log)
        try:
            return ImageInfo(env=_env(json.loads(config.read_bytes())), digest=digest)
        except (ValueError, TypeError, AttributeError) as e:
            raise client.error(f"invalid image config ({e})") from None

    async def refresh(self, image: str) -> str:
        """Resolve `image`'s tag at its registry again; record and return the manifest digest.

        A reference holding a digest is returned as is. Raises BuildError as `fetch` does; the
        earlier record is then kept.
        """
        ref = parse_reference(image)
        if ref.digest:
            return ref.digest
        async with self._client(image, ref) as client:
            return await self._resolve(client, ref)

    @contextlib.asynccontextmanager
    async def _client(self, image: str, ref: Reference) -> AsyncIterator[_Client]:
        scheme = "http" if uses_plain_http(ref.registry, self.insecure) else "https"
        # No overall limit (a big layer may take long), only on silence.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield _Client(self, session, image, ref,
                          f"{scheme}://{ref.api_host}/v2/{ref.repository}/")

    # --- Tags ------------------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        """The recorded tags: reference -> manifest digest."""
        try:
            return json.loads((self.cache_dir / "tags.json").read_text())
        except FileNotFoundError:
            return {}

    async def _resolve(self, client: _Client, ref: Reference) -> str:
        """Ask the registry which manifest `ref`'s tag names; cache it and record the tag."""
        async with client.get(f"manifests/{ref.tag}", accept=MANIFESTS + INDEXES) as response:
            data = await client.read(response)
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        self._store(data, digest)
        async with self._tags_lock:
            tags = self._tags()
            tags[str(ref)] = digest
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tags.")
            with os.fdopen(fd, "w") as f:
                json.dump(tags, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_dir / "tags.json")
        return digest

    # --- Manifests -------------------------------------------------------------------------

    async def _image_manifest(self, client: _Client, digest: str, log: Log) -> dict[str, Any]:
        """The image manifest `digest` names, through an index for this fetcher's platform."""
        manifest = await self._manifest(client, digest)
        # OCI allows an index or manifest without `mediaType`: its fields tell them apart.
        kind = manifest.get("mediaType") or ("index" if "manifests" in manifest else "")
        if kind in (*INDEXES, "index"):
            entries = manifest.get("manifests") or []
            chosen = next((m for m in entries if self.platform.matches(m.get("platform", {}))),
                          None)
            if chosen is None:
                available = ", ".join(sorted(str(_platform_of(m)) for m in entries)) or "none"
                raise client.error(f"no image for platform {self.platform} "
                                   f"(available: {available})")
            log.write(f"platform {self.platform}: {chosen['digest']}\n".encode())
            manifest = await self._manifest(client, chosen["digest"])
            kind = manifest.get("mediaType") or ("manifest" if "layers" in manifest else "")
        if kind not in (*MANIFESTS, "manifest"):
            raise client.error(f"unsupported manifest type {kind or 'unknown'!r}")
        if not (isinstance(manifest.get("config"), dict)
                and isinstance(manifest.get("layers"), list)):
            raise client.error(f"invalid manifest {digest} (no config or layers)")
        return manifest

    async def _manifest(self, client: _Client, digest: str) -> dict[str, Any]:
        """The manifest `digest`, from the cache or fetched, verified and cached."""
        path = self._path(client, digest)
        if not path.exists():
            async with client.get(f"manifests/{digest}", accept=MANIFESTS + INDEXES) as response:
                data = await client.read(response)
            got = f"sha256:{hashlib.sha256(data).hexdigest()}"
            if got != digest:
                raise client.error(f"digest mismatch for manifest {digest} (got {got})")
            self._store(data, digest)
        try:
            return json.loads(path.read_bytes())
        except ValueError as e:
            raise client.error(f"invalid manifest {digest} ({e})") from None

    # --- Blobs -----------------------------------------------------------------------------

    def _path(self, client: _Client, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise client.error(f"unsupported digest {digest!r} (only sha256 is)")
        return self.blobs / digest.removeprefix("sha256:")

    def _store(self, data: bytes, digest: str) -> None:
        """Cache `data`, already verified to be `digest`, renamed into place whole."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".part.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.blobs / digest.removeprefix("sha256:"))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def _blob(self, client: _Client, descriptor: Mapping[str, Any], log: Log) -> Path:
        """The cached blob `descriptor` names, downloaded first if missing.

        The download streams into a temporary file while hashing and is renamed into the
        cache only once its digest is right; on any failure (or cancellation) the temporary
        file is removed.
        """
        digest = descriptor["digest"]
        path = self._path(client, digest)
        short = digest[:19]
        if path.exists():
            log.write(f"{short}: cached\n".encode())
            return path
        size = descriptor.get("size")
        log.write(f"{short}: downloading {_size(size)}\n".encode())
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".part.")
        try:
            with os.fdopen(fd, "wb") as f:
                sha = hashlib.sha256()
                done = 0
                async with client.get(f"blobs/{digest}") as response:
                    try:
                        async for chunk in response.content.iter_chunked(CHUNK):
                            sha.update(chunk)
                            # A 64 KiB write to the page cache is quicker than a thread hop.
                            f.write(chunk)
                            if (done + len(chunk)) // PROGRESS_STEP > done // PROGRESS_STEP:
                                log.write(f"{short}: {_size(done + len(chunk))} of "
                                          f"{_size(size)}\n".encode())
                            done += len(chunk)
                    except (aiohttp.ClientError, TimeoutError) as e:
                        raise client.error(f"download of {digest} interrupted "
                                           f"({type(e).__name__})") from None
            got = f"sha256:{sha.hexdigest()}"
            if got != digest:
                raise client.error(f"digest mismatch for blob {digest} (got {got})")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.write(f"{short}: verified\n".encode())
        return path

    async def _unpack(self, client: _Client, layers: list[Mapping[str, Any]], rootfs: Path,
                      log: Log) -> None:
        """Download `layers` concurrently (bounded) and apply them in order as they arrive."""
        slots = asyncio.Semaphore(PARALLEL_DOWNLOADS)

        async def download(descriptor: Mapping[str, Any]) -> Path:
            async with slots:
                return await self._blob(client, descriptor, log)

        tasks = [asyncio.create_task(download(d)) for d in layers]
        try:
            for number, (descriptor, task) in enumerate(zip(layers, tasks, strict=True), 1):
                path = await task
                try:
                    await asyncio.to_thread(_apply, path, descriptor.get("mediaType", ""),
                                            rootfs)
                except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError) as e:
                    raise client.error(f"layer {descriptor['digest']} cannot be unpacked "
                                       f"({e})") from None
                log.write(f"unpacked layer {number}/{len(layers)}\n".encode())
        finally:
            # After a failure, stop the other downloads (they remove their partial files).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _Client:
    """One fetch's conversation with a registry: authentication, and errors as BuildErrors."""

    def __init__(self, fetcher: RegistryFetcher, session: aiohttp.ClientSession, image: str,
                 ref: Reference, base: str) -> None:
        self.fetcher = fetcher
        self.session = session
        self.image = image
        self.ref = ref
        self.base = base
        self.authorization: str | None = None

    def error(self, problem: str) -> BuildError:
        """The one-line error naming the image and the registry."""
        return BuildError(f"cannot fetch {self.image!r} from registry {self.ref.registry}: "
                          f"{problem}")

    @contextlib.asynccontextmanager
    async def get(self, path: str, *, accept: Collection[str] = ()
                  ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `path` under the repository's API URL and yield the 200 response.

        A 401 is answered once with the authorization the challenge asks for (anew on every
        401, so a token expiring during a long pull is renewed). Raises the
        fetch's BuildError for refused authentication, unknown names (404) and other statuses,
        and for network failures.
        """
        headers = {"Accept": ", ".join(accept)} if accept else {}
        response = await self._send(path, headers)
        if response.status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.release()
            self.authorization = await self._authorize(challenge)
            response = await self._send(path, headers)
        try:
            if response.status != 200:
                raise await self._status_error(response, path)
            yield response
        finally:
            response.release()

    async def read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, or the fetch's BuildError if the connection fails."""
        try:
            return await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self.error(f"connection lost ({type(e).__name__})") from None

    async def _send(self, path: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        if self.authorization:
            headers = {**headers, "Authorization": self.authorization}
        try:
            return await self.session.get(self.base + path, headers=headers)
        except aiohttp.ClientConnectorError as e:
            reason = os.strerror(e.os_error.errno) if e.os_error.errno else str(e.os_error)
            raise self.error(f"network unreachable ({reason})") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self.error(f"connection failed ({type(e).__name__})") from None

    async def _authorize(self, challenge: str) -> str:
        try:
            authorization = await self.fetcher.auth.authorization(
                self.session, self.ref.registry, challenge,
                f"repository:{self.ref.repository}:pull")
        except RegistryAuthError as e:
            raise self.error(f"authentication failed ({e})") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self.error(f"token server unreachable ({type(e).__name__})") from None
        if authorization is None:
            raise self.error("authentication refused")
        return authorization

    async def _status_error(self, response: aiohttp.ClientResponse, path: str) -> BuildError:
        if response.status in (401, 403):
            return self.error("authentication refused")
        codes = await _error_codes(response)
        if response.status == 404 and path.startswith("manifests/"):
            # docker-registry answers MANIFEST_UNKNOWN for a repository it does not have
            # either: its tag list (NAME_UNKNOWN then) tells the two apart.
            if "NAME_UNKNOWN" not in codes:
                probe = await self._send("tags/list", {})
                probe.release()
                codes.append("NAME_UNKNOWN" if probe.status == 404 else "MANIFEST_UNKNOWN")
            if "NAME_UNKNOWN" in codes:
                return self.error("unknown image")
            what = path.removeprefix("manifests/")
            return self.error(f"unknown tag {what!r}" if what == self.ref.tag
                              else f"unknown manifest {what}")
        if "NAME_UNKNOWN" in codes:
            return self.error("unknown image")
        if response.status == 404:
            return self.error(f"unknown blob {path.removeprefix('blobs/')}")
        return self.error(f"HTTP {response.status} for {path}")


async def _error_codes(response: aiohttp.ClientResponse) -> list[str]:
    """The `code`s of a registry's JSON error body (none if it is not one)."""
    try:
        return [e["code"] for e in (await response.json(content_type=None))["errors"]]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return []


def _platform_of(entry: Mapping[str, Any]) -> Platform:
    p = entry.get("platform", {})
    return Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant"))


def _env(config: Mapping[str, Any]) -> dict[str, str]:
    """The environment an image config sets, with Docker's default PATH when it sets none."""
    env = dict(DEFAULT_ENV)
    for item in (config.get("config") or {}).get("Env") or []:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def _size(size: int | None) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"


def _apply(blob: Path, media_type: str, rootfs: Path) -> None:
    """Apply the layer in `blob` (gzip, zstd or plain tar) on top of `rootfs`."""
    with open(blob, "rb") as raw, _decompressed(raw, media_type) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        extract(tar, rootfs, layer=True)


@contextlib.contextmanager
def _decompressed(raw: IO[bytes], media_type: str) -> Iterator[IO[bytes]]:
    """`raw` decompressed as its media type says, or as its first bytes say when the media
    type does not name a compression."""
    if media_type.endswith(("+gzip", ".gzip")):
        compression = "gzip"
    elif media_type.endswith("+zstd"):
        compression = "zstd"
    elif media_type.endswith(".tar"):
        compression = "none"
    else:
        head = raw.read(4)
        raw.seek(0)
        compression = ("gzip" if head.startswith(b"\x1f\x8b") else
                       "zstd" if head == b"\x28\xb5\x2f\xfd" else "none")
    if compression == "gzip":
        with gzip.GzipFile(fileobj=raw) as stream:
            yield stream
    elif compression == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield stream
    else:
        yield raw
