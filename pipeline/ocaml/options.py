"""The command-line options that the OCaml CI and opam-repo-ci pipelines share: what to watch,
where and for which platforms to build, and where to report.

Each `add_*` adds a group of options to a pipeline file's parser, `parse` reads them (exiting
through `parser.error`, status 2 and one line, on a usage error), and the functions after it
turn the parsed options into what the pipeline needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pipeline as p
from pipeline.ocaml import github as GH
from pipeline.ocaml import platforms as P
from pipeline.ocaml.report import GitHub
from pipeline.primitives import git
from pipeline.primitives.git import Commit


def add_sources(parser: argparse.ArgumentParser, *, what: str) -> None:
    """`--repo PATH`, `--remote URL` (both repeatable) and `--poll SECONDS`; `what` says what
    is built of a repository ("every branch is built")."""
    parser.add_argument("--repo", action="append", default=[], metavar="PATH",
                        help=f"a local repository, watched: {what} (repeatable)")
    parser.add_argument("--remote", action="append", default=[], metavar="URL",
                        help="a remote repository, polled (repeatable)")
    parser.add_argument("--poll", type=float, default=60, metavar="SECONDS",
                        help="how often remotes are polled (default: 60)")


def add_builds(parser: argparse.ArgumentParser, *, store: str,
               platforms: list[P.Platform]) -> None:
    """`--platforms` (default `platforms`), `--store` (default `store`, or its rsync twin
    without overlayfs), `--fetcher` or `--image-dir`, and `--cluster`."""
    default = ",".join(platform.name for platform in platforms)
    parser.add_argument("--platforms", default=default, metavar="NAMES",
                        help=f"comma-separated, among {', '.join(P.PLATFORMS)}, or all (the"
                             " Debian matrix, built under emulation on other architectures than"
                             f" the host's; default: {default})")
    parser.add_argument("--store", default=None, metavar="KIND:PATH",
                        help=f"the builder's store (default: overlayfs:{store}, or rsync"
                             " without overlayfs; a relative PATH is in the state directory)")
    parser.set_defaults(store_directory=store)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fetcher", help="registry, debootstrap or local:DIR")
    which.add_argument("--image-dir", metavar="DIR", help="base images as DIR/NAME.tar")
    parser.add_argument("--cluster", metavar="tcp://HOST:PORT",
                        help="send the builds to this build cluster's scheduler (default: build"
                             " in this process)")


def add_github(parser: argparse.ArgumentParser, *, statuses: str) -> None:
    """`--github-token-file`, `--github-api-url`, `--github-repo` and `--public-url`;
    `statuses` names the commit statuses set ("ocaml-ci")."""
    parser.add_argument("--github-token-file", type=Path, metavar="FILE",
                        help=f"set each head's {statuses} as GitHub commit statuses with this"
                             " token")
    parser.add_argument("--github-api-url", default=GH.DEFAULT_API_URL, metavar="URL",
                        help=f"the GitHub API (default: {GH.DEFAULT_API_URL})")
    parser.add_argument("--github-repo", metavar="OWNER/NAME",
                        help="the GitHub repository of the watched local repositories")
    parser.add_argument("--public-url", metavar="URL",
                        help="the web UI's address as GitHub's users reach it: GitHub statuses"
                             " link to the commit's page there")


def add_demo(parser: argparse.ArgumentParser, *, what: str, directory: str) -> None:
    """`--demo` (make `what` and watch it) and `--demo-dir` (default `directory`)."""
    parser.add_argument("--demo", action="store_true", help=f"make {what} and watch it")
    parser.add_argument("--demo-dir", default=directory, metavar="DIR",
                        help=f"where --demo makes it (default: {directory})")


def parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """The options of `args`, with `platform_list` the platforms `--platforms` names (`all`:
    the matrix, `platforms.MATRIX`); a usage error for an unknown platform, or for nothing to
    watch."""
    options = parser.parse_args(args)
    try:
        options.platform_list = P.choose(options.platforms)
    except ValueError as error:
        parser.error(str(error))
    if not (options.repo or options.remote or options.demo):
        parser.error("nothing to watch: give --repo, --remote or --demo")
    return options


def store(options: argparse.Namespace) -> str:
    """`--store`, or the default: overlayfs when this kernel knows it (`/proc/filesystems`),
    else rsync, in the state directory."""
    if options.store:
        return str(options.store)
    try:
        overlay = "\toverlay\n" in Path("/proc/filesystems").read_text()
    except OSError:
        overlay = False
    return f"{'overlayfs' if overlay else 'rsync'}:{options.store_directory}"


def fetcher(options: argparse.Namespace) -> str | None:
    """The fetcher: `local:DIR` for `--image-dir DIR`, else `--fetcher` (None: the default)."""
    if options.image_dir:
        return f"local:{Path(options.image_dir).absolute()}"
    return str(options.fetcher) if options.fetcher else None


def github(options: argparse.Namespace) -> GitHub | None:
    """Where commit statuses go, with `--github-token-file`; None without."""
    if options.github_token_file is None:
        return None
    return GitHub(options.github_token_file, options.github_api_url, options.github_repo)


def heads(options: argparse.Namespace, repos: list[str]) -> list[p.Term[list[Commit]]]:
    """The heads of each local repository of `repos` (watched) and of each `--remote`
    (polled every `--poll` seconds)."""
    return [git.local_heads(repo) for repo in repos] + \
        [git.remote_heads(url, poll=options.poll) for url in options.remote]
