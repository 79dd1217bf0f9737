"""`pipeline obuilder`: build specs, convert them, and look after stores.

Only the modules a command needs are imported, so that a fully cached build starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _store_option(parser: argparse.ArgumentParser) -> None:
    from pipeline.obuilder.stores import spec_help

    parser.add_argument("--store", metavar="KIND:PATH", required=True,
                        help=f"the store: {spec_help()}")
    parser.add_argument("--rsync-mode", choices=("copy", "hardlink"), default="copy",
                        help="how an rsync store copies results (default: copy)")
    parser.add_argument("--engine", choices=("docker", "podman"),
                        help="the container engine of a docker store (default: the one the "
                        "store was made with; docker for a new store)")


def _spec_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", metavar="SPEC", type=Path, required=True,
                        help="the build spec (S-expressions)")


FETCHER_HELP = """\
Images: `(from IMAGE)` is made by the fetcher named with --fetcher: `registry` (a Docker
registry; Docker Hub for names without a host), `debootstrap` (debian:SUITE, debian:12,
debian:13, debian:SUITE-slim, debian = debian:stable, from the host's Debian mirror) or
`local:DIR` (DIR/NAME.tar or DIR/NAME.tar.gz, '/' and ':' in NAME replaced by '_'; --image-dir
DIR is short for --fetcher local:DIR). Without either, `debian` and `debian:*` are made with
debootstrap and every other image comes from a registry. --fetcher-map FILE sends chosen images
to other fetchers, with lines like `debian:* -> debootstrap` or `busybox -> local:/srv/images`
(shell globs on the whole reference; the first match wins; `#` starts a comment); the others go
to the fetcher chosen as above. Each image is fetched once per store; `pull` fetches it again.
"""


def _fetcher_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fetcher", metavar="FETCHER",
                       help="registry, debootstrap or local:DIR (default: debootstrap for "
                       "debian and debian:*, registry for the rest)")
    which.add_argument("--image-dir", metavar="DIR",
                       help="short for --fetcher local:DIR")
    parser.add_argument("--fetcher-map", metavar="FILE", type=Path,
                        help="PATTERN -> FETCHER lines choosing the fetcher of some images")
    parser.add_argument("--platform", metavar="linux/ARCH",
                        help="the platform the build is for: its images (an image index's "
                        "matching manifest, debootstrap's architecture; local:DIR tarballs "
                        "are used as they are) and its step ids; ARCH amd64, arm64, ppc64le, "
                        "s390x or riscv64, another than this host's running under emulation "
                        "(qemu-user-static; default: this host's)")
    parser.add_argument("--insecure-registry", metavar="HOST:PORT", action="append",
                        default=[], help="a registry reached over plain HTTP (may be "
                        "repeated; registries on loopback always are)")
    parser.add_argument("--debian-mirror", metavar="URL",
                        help="debootstrap's mirror (default: the first Debian archive of "
                        "the host's apt sources)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of `pipeline obuilder`."""
    parser = argparse.ArgumentParser(
        prog="pipeline obuilder",
        description="A sandboxed builder in the style of OBuilder: each step of a spec is a "
        "snapshot in a store, each command runs in a runc sandbox (in a container of docker or "
        "podman with a docker store).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build a spec",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Build SPEC with CONTEXT as the source of copy "
                                "steps; the last line is Got: \"ID\" (exit 1 on a failed "
                                "step).\n\n" + FETCHER_HELP)
    _spec_option(build)
    build.add_argument("context", metavar="CONTEXT", type=Path,
                       help="the directory copy steps read from")
    _store_option(build)
    _fetcher_options(build)
    build.add_argument("--secret", metavar="ID:FILE", action="append", default=[],
                       help="the value of secret ID, read from FILE (may be repeated)")
    build.add_argument("--fast-sync", action="store_true",
                       help="make fsync and friends no-ops inside the sandbox (faster, unsafe "
                       "on power loss)")
    build.add_argument("--memory", metavar="BYTES", type=int,
                       help="memory limit of each command (default: none)")
    build.add_argument("--cpus", metavar="N", type=float,
                       help="CPU limit of each command (default: none)")

    pull = commands.add_parser(
        "pull", help="fetch an image again if it has changed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Resolve IMAGE again (a registry tag to its current digest). If the "
        "digest differs from the stored base's, or there is no stored base, delete the base "
        "with everything built on it and fetch the image again, so that the next build uses "
        "it. Images from debootstrap or a local directory cannot be resolved without being "
        "made: they are always fetched again. The last line is the image's digest.\n\n"
        + FETCHER_HELP)
    pull.add_argument("image", metavar="IMAGE")
    _store_option(pull)
    _fetcher_options(pull)

    fmt = commands.add_parser("fmt", help="print a spec in canonical form")
    _spec_option(fmt)

    dockerfile = commands.add_parser("dockerfile", help="convert a spec to a Dockerfile")
    _spec_option(dockerfile)
    dockerfile.add_argument("--buildkit", action="store_true",
                            help="use BuildKit syntax for caches and secrets")
    dockerfile.add_argument("--escape", choices=("unix", "windows"), default="unix",
                            help="the escape character convention (default: unix)")

    for name, text in (("healthcheck", "check that runc (a docker store's engine) works and "
                        "that the store works and is "
                        "not full (full: less than 1 %% of its filesystem or 100 MiB free, "
                        "whichever is larger; builds refuse to start then)"),
                       ("clean", "remove what crashed processes left (containers, builds, "
                        "mounts, images)"),
                       ("df", "show the store's disk usage")):
        _store_option(commands.add_parser(name, help=text))

    delete = commands.add_parser("delete", help="delete a result and everything built on it")
    delete.add_argument("id", metavar="ID")
    _store_option(delete)

    prune = commands.add_parser("prune", help="delete least-recently-used results")
    _store_option(prune)
    prune.add_argument("--before", metavar="ISO8601", required=True, type=_timestamp,
                       help="only results last used before this time")
    prune.add_argument("--limit", metavar="N", type=int,
                       help="delete at most N results")
    return parser


def _timestamp(text: str) -> datetime:
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main(argv: Sequence[str]) -> int:
    """Run `pipeline obuilder ARGV`; returns the exit status."""
    from pipeline.obuilder.protocols import BuildError

    parser = build_parser()
    options = parser.parse_args(list(argv))
    docker = getattr(options, "store", "").startswith("docker:")
    if getattr(options, "engine", None) and not docker:
        parser.error("--engine applies to docker stores (--store docker:PREFIX) only")
    if getattr(options, "fast_sync", False) and docker:
        parser.error("--fast-sync is for the runc sandbox, not a docker store's")
    if getattr(options, "platform", None) is not None:
        from pipeline.obuilder.platforms import parse_platform

        try:
            options.platform = parse_platform(options.platform)
        except BuildError as exc:
            print(f"pipeline obuilder {options.command}: --platform: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if options.command in ("fmt", "dockerfile"):
            return _convert(options)
        if os.geteuid() != 0:
            print("pipeline obuilder: must run as root (runc and the stores need it)",
                  file=sys.stderr)
            return EXIT_FAILED
        return asyncio.run(_store_command(options))
    except BuildError as exc:
        print(f"pipeline obuilder: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


async def _store_command(options: argparse.Namespace) -> int:
    """Run a command on a store; a full disk becomes one message saying how to free space."""
    from pipeline.obuilder.full_store import reporting_full
    from pipeline.obuilder.stores import open_store

    async with reporting_full(lambda: open_store(options.store, rsync_mode=options.rsync_mode,
                                                 engine=options.engine)):
        return await _COMMANDS[options.command](options)


def _read_spec(options: argparse.Namespace) -> Any:
    from pipeline.obuilder import spec

    path: Path = options.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise spec.SpecError(f"{exc.strerror}", filename=str(path)) from None
    return spec.parse(spec.decode(data, filename=str(path)), filename=str(path))


def _convert(options: argparse.Namespace) -> int:
    from pipeline.obuilder import spec

    parsed = _read_spec(options)
    if options.command == "fmt":
        sys.stdout.write(spec.to_sexp(parsed))
    else:
        sys.stdout.write(spec.to_dockerfile(parsed, buildkit=options.buildkit,
                                            os=options.escape))
    return EXIT_OK


@asynccontextmanager
async def _opened_store(options: argparse.Namespace) -> AsyncIterator[Any]:
    """The store of `--store`, opened for the block and closed after it."""
    from pipeline.obuilder.setup import open_db_store

    store = await open_db_store(options.store, rsync_mode=options.rsync_mode,
                                engine=options.engine)
    try:
        yield store
    finally:
        store.close()


class _Stdout:
    """The build log, written to standard output as it arrives.

    A reader that stops reading (`... | head`) does not stop the build: its step would be
    killed half-way and left for the next start-up to clean. The rest of the output, the final
    `Got:` line included, goes to /dev/null, and the build ends with its own status.
    """

    def write(self, data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            discard_stdout()


def discard_stdout() -> None:
    """Send standard output to /dev/null from now on: its reader has gone (EPIPE), and what is
    still buffered or yet to be written must not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


async def _build(options: argparse.Namespace) -> int:
    from pipeline.obuilder.protocols import BuildError
    from pipeline.obuilder.setup import open_builder

    parsed = _read_spec(options)
    secrets = {}
    for item in options.secret:
        secret_id, sep, file = item.partition(":")
        if not sep or not secret_id or not file:
            raise BuildError(f"--secret {item!r}: expected ID:FILE")
        try:
            secrets[secret_id] = Path(file).read_bytes()
        except OSError as exc:
            raise BuildError(f"--secret {secret_id}: {file}: {exc.strerror}") from None
    builder = await open_builder(
        options.store, rsync_mode=options.rsync_mode, memory=options.memory, cpus=options.cpus,
        fast_sync=options.fast_sync, engine=options.engine, **_fetcher_settings(options))
    log = _Stdout()
    try:
        result = await builder.build(parsed, options.context, log=log.write, secrets=secrets)
    finally:
        builder.close()
    print(f'Got: "{result}"', flush=True)
    return EXIT_OK


def _fetcher_settings(options: argparse.Namespace) -> dict[str, Any]:
    """The fetcher options, as `select_fetcher` takes them (see FETCHER_HELP)."""
    return {"fetcher": options.fetcher, "image_dir": options.image_dir,
            "fetcher_map": options.fetcher_map, "platform": options.platform,
            "insecure": options.insecure_registry, "mirror": options.debian_mirror}


async def _pull(options: argparse.Namespace) -> int:
    from pipeline.obuilder.builder import Builder
    from pipeline.obuilder.fetchers.select import choose
    from pipeline.obuilder.setup import open_sandbox, select_fetcher

    image: str = options.image
    async with _opened_store(options) as store:
        fetcher = choose(select_fetcher(store.state_dir, **_fetcher_settings(options)), image)
        # Only the `from` step runs: no command (a docker sandbox imports the image).
        builder = Builder(store, open_sandbox(store.root), fetcher, platform=options.platform)
        try:
            return await _pull_image(image, builder, fetcher)
        finally:
            builder.sandbox.close()


async def _pull_image(image: str, builder: Any, fetcher: Any) -> int:
    """Fetch `image` again with `fetcher` unless the stored base has its current digest."""
    from pipeline.obuilder.builder import base_digest, from_id

    store = builder.store
    id = from_id(image, builder.platform)
    existing = await store.result(id)
    refresh = getattr(fetcher, "refresh", None)
    if refresh is not None:
        digest = await refresh(image)
        if existing is not None and base_digest(existing) == digest:
            print(digest)
            return EXIT_OK
    if existing is not None:
        for result_id in await store.delete(id):
            print(f"deleted {result_id}")
    log = _Stdout()
    await builder.fetch_base(image, log=log.write)
    result = await store.result(id)
    print((result and base_digest(result)) or "(no digest)")
    return EXIT_OK


async def _healthcheck(options: argparse.Namespace) -> int:
    from pipeline.obuilder.full_store import space_problem

    async with _opened_store(options) as store:
        problem = await space_problem(store)
        if problem is not None:
            raise problem
        usage = await store.df()
        backend = store.store
    print(f"store {options.store}: ok ({usage.free // 2**20} MiB free)")
    if backend.kind == "docker":
        # Opening the store asked the engine where its images are: it answers.
        print(f"engine: {backend.engine.name} ({backend.engine.path})")
        return EXIT_OK
    from pipeline.obuilder.sandboxes.runc import check_runc

    print(f"runc: {await check_runc()}")
    from pipeline.obuilder.emulation import describe_platforms

    for line in describe_platforms():
        print(f"platform {line}")
    return EXIT_OK


async def _clean(options: argparse.Namespace) -> int:
    from pipeline.obuilder.setup import open_builder

    builder = await open_builder(options.store, rsync_mode=options.rsync_mode,
                                 engine=options.engine)
    try:
        await builder.clean()
    finally:
        builder.close()
    return EXIT_OK


async def _df(options: argparse.Namespace) -> int:
    async with _opened_store(options) as store:
        usage = await store.df()
    used = usage.total - usage.free
    print(f"{used / 2**30:.2f} GiB used of {usage.total / 2**30:.2f} GiB "
          f"({100 * usage.free / max(usage.total, 1):.0f}% free)")
    return EXIT_OK


async def _delete(options: argparse.Namespace) -> int:
    async with _opened_store(options) as store:
        deleted = await store.delete(options.id)
    for result_id in deleted or ():
        print(f"deleted {result_id}")
    return EXIT_OK


async def _prune(options: argparse.Namespace) -> int:
    async with _opened_store(options) as store:
        deleted = await store.prune(options.before, options.limit)
    for result_id in deleted:
        print(f"deleted {result_id}")
    print(f"{len(deleted)} results deleted")
    return EXIT_OK


_COMMANDS = {
    "build": _build,
    "pull": _pull,
    "healthcheck": _healthcheck,
    "clean": _clean,
    "df": _df,
    "delete": _delete,
    "prune": _prune,
}
