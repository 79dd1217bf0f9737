"""The build specs of an opam repository's pull request: its packages built, tested and built
against their lowest dependencies, and their reverse dependencies listed and built, as
opam-repo-ci makes them.

Every spec's build context is a checkout of the pull request merged into its base (without
`.git`). Each spec starts with the same steps (the "setup"): the platform's base stage (shared
with the OCaml CI's specs, see `pipeline.ocaml.platforms.base_stage`), user `opam` (uid 1000) in
its home, opam's environment for CI, then the merged repository copied to `REPOSITORY` and opam
pointed at it. On a system platform (Debian's OCaml, dune and opam) that is `opam init` on it and
a switch on the system compiler (`ocaml-system`, of which opam picks the version whose
`sys-ocaml-version` matches Debian's OCaml); on an opam platform (an `ocaml/opam` image,
whose switch exists) the image's repository is replaced and `opam repository set-url` points at
it. The jobs of a package then share their first steps too, so that the store builds them once
per merged repository:

- `build`: pin the package at its version (`opam pin add -k version`, so that nothing later
  changes it) and `opam reinstall` it;
- `test`: that, then reinstall it `--with-test --verbose` (its tests' output is in the log);
- `lower-bounds`: that, then reinstall it with the solver criteria preferring the oldest
  versions (`LOWER_BOUNDS_CRITERIA` in OPAMCRITERIA, OPAMFIXUPCRITERIA and OPAMUPGRADECRITERIA);
- `revdeps`: the union of `revdeps_commands`' listings between two marker lines, which
  `parse_revdeps` reads back;
- `revdep`: the `build` steps, then the reverse dependency reinstalled with the package kept at
  its version.

No step after the base stage has network: sources are `file://` archives in the repository
(opam copies them with rsync, which the base installs). The same arguments always give the same
text, which the builder's cache relies on.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection
from typing import Literal

from pipeline.obuilder import spec as S
from pipeline.obuilder.log_format import MARK
from pipeline.ocaml.platforms import Platform, base_stage

_HOME = "/home/opam"
REPOSITORY = f"{_HOME}/opam-repository"
"""Where the specs copy the merged repository in the image (`file://` sources point into it)."""
LOWER_BOUNDS_CRITERIA = "+removed,+count[version-lag,solution]"
"""The solver criteria of lower-bounds builds: the oldest versions that satisfy the constraints."""
BuildKind = Literal["build", "test", "lower-bounds"]

_UID = 1000
# opam's settings for CI, as opam-repo-ci sets them: the whole log of a failed command, precise
# tracking of installed files, and the variables test frameworks look at.
_CI_ENV = (S.Env("OPAMERRLOGLEN", "0"), S.Env("OPAMPRECISETRACKING", "1"), S.Env("CI", "true"),
           S.Env("OPAM_REPO_CI", "true"))
_REVDEPS_BEGIN = "@@@ revdeps begin @@@"
_REVDEPS_END = "@@@ revdeps end @@@"
_REVDEPS_FILE = "revdeps.txt"
# "NAME.VERSION": opam's package names are letters, digits and `-_+`; versions have no spaces.
_PACKAGE = re.compile(r"[A-Za-z0-9_+-]+\.\S+")


def revdeps_commands(package: str) -> tuple[str, ...]:
    """The `opam list` commands whose outputs (one "NAME.VERSION" per line), together, are the
    reverse dependencies of `package` ("NAME.VERSION") that can be installed with it: its
    dependents and their dependents (`--recursive`), and those that need it only for their
    tests (`--with-test`, not recursive: a test dependency of a test dependency is not
    needed), optional dependencies included (`--depopts`), every version."""
    quoted = shlex.quote(package)
    common = (f"opam list -s --color=never --depends-on {quoted} --coinstallable-with {quoted}"
              " --all-versions --depopts")
    return (f"{common} --recursive", f"{common} --with-test")


def _setup(platform: Platform) -> list[S.Op]:
    """The steps every job of `platform` starts with (see the module's docstring)."""
    ops: list[S.Op] = [*S.parse(base_stage(platform)).ops, S.UserIds(_UID, _UID), S.Workdir(_HOME),
                       *_CI_ENV]
    copy = S.Copy(src=(".",), dst=f"{REPOSITORY}/", exclude=(".git",))
    if platform.kind == "system":
        return [*ops, copy, S.Run(shell=(
            f"opam init --bare --no-setup --disable-sandboxing default {REPOSITORY}"
            " && opam switch create -y default ocaml-system"))]
    # The image's own repository goes first, so that no file of it survives in the copy.
    url = shlex.quote(f"file://{REPOSITORY}")
    return [*ops, S.Run(shell=f"rm -rf {REPOSITORY}"), copy,
            S.Run(shell=f"opam repository set-url default {url} && opam update default")]


def _install(package: str) -> list[S.Op]:
    """Pin `package` ("NAME.VERSION") at its version and reinstall it."""
    quoted = shlex.quote(package)
    version = shlex.quote(package.split(".", 1)[1])
    return [S.Run(shell=f"opam pin add -k version -yn {quoted} {version}"),
            S.Run(shell=f"opam reinstall -y {quoted}")]


def _spec(platform: Platform, ops: list[S.Op]) -> str:
    return S.to_sexp(S.Spec(from_=platform.image, ops=tuple(ops)))


def build_spec(platform: Platform, package: str, kind: BuildKind) -> str:
    """The spec text of the job `kind` of `package` ("NAME.VERSION") on `platform`: `build`,
    `test` or `lower-bounds`, as the module's docstring says. Raises ValueError for another
    kind; the text always parses with `pipeline.obuilder.spec.parse`."""
    ops = [*_setup(platform), *_install(package)]
    quoted = shlex.quote(package)
    if kind == "test":
        ops.append(S.Run(shell=f"opam reinstall -y --with-test --verbose {quoted}"))
    elif kind == "lower-bounds":
        ops += [S.Env(name, LOWER_BOUNDS_CRITERIA)
                for name in ("OPAMCRITERIA", "OPAMFIXUPCRITERIA", "OPAMUPGRADECRITERIA")]
        ops.append(S.Run(shell=f"opam reinstall -y {quoted}"))
    elif kind != "build":
        raise ValueError(f"unknown build kind {kind!r}; expected build, test or lower-bounds")
    return _spec(platform, ops)


def revdeps_spec(platform: Platform, package: str) -> str:
    """The spec text listing the reverse dependencies of `package` on `platform`: its log holds
    the union of `revdeps_commands`' listings, sorted, between two marker lines, for
    `parse_revdeps`. Stderr's warnings come before the first marker."""
    listing = " && ".join(revdeps_commands(package))
    return _spec(platform, [*_setup(platform), S.Run(shell=(
        f"{{ {listing}; }} > {_REVDEPS_FILE} && echo {shlex.quote(_REVDEPS_BEGIN)}"
        f" && sort -u {_REVDEPS_FILE} && echo {shlex.quote(_REVDEPS_END)}"))])


def parse_revdeps(output: str, package: str, exclude: Collection[str] = ()) -> list[str]:
    """The reverse dependencies in the log of a `revdeps_spec` build: "NAME.VERSION"s, sorted,
    without `package` itself and those in `exclude` (the pull request's other new packages).

    Only the command's output is read: the builder's own lines (ending with its mark, such as
    the step's header, which quotes the markers) are left out. Raises ValueError unless the
    output has exactly one listing, closed, of lines of the form NAME.VERSION.
    """
    mark = MARK.decode()
    lines = [line.rstrip("\r") for line in output.splitlines() if not line.endswith(mark)]
    begins = [i for i, line in enumerate(lines) if line == _REVDEPS_BEGIN]
    if len(begins) != 1:
        raise ValueError(f"expected one revdeps listing in the output, found {len(begins)}")
    try:
        end = lines.index(_REVDEPS_END, begins[0])
    except ValueError:
        raise ValueError("the revdeps listing is not closed (the command did not end)") from None
    found = lines[begins[0] + 1:end]
    if bad := [line for line in found if not _PACKAGE.fullmatch(line)]:
        raise ValueError(f"not a NAME.VERSION in the revdeps listing: {bad[0]!r}")
    return sorted(set(found) - {package} - set(exclude))


def revdep_spec(platform: Platform, package: str, revdep: str) -> str:
    """The spec text building the reverse dependency `revdep` ("NAME.VERSION") of `package`
    on `platform`: `package`'s `build` steps (it stays pinned at its version), then `revdep`
    reinstalled."""
    return _spec(platform, [*_setup(platform), *_install(package),
                            S.Run(shell=f"opam reinstall -y {shlex.quote(revdep)}")])
