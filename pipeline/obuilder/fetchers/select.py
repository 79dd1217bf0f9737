"""Choosing the fetcher of each image: `--fetcher NAME`, mapping files, and the default.

A fetcher is named `registry`, `debootstrap` or `local:DIR` (`parse_fetcher`). A `FetcherMap`
sends each image to the fetcher of the first glob pattern matching its name, and the rest to a
default fetcher. Its rules can be read from a mapping file (`read_fetcher_map`):

    # comment
    debian:* -> debootstrap
    busybox -> local:/srv/images
    ghcr.io/* -> registry

Fetchers are made when an image first needs them, so that a build whose `from` steps are all
in the store imports neither aiohttp nor anything else it does not use.

The default (`default_fetcher`): `debian` and `debian:*` are made with debootstrap from the
host's Debian mirror, everything else comes from a registry. Debian images are what most specs
start from; debootstrap makes them from a mirror the host already trusts and reaches, with no
Docker Hub account or rate limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from pipeline.obuilder.protocols import BuildError, Fetcher, ImageInfo, Log

FETCHERS = "registry, debootstrap or local:DIR"


class Deferred:
    """A fetcher made on first use; implements the `Fetcher` protocol."""

    def __init__(self, name: str, make: Callable[[], Fetcher]) -> None:
        """`name` is how the fetcher was written (`registry`); `make` makes it."""
        self.name = name
        self._make = make
        self._fetcher: Fetcher | None = None

    def get(self) -> Fetcher:
        """The fetcher, made now if it was not yet; raises what making it raises."""
        if self._fetcher is None:
            self._fetcher = self._make()
        return self._fetcher

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """See `Fetcher.fetch`."""
        return await self.get().fetch(image, rootfs, log=log)


def parse_fetcher(text: str, *, cache_dir: Path, platform: str | None = None,
                  insecure: Sequence[str] = (), mirror: str | None = None) -> Deferred:
    """The fetcher named by `text`: `registry`, `debootstrap` or `local:DIR`.

    `platform` (`linux/ARCH`; None: the host's) is the platform of the images a registry or
    debootstrap fetcher makes (a registry picks an image index's manifest for it; a registry
    alone also takes `os/arch/variant`); a local directory's tarballs carry no platform and
    are used as they are. `cache_dir` (layers and resolved tags) and `insecure` (`HOST:PORT`
    served over plain HTTP) configure a registry fetcher; `mirror` a debootstrap fetcher
    (default: the host's). Raises BuildError for any other text, or `local:` without a
    directory. Nothing is imported or checked (the platform included) until the fetcher is
    first used.
    """
    if text == "registry":

        def registry() -> Fetcher:
            from pipeline.obuilder.fetchers.registry import RegistryFetcher

            return RegistryFetcher(cache_dir, platform=platform, insecure=tuple(insecure))

        return Deferred(text, registry)
    if text == "debootstrap":

        def debootstrap() -> Fetcher:
            from pipeline.obuilder.fetchers.debootstrap import DebootstrapFetcher

            return DebootstrapFetcher(mirror=mirror, platform=platform)

        return Deferred(text, debootstrap)
    kind, sep, directory = text.partition(":")
    if kind == "local" and sep:
        if not directory:
            raise BuildError(f"fetcher {text!r}: expected local:DIR")

        def local() -> Fetcher:
            from pipeline.obuilder.fetchers.local import LocalFetcher

            return LocalFetcher(Path(directory))

        return Deferred(text, local)
    raise BuildError(f"unknown fetcher {text!r}: expected {FETCHERS}")


class FetcherMap:
    """Sends each image to the fetcher of the first pattern matching it; implements `Fetcher`.

    Patterns are shell globs (`*`, `?`, `[...]`, case-sensitive) matched against the whole
    image reference as written in the spec: `debian:*` matches `debian:12` but not `debian`.
    """

    def __init__(self, rules: Sequence[tuple[str, Fetcher]], default: Fetcher) -> None:
        """`rules` are (pattern, fetcher) pairs, tried in order; `default` gets the rest."""
        self.rules = list(rules)
        self.default = default

    def choose(self, image: str) -> Fetcher:
        """The fetcher that will make `image`: the first matching rule's (looked up again if
        it is a map itself), made now if it was deferred. Raises what making it raises."""
        fetcher = next((f for pattern, f in self.rules if fnmatchcase(image, pattern)),
                       self.default)
        return choose(fetcher, image)

    async def fetch(self, image: str, rootfs: Path, *, log: Log) -> ImageInfo:
        """See `Fetcher.fetch`: the chosen fetcher's answer, or its error."""
        return await self.choose(image).fetch(image, rootfs, log=log)


def choose(fetcher: Fetcher, image: str) -> Fetcher:
    """The fetcher that `fetcher` hands `image` to: through maps and deferred fetchers."""
    if isinstance(fetcher, FetcherMap):
        return fetcher.choose(image)
    if isinstance(fetcher, Deferred):
        return fetcher.get()
    return fetcher


def read_fetcher_map(path: Path, *, default: Fetcher, cache_dir: Path,
                     platform: str | None = None, insecure: Sequence[str] = (),
                     mirror: str | None = None) -> FetcherMap:
    """The map of the mapping file `path` (`PATTERN -> FETCHER` lines; `#` starts a comment;
    blank lines ignored), sending unmatched images to `default`. The other arguments are
    those of `parse_fetcher`.

    Raises BuildError naming the file (and the line, for a line without `->`, an empty pattern,
    or an unknown fetcher) if it cannot be read or is malformed.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise BuildError(f"fetcher map {path}: {exc.strerror}") from None
    rules: list[tuple[str, Fetcher]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, arrow, name = (part.strip() for part in line.partition("->"))
        if not arrow or not pattern or not name:
            raise BuildError(f"{path}:{number}: expected PATTERN -> FETCHER, got {line!r}")
        try:
            fetcher = parse_fetcher(name, cache_dir=cache_dir, platform=platform,
                                    insecure=insecure, mirror=mirror)
        except BuildError as exc:
            raise BuildError(f"{path}:{number}: {exc}") from None
        rules.append((pattern, fetcher))
    return FetcherMap(rules, default)


def default_fetcher(*, cache_dir: Path, platform: str | None = None,
                    insecure: Sequence[str] = (), mirror: str | None = None) -> FetcherMap:
    """The fetcher used when none is named: debootstrap for `debian` and `debian:*`, a
    registry for everything else (see the module's documentation). Arguments as for
    `parse_fetcher`."""
    debootstrap = parse_fetcher("debootstrap", cache_dir=cache_dir, platform=platform,
                                mirror=mirror)
    registry = parse_fetcher("registry", cache_dir=cache_dir, platform=platform,
                             insecure=insecure)
    return FetcherMap([("debian", debootstrap), ("debian:*", debootstrap)], registry)
