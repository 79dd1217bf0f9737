"""`pipeline obuilder`: build specs, convert them, and look after stores.

Only the modules a command needs are imported, so that a fully cached build starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="KIND:PATH", required=True,
                        help="the store: btrfs:DIR, overlayfs:DIR, xfs:DIR or rsync:DIR")
    parser.add_argument("--rsync-mode", choices=("copy", "hardlink"), default="copy",
                        help="how an rsync store copies results (default: copy)")


def _spec_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", metavar="SPEC", type=Path, required=True,
                        help="the build spec (S-expressions)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of `pipeline obuilder`."""
    parser = argparse.ArgumentParser(
        prog="pipeline obuilder",
        description="A sandboxed builder in the style of OBuilder: each step of a spec is a "
        "snapshot in a store, each command runs in a runc sandbox.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build a spec",
                                description="Build SPEC with CONTEXT as the source of copy "
                                "steps; the last line is Got: \"ID\" (exit 1 on a failed step).")
    _spec_option(build)
    build.add_argument("context", metavar="CONTEXT", type=Path,
                       help="the directory copy steps read from")
    _store_option(build)
    build.add_argument("--image-dir", metavar="DIR", type=Path, required=True,
                       help="rootfs tarballs: image NAME is DIR/NAME.tar or DIR/NAME.tar.gz "
                       "('/' and ':' in NAME replaced by '_')")
    build.add_argument("--secret", metavar="ID:FILE", action="append", default=[],
                       help="the value of secret ID, read from FILE (may be repeated)")
    build.add_argument("--fast-sync", action="store_true",
                       help="make fsync and friends no-ops inside the sandbox (faster, unsafe "
                       "on power loss)")
    build.add_argument("--memory", metavar="BYTES", type=int,
                       help="memory limit of each command (default: none)")
    build.add_argument("--cpus", metavar="N", type=float,
                       help="CPU limit of each command (default: none)")

    fmt = commands.add_parser("fmt", help="print a spec in canonical form")
    _spec_option(fmt)

    dockerfile = commands.add_parser("dockerfile", help="convert a spec to a Dockerfile")
    _spec_option(dockerfile)
    dockerfile.add_argument("--buildkit", action="store_true",
                            help="use BuildKit syntax for caches and secrets")
    dockerfile.add_argument("--escape", choices=("unix", "windows"), default="unix",
                            help="the escape character convention (default: unix)")

    for name, text in (("healthcheck", "check that the store and runc work"),
                       ("clean", "remove temporary state left by a crash"),
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
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main(argv: Sequence[str]) -> int:
    """Run `pipeline obuilder ARGV`; returns the exit status."""
    from pipeline.obuilder.protocols import BuildError

    options = build_parser().parse_args(list(argv))
    try:
        if options.command in ("fmt", "dockerfile"):
            return _convert(options)
        if os.geteuid() != 0:
            print("pipeline obuilder: must run as root (runc and the stores need it)",
                  file=sys.stderr)
            return EXIT_FAILED
        return asyncio.run(_COMMANDS[options.command](options))
    except BuildError as exc:
        print(f"pipeline obuilder: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _read_spec(options: argparse.Namespace) -> Any:
    from pipeline.obuilder import spec

    path: Path = options.file
    try:
        text = path.read_text()
    except OSError as exc:
        raise spec.SpecError(f"{path}: {exc.strerror}") from None
    return spec.parse(text, filename=str(path))


def _convert(options: argparse.Namespace) -> int:
    from pipeline.obuilder import spec

    parsed = _read_spec(options)
    if options.command == "fmt":
        sys.stdout.write(spec.to_sexp(parsed))
    else:
        sys.stdout.write(spec.to_dockerfile(parsed, buildkit=options.buildkit,
                                            os=options.escape))
    return EXIT_OK


async def _open_store(options: argparse.Namespace) -> Any:
    from pipeline.obuilder.db_store import DbStore
    from pipeline.obuilder.stores import open_store

    store = DbStore(open_store(options.store, rsync_mode=options.rsync_mode))
    await store.open()
    return store


class _Stdout:
    """The build log, written to standard output as it arrives."""

    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


async def _build(options: argparse.Namespace) -> int:
    from pipeline.obuilder.builder import Builder
    from pipeline.obuilder.fetchers.local import LocalFetcher
    from pipeline.obuilder.protocols import BuildError
    from pipeline.obuilder.sandboxes.runc import RuncSandbox

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
    store = await _open_store(options)
    sandbox = RuncSandbox(store.root / "state" / "sandbox", memory=options.memory,
                          cpus=options.cpus, fast_sync=options.fast_sync)
    builder = Builder(store, sandbox, LocalFetcher(options.image_dir))
    log = _Stdout()
    result = await builder.build(parsed, options.context, log=log.write, secrets=secrets)
    print(f'Got: "{result}"', flush=True)
    return EXIT_OK


async def _healthcheck(options: argparse.Namespace) -> int:
    store = await _open_store(options)
    usage = await store.df()
    print(f"store {options.store}: ok ({usage.free // 2**20} MiB free)")
    from pipeline.obuilder.sandboxes.runc import check_runc

    print(f"runc: {await check_runc()}")
    return EXIT_OK


async def _clean(options: argparse.Namespace) -> int:
    store = await _open_store(options)
    await store.clean()
    return EXIT_OK


async def _df(options: argparse.Namespace) -> int:
    store = await _open_store(options)
    usage = await store.df()
    used = usage.total - usage.free
    print(f"{used / 2**30:.2f} GiB used of {usage.total / 2**30:.2f} GiB "
          f"({100 * usage.free / max(usage.total, 1):.0f}% free)")
    return EXIT_OK


async def _delete(options: argparse.Namespace) -> int:
    store = await _open_store(options)
    deleted = await store.delete(options.id)
    for result_id in deleted or ():
        print(f"deleted {result_id}")
    return EXIT_OK


async def _prune(options: argparse.Namespace) -> int:
    store = await _open_store(options)
    deleted = await store.prune(options.before, options.limit)
    for result_id in deleted:
        print(f"deleted {result_id}")
    print(f"{len(deleted)} results deleted")
    return EXIT_OK


_COMMANDS = {
    "build": _build,
    "healthcheck": _healthcheck,
    "clean": _clean,
    "df": _df,
    "delete": _delete,
    "prune": _prune,
}
