"""Platforms and the build specs generated for them, shaped like ocaml-ci's.

A platform is a name, a base image (of a Debian release), the build platform it is built for
(`linux/ARCH`: another architecture than the host's is built under emulation) and a way to
install dependencies: `system` platforms take OCaml, dune, opam and the libraries from Debian
packages (which packages, the caller finds in the indexes of the release and architecture with
`pipeline.ocaml.debian`); `opam` platforms start from an `ocaml/opam` image and let opam install
them.

The matrix (`MATRIX`) is ocaml-ci's within what Debian offers: each release with its own OCaml
(`debian-12-4.13`: bookworm's 4.13.1; `debian-13-5.3`: trixie's 5.3.0) on amd64, and trixie on
the four other architectures, named as ocaml-ci names a variant of another architecture
(`debian-13-5.3_arm64`). The lints run on one platform
(`lint_platform`).

Which dependencies a job installs (`job_dependencies`): the build runs the tests, so it installs
the `{with-test}` ones but not the `{with-doc}` ones; the doc lint the reverse; `opam lint` none.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.obuilder import spec as S
from pipeline.obuilder.platforms import ARCHITECTURES, architecture, is_emulated
from pipeline.ocaml.analysis import Analysis


@dataclass(frozen=True)
class Platform:
    """A platform: `name` (shown in job names), its base `image`, how it gets dependencies, the
    Debian `release` (codename) of the image, and `platform`, the build platform (`linux/ARCH`)
    every build of it is for."""

    name: str
    image: str
    kind: Literal["system", "opam"]
    release: str
    platform: str = "linux/amd64"
    experimental: bool = False

    @property
    def arch(self) -> str:
        """Debian's name of its architecture (`ppc64el`), as the release's indexes name it."""
        return architecture(self.platform).debian

    @property
    def pool(self) -> str:
        """The build cluster's pool of workers that build for it: `linux-x86_64` for amd64,
        `linux-arm64` for arm64, ..."""
        return architecture(self.platform).pool


def _debian(number: str, release: str, ocaml: str, arch: str) -> Platform:
    """The system platform of Debian `number` (`release`) with its OCaml `ocaml` on `arch`
    (an OCI name), named as ocaml-ci names it: `debian-13-5.3`, `debian-13-5.3_arm64`."""
    suffix = "" if arch == "amd64" else f"_{arch}"
    return Platform(f"debian-{number}-{ocaml}{suffix}", f"debian:{number}", "system", release,
                    ARCHITECTURES[arch].platform)


MATRIX: tuple[Platform, ...] = (
    _debian("12", "bookworm", "4.13", "amd64"),
    _debian("13", "trixie", "5.3", "amd64"),
    # Trixie only: riscv64 is an official architecture from trixie on, and one release per
    # emulated architecture keeps `--platforms all` within reach of one machine.
    *(_debian("13", "trixie", "5.3", arch) for arch in ARCHITECTURES if arch != "amd64"),
)
"""ocaml-ci's matrix within what Debian offers: what `--platforms all` chooses, one platform of
each architecture but amd64, which has both releases."""

PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        *MATRIX,
        # Not in the matrix: its image comes from a registry (Docker Hub's ocaml/opam).
        Platform("debian-12-ocaml-5.2", "ocaml/opam:debian-12-ocaml-5.2", "opam", "bookworm"),
    )
}
"""Every platform, by name."""

LINT_PLATFORM = "debian-13-5.3"
"""The platform the lints run on when it is chosen: the newest OCaml and ocamlformat, natively."""


def native() -> list[Platform]:
    """The platforms of `MATRIX` that this host builds without emulation (on amd64:
    `debian-12-4.13` and `debian-13-5.3`): the default choice, since emulation is many times
    slower."""
    return [p for p in MATRIX if not is_emulated(p.platform)]


def choose(names: str) -> list[Platform]:
    """The platforms named in `names`, comma-separated, in that order and each once; `all` is
    every platform of `MATRIX`. Raises ValueError naming the unknown names and the known ones
    (`all` among them)."""
    chosen: dict[str, Platform] = {}
    unknown = []
    for name in names.split(","):
        name = name.strip()
        if name == "all":
            chosen.update((p.name, p) for p in MATRIX)
        elif name in PLATFORMS:
            chosen[name] = PLATFORMS[name]
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown platform {', '.join(map(repr, unknown))}; known: all, "
                         f"{', '.join(PLATFORMS)}")
    return list(chosen.values())


def lint_platform(platforms: Sequence[Platform]) -> Platform | None:
    """The one of `platforms` the lints run on: `LINT_PLATFORM` if it is among them, else the
    first built natively, else the first; None for none."""
    for p in platforms:
        if p.name == LINT_PLATFORM:
            return p
    return next((p for p in platforms if not is_emulated(p.platform)),
                platforms[0] if platforms else None)


# What every system platform installs from Debian: the toolchain (ocaml-nox pulls gcc and binutils
# in, which ocamlopt needs to link), findlib (which many builds call), opam for `opam lint`, and
# rsync, without which opam cannot read `file://` sources.
BASE_PACKAGES: tuple[str, ...] = ("ocaml-dune", "ocaml-findlib", "ocaml-nox", "opam", "rsync")

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
# What `opam install --deps-only` adds for each job that installs dependencies.
_OPAM_WITH = {"build": "--with-test", "doc": "--with-doc"}


def job_dependencies(a: Analysis, kind: Literal["build", "doc"]) -> list[str]:
    """The opam names of the dependencies the job `kind` installs, sorted, each once.

    `build` (which runs the tests): all but the `{with-doc}`-only ones; `doc`: all but the
    `{with-test}`-only ones. The project's own packages (another of its opam files) are left
    out: the build makes them.
    """
    own = {f.name for f in a.opam_files}
    unwanted = "with_doc" if kind == "build" else "with_test"
    return sorted({d.name for f in a.opam_files for d in f.depends
                   if d.name not in own and not getattr(d, unwanted)})


def _apt_install(packages: list[str]) -> S.Run:
    # The lists are removed in the same step so that they are not kept in the snapshot.
    return S.Run(
        shell="apt-get update && apt-get install -y --no-install-recommends "
        + " ".join(packages) + " && rm -rf /var/lib/apt/lists/*",
        network=("host",),
    )


def _apt_extra(packages: Sequence[str]) -> list[S.Op]:
    """The step installing those of `packages` the base lacks, if any (run it as root)."""
    extra = sorted(set(packages) - set(BASE_PACKAGES))
    return [_apt_install(extra)] if extra else []


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


def _dependencies(platform: Platform, a: Analysis, kind: Literal["build", "doc"],
                  packages: Sequence[str], opam_repository: str | None) -> list[S.Op]:
    """The steps from the base image to the dependencies of the job `kind` installed (`packages`
    on a system platform, opam's choice on an opam one), as user 1000 in /src."""
    ops: list[S.Op] = [*_base(platform).ops, S.UserIds(_UID, _UID)]
    if platform.kind == "system":
        ops += [S.Workdir(_SRC), *_copy_opam_files(a)]
        if install := _apt_extra(packages):
            # apt needs root; the rest of the build runs as the user, as with opam.
            ops += [S.ROOT, *install, S.UserIds(_UID, _UID)]
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
        shell=f"opam install --deps-only {_OPAM_WITH[kind]} -y {_opam_dirs(a)}",
        network=("host",),
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
    packages: Sequence[str] = (),
    opam_repository: str | None = None,
) -> str:
    """The spec text that builds and tests the project analysed as `a` on `platform`.

    `packages` (system platforms): the Debian packages of `job_dependencies(a, "build")`; those
    the base lacks are installed. `opam_repository` (opam platforms) is a directory *inside the
    image* holding an opam repository: the image's opam root (initialised, with a switch, as in
    `ocaml/opam` images) is pointed at it with `opam repository set-url`, which needs `rsync` in
    the image. Never fails; the result always parses with `pipeline.obuilder.spec.parse`.
    """
    ops = [
        *_dependencies(platform, a, "build", packages, opam_repository),
        _copy_source(),
        S.Run(shell=_in_env(platform, _BUILD)),
    ]
    return S.to_sexp(S.Spec(from_=platform.image, ops=tuple(ops)))


