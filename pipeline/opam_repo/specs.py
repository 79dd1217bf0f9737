"""The build specs of an opam repository's pull request: its packages built, tested and built
against their lowest dependencies, and their reverse dependencies listed and built."""

from __future__ import annotations

import shlex


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
