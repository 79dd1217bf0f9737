"""Platforms and the build specs generated for them, shaped like ocaml-ci's.

A platform is a name, a base image and a way to install dependencies: `system` platforms take
OCaml, dune, opam and the libraries from Debian packages (this works offline, against the host's
Debian mirror); `opam` platforms start from an `ocaml/opam` image and let opam install them.

Every spec starts with the platform's base stage, inline: its steps are the same in every
project's spec, so their step ids are too and the store builds them once. Then, as ocaml-ci
does, the user and workdir are set, only the `*.opam` files are copied, the dependencies are
installed, and only then the whole source is copied: editing anything but the opam files reuses
the installed dependencies. The same analysis always gives the same text, which the builder's
cache relies on.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from typing import Literal

from pipeline.obuilder import spec as S
from pipeline.ocaml.analysis import Analysis


@dataclass(frozen=True)
class Platform:
    """A platform: `name` (shown in job names), its base `image` and how it gets dependencies."""

    name: str
    image: str
    kind: Literal["system", "opam"]
    experimental: bool = False


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform("debian-12-system", "debian:12", "system"),
        Platform("debian-12-ocaml-5.2", "ocaml/opam:debian-12-ocaml-5.2", "opam"),
    )
}

# What every system platform installs from Debian: the toolchain (ocaml-nox pulls gcc and binutils
# in, which ocamlopt needs to link), findlib (which many builds call), opam for `opam lint`, and
# rsync, without which opam cannot read `file://` sources.
BASE_PACKAGES: tuple[str, ...] = ("ocaml-dune", "ocaml-findlib", "ocaml-nox", "opam", "rsync")

# opam packages whose Debian name does not follow `libNAME-ocaml-dev`. The `base-*` packages are
# opam's names for parts of the compiler distribution and findlib.
_DEBIAN_NAMES = {
    "ocaml": "ocaml-nox",
    "dune": "ocaml-dune",
    "ocamlfind": "ocaml-findlib",
    "base-unix": "ocaml-nox",
    "base-threads": "ocaml-nox",
    "base-bigarray": "ocaml-nox",
    "base-bytes": "ocaml-findlib",
}

_UID = 1000
_SRC = "/src"
_HOME = "/home/opam"
_EXCLUDE = (".git", "_build", "_opam")
_BUILD = "dune build @install @check @runtest"
_LINT_COMMANDS = {"fmt": "dune build @fmt", "doc": "dune build @doc"}
_OPAM_USER = (
    f"groupadd --gid {_UID} opam && "
    f"useradd --create-home --uid {_UID} --gid {_UID} --shell /bin/bash opam"
)


def debian_package(dep: str) -> str:
    """The Debian package providing the opam package `dep`.

    `ocaml` → `ocaml-nox`, `dune` → `ocaml-dune`, `ocamlfind` → `ocaml-findlib`, otherwise
    `libNAME-ocaml-dev` with `_` in NAME turned into `-` (Debian names allow no `_`). The package
    may not exist: checking that is the caller's job (the build is then skipped, not failed).
    """
    return _DEBIAN_NAMES.get(dep, f"lib{dep.lower().replace('_', '-')}-ocaml-dev")


def system_packages(a: Analysis) -> list[str]:
    """The Debian packages a system platform needs for `a`: `BASE_PACKAGES` and one per dependency
    (with-test and build ones included, since the build runs the tests), sorted, each once.

    Dependencies on the project's own packages (another of its opam files) are left out: the
    build makes them.
    """
    own = {f.name for f in a.opam_files}
    deps = {d.name for f in a.opam_files for d in f.depends if d.name not in own}
    return sorted({*BASE_PACKAGES, *(debian_package(d) for d in deps)})


def _apt_install(packages: list[str]) -> S.Run:
    # The lists are removed in the same step so that they are not kept in the snapshot.
    return S.Run(
        shell="apt-get update && apt-get install -y --no-install-recommends "
        + " ".join(packages) + " && rm -rf /var/lib/apt/lists/*",
        network=("host",),
    )


def _base(platform: Platform) -> S.Spec:
    if platform.kind == "opam":
        return S.Spec(from_=platform.image)
    return S.Spec(from_=platform.image, ops=(
        _apt_install(list(BASE_PACKAGES)),
        S.Run(shell=_OPAM_USER),
        # Builds run as this user; the image itself gives no HOME for it (opam needs one).
        S.Env("HOME", _HOME),
    ))


def base_stage(platform: Platform) -> str:
    """The spec text of `platform`'s base image, `((from IMAGE) OP...)`.

    For a system platform: the Debian image, `BASE_PACKAGES` installed with host network, and a
    user `opam` (uid and gid 1000) with a home directory. For an opam platform: the image as is.
    Its steps are the first ones of every spec generated for the platform, so building it once
    caches them for all. Never fails.
    """
    return S.to_sexp(_base(platform))


def _copy_opam_files(a: Analysis) -> list[S.Op]:
    """Copies of the opam files only, at their relative paths under /src, one per directory."""
    by_dir: dict[str, list[str]] = {}
    for f in a.opam_files:
        by_dir.setdefault(posixpath.dirname(f.path), []).append(f.path)
    return [
        S.Copy(src=tuple(sorted(paths)), dst=posixpath.join(_SRC, directory, ""))
        for directory, paths in sorted(by_dir.items())
    ]


def _opam_dirs(a: Analysis) -> str:
    """The directories holding opam files, as `opam install` arguments (`./`, `./sub/`)."""
    dirs = sorted({posixpath.dirname(f.path) for f in a.opam_files})
    return " ".join(shlex.quote(posixpath.join(".", d, "")) for d in dirs)


def _dependencies(
    platform: Platform, a: Analysis, packages: list[str] | None, opam_repository: str | None
) -> list[S.Op]:
    """The steps from the base image to the dependencies installed, as user 1000 in /src."""
    ops: list[S.Op] = [*_base(platform).ops, S.UserIds(_UID, _UID)]
    if platform.kind == "system":
        ops += [S.Workdir(_SRC), *_copy_opam_files(a)]
        wanted = system_packages(a) if packages is None else packages
        extra = sorted(set(wanted) - set(BASE_PACKAGES))
        if extra:
            # apt needs root; the rest of the build runs as the user, as with opam.
            ops += [S.ROOT, _apt_install(extra), S.UserIds(_UID, _UID)]
        return ops
    if opam_repository is not None:
        # Its own step, before the project's files, so every project shares it.
        url = shlex.quote(f"file://{opam_repository}")
        # Run before the workdir is set: a command run in a missing /src would have the sandbox
        # make it, owned by root, and the user could then not write `_build` there (copying
        # makes it the user's).
        ops.append(S.Run(shell=f"opam repository set-url default {url} && opam update default"))
    ops += [S.Workdir(_SRC), *_copy_opam_files(a)]
    ops.append(S.Run(
        shell=f"opam install --deps-only --with-test -y {_opam_dirs(a)}", network=("host",)
    ))
    return ops


def _copy_source() -> S.Copy:
    return S.Copy(src=(".",), dst=f"{_SRC}/", exclude=_EXCLUDE)


def _in_env(platform: Platform, command: str) -> str:
    # opam images put the switch's tools on PATH only through `opam exec`.
    return f"opam exec -- {command}" if platform.kind == "opam" else command


def build_spec(
    platform: Platform,
    a: Analysis,
    *,
    packages: list[str] | None = None,
    opam_repository: str | None = None,
) -> str:
    """The spec text that builds and tests the project analysed as `a` on `platform`.

    `packages` (system platforms) replaces `system_packages(a)`, e.g. once the caller has checked
    which exist. `opam_repository` (opam platforms) is a directory *inside the image* holding an
    opam repository: the image's opam root (initialised, with a switch, as in `ocaml/opam`
    images) is pointed at it with `opam repository set-url`, which needs `rsync` in the image.
    Never fails; the result always parses with `pipeline.obuilder.spec.parse`.
    """
    ops = [
        *_dependencies(platform, a, packages, opam_repository),
        _copy_source(),
        S.Run(shell=_in_env(platform, _BUILD)),
    ]
    return S.to_sexp(S.Spec(from_=platform.image, ops=tuple(ops)))


def lint_spec(platform: Platform, a: Analysis, kind: Literal["opam", "fmt", "doc"]) -> str:
    """The spec text of the lint job `kind`.

    `opam`: `opam lint` on every opam file (only they are copied; no dependency is installed).
    `fmt`: `dune build @fmt` on the source; on an opam platform the `.ocamlformat` version of
    ocamlformat is installed first (on a system platform, Debian has none: the caller skips).
    `doc`: the build's dependencies (and odoc, on an opam platform), then `dune build @doc`.
    Raises `ValueError` for another `kind`.
    """
    user = [S.UserIds(_UID, _UID), S.Workdir(_SRC)]
    base = list(_base(platform).ops)
    if kind == "opam":
        paths = " ".join(shlex.quote(f.path) for f in a.opam_files)
        ops = [*base, *user, *_copy_opam_files(a), S.Run(shell=f"opam lint {paths}")]
    elif kind == "fmt":
        ops = [*base, user[0]]
        if platform.kind == "opam" and a.ocamlformat_version is not None:
            # Before the workdir, as in `_dependencies`: /src must be made by the copy.
            ops.append(S.Run(
                shell=f"opam install -y {shlex.quote('ocamlformat=' + a.ocamlformat_version)}",
                network=("host",),
            ))
        ops += [user[1], _copy_source(), S.Run(shell=_in_env(platform, _LINT_COMMANDS["fmt"]))]
    elif kind == "doc":
        ops = _dependencies(platform, a, None, None)
        if platform.kind == "opam":
            ops.append(S.Run(shell="opam install -y odoc", network=("host",)))
        ops += [_copy_source(), S.Run(shell=_in_env(platform, _LINT_COMMANDS["doc"]))]
    else:
        raise ValueError(f"unknown lint kind {kind!r}; expected opam, fmt or doc")
    return S.to_sexp(S.Spec(from_=platform.image, ops=tuple(ops)))


def reproduce_block(spec_text: str, *, store: str = "rsync:/tmp/store") -> str:
    """The "To reproduce locally" text for a job log: from a checkout of the commit, write the
    spec to `build.spec` and run it with `pipeline obuilder build` (as root, which runc needs).

    `store` is `KIND:PATH`; its directory is created first. Never fails: the here-document's
    end marker is lengthened until no line of the spec equals it.
    """
    marker = "END-OF-SPEC"
    lines = spec_text.splitlines()
    while marker in lines:
        marker += "-"
    _, _, store_dir = store.partition(":")
    body = spec_text.rstrip("\n")
    return (
        "To reproduce locally, in a checkout of this commit:\n\n"
        f"cat > build.spec <<'{marker}'\n"
        f"{body}\n"
        f"{marker}\n"
        f"mkdir -p {shlex.quote(store_dir)}\n"
        f"pipeline obuilder build -f build.spec . --store {shlex.quote(store)}\n"
    )