def lint_spec(platform: Platform, a: Analysis, kind: Literal["opam", "fmt", "doc"], *,
              packages: Sequence[str] = ()) -> str:
    """The spec text of the lint job `kind`.

    `opam`: `opam lint` on every opam file (only they are copied; no dependency is installed).
    `fmt`: `dune build @fmt` on the source, after installing ocamlformat: on an opam platform the
    `.ocamlformat` version, on a system platform `packages` (Debian's ocamlformat; the caller
    checks its version). `doc`: the dependencies of `job_dependencies(a, "doc")` and odoc
    (`packages` on a system platform, opam's `--with-doc` choice and `odoc` on an opam one),
    then `dune build @doc`. Raises `ValueError` for another `kind`.
    """
    user = [S.UserIds(_UID, _UID), S.Workdir(_SRC)]
    base = list(_base(platform).ops)
    if kind == "opam":
        ops = [*base, *user, *_copy_opam_files(a),
               S.Run(shell=f"opam lint {' '.join(shlex.quote(f.path) for f in a.opam_files)}")]
    elif kind == "fmt":
        # Installed before the workdir, as in `_dependencies`: /src must be made by the copy.
        if platform.kind == "system":
            ops = [*base, *_apt_extra(packages), user[0]]
        else:
            ops = [*base, user[0]]
            if a.ocamlformat_version is not None:
                ops.append(S.Run(
                    shell=f"opam install -y {shlex.quote('ocamlformat=' + a.ocamlformat_version)}",
                    network=("host",),
                ))
        ops += [user[1], _copy_source(), S.Run(shell=_in_env(platform, _LINT_COMMANDS["fmt"]))]
    elif kind == "doc":
        ops = _dependencies(platform, a, "doc", packages, None)
        if platform.kind == "opam":
            ops.append(S.Run(shell="opam install -y odoc", network=("host",)))
        ops += [_copy_source(), S.Run(shell=_in_env(platform, _LINT_COMMANDS["doc"]))]
    else:
        raise ValueError(f"unknown lint kind {kind!r}; expected opam, fmt or doc")
    return S.to_sexp(S.Spec(from_=platform.image, ops=tuple(ops)))


def reproduce_block(spec_text: str, *, store: str = "rsync:/tmp/store",
                    checkout: str = "this commit", platform: str | None = None) -> str:
    """The "To reproduce locally" text for a job log: from a checkout of `checkout` (what the
    build's context is: "this commit"), write the spec to `build.spec` and run it with
    `pipeline obuilder build` (as root, which runc needs), for `platform` (`linux/ARCH`) when
    given.

    `store` is `KIND:PATH`; its directory is created first. Never fails: the here-document's
    end marker is lengthened until no line of the spec equals it.
    """
    marker = "END-OF-SPEC"
    lines = spec_text.splitlines()
    while marker in lines:
        marker += "-"
    _, _, store_dir = store.partition(":")
    body = spec_text.rstrip("\n")
    option = f" --platform {shlex.quote(platform)}" if platform is not None else ""
    return (
        f"To reproduce locally, in a checkout of {checkout}:\n\n"
        f"cat > build.spec <<'{marker}'\n"
        f"{body}\n"
        f"{marker}\n"
        f"mkdir -p {shlex.quote(store_dir)}\n"
        f"pipeline obuilder build -f build.spec . --store {shlex.quote(store)}{option}\n"
    )
