"""The opam repository's build specs built for real on the system platform (Debian 12's OCaml,
dune and opam) with the builder, on the session's store (`ocaml_store`), in checkouts of the
generated sample repository's demo branches (each a fast-forward of the base, so its tree is the
merged repository).

The jobs of `greet.1.1` share their first steps, so after the first build the others only run
their own last steps: the module takes about 30 s beyond the session's store (most of it the
base stage's apt-get).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from ocaml_fixtures import HANG_GUARD, PIPELINE

from pipeline.ocaml.platforms import PLATFORMS
from pipeline.opam_repo import sample
from pipeline.opam_repo.specs import build_spec, parse_revdeps, revdep_spec, revdeps_spec

SYSTEM = PLATFORMS["debian-12-4.13"]
PACKAGE = sample.NEW_RELEASE.package


@dataclass(frozen=True)
class Built:
    """A finished build: whether it succeeded, and its log (with the builder's own lines)."""

    ok: bool
    log: str

    @property
    def last_step(self) -> str:
        """The log from the last step's header on (the builder's closing error line quotes the
        header, but not at the start of a line)."""
        return self.log[self.log.rindex("\n/home/opam: (run"):]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files of each demo branch (its merge into the base), without .git, by branch."""
    root = tmp_path_factory.mktemp("opam-repo-builds")
    repo = sample.make_demo(root / "repository")
    found = {}
    for branch in ("new-release", "build-failure"):
        (root / branch).mkdir()
        subprocess.run(["git", "archive", f"--output={root / branch}.tar", branch], cwd=repo,
                       check=True)
        subprocess.run(["tar", "-xf", f"{root / branch}.tar", "-C", str(root / branch)],
                       check=True)
        found[branch] = root / branch
    return found


def build(store: str, spec: str, context: Path) -> Built:
    """Build `spec` (text) with `context` on `store` with the builder's command."""
    spec_file = context.parent / f"{context.name}.spec"
    spec_file.write_text(spec)
    done = subprocess.run([str(PIPELINE), "obuilder", "build", "-f", str(spec_file),
                           str(context), "--store", store],
                          capture_output=True, text=True, timeout=HANG_GUARD)
    return Built(done.returncode == 0, done.stdout + done.stderr)


def succeeded(store: str, spec: str, context: Path) -> Built:
    """`build`, which must succeed."""
    built = build(store, spec, context)
    assert built.ok, built.log
    return built


def test_the_new_release_builds_with_the_latest_dependencies(
        ocaml_store: str, contexts: dict[str, Path]) -> None:
    built = succeeded(ocaml_store, build_spec(SYSTEM, PACKAGE, "build"), contexts["new-release"])
    step = built.last_step
    assert "-> installed greet.1.1" in step, step
    assert "-> installed strutil.1.1" in step, step
    # The switch is on Debian's compiler, from the sample's ocaml-system package.
    assert "-> installed ocaml-system.4.13.1" in built.log


def test_the_tests_run_after_the_shared_build(ocaml_store: str,
                                              contexts: dict[str, Path]) -> None:
    built = succeeded(ocaml_store, build_spec(SYSTEM, PACKAGE, "test"), contexts["new-release"])
    step = built.last_step
    # The test dependency is installed and the tests' own output is in the log.
    assert "-> installed testkit.1.0" in step, step
    for check in ("greet", "capitalized", "all"):
        assert f"testkit: ok {check}" in step, step
    assert "testkit: FAILED" not in built.log


def test_lower_bounds_picks_the_oldest_dependency(ocaml_store: str,
                                                  contexts: dict[str, Path]) -> None:
    step = succeeded(ocaml_store, build_spec(SYSTEM, PACKAGE, "lower-bounds"),
                     contexts["new-release"]).last_step
    assert "downgrade strutil 1.1 to 1.0" in step, step
    assert "-> installed strutil.1.0" in step and "-> installed greet.1.1" in step, step


def test_the_revdeps_listing_finds_the_app_and_not_the_package(
        ocaml_store: str, contexts: dict[str, Path]) -> None:
    built = succeeded(ocaml_store, revdeps_spec(SYSTEM, PACKAGE), contexts["new-release"])
    assert parse_revdeps(built.log, PACKAGE) == ["hello.1.0"]
    # opam lists the package itself, which the reading leaves out.
    assert PACKAGE in parse_revdeps(built.log, "hello.1.0")


def test_the_revdep_builds_on_the_new_release(ocaml_store: str,
                                              contexts: dict[str, Path]) -> None:
    step = succeeded(ocaml_store, revdep_spec(SYSTEM, PACKAGE, "hello.1.0"),
                     contexts["new-release"]).last_step
    assert "-> installed hello.1.0" in step, step
    # The package stays at its version (pinned): nothing else changes.
    assert "greet" not in step, step


def test_a_source_that_does_not_compile_fails_with_the_compilers_error(
        ocaml_store: str, contexts: dict[str, Path]) -> None:
    package = sample.BUILD_FAILURE.package
    built = build(ocaml_store, build_spec(SYSTEM, package, "build"), contexts["build-failure"])
    assert not built.ok, built.log
    step = built.last_step
    assert f"The compilation of {package} failed" in step, step
    assert 'File "bin/wordcount.ml", line 1' in step, step
    assert "Error: This expression has type int but an expression was expected of type" in step
