"""The build specs of an opam repository's pull requests, against golden files read by eye
(`golden.py` says how to accept a change), and the reading of the revdeps listing from a
build's log."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import assert_golden

from pipeline.obuilder import spec as S
from pipeline.obuilder.log_format import MARK
from pipeline.ocaml.platforms import PLATFORMS, Platform, base_stage
from pipeline.opam_repo import specs

EXPECTED = Path(__file__).parent / "expected" / "opam-repo-ci"
SYSTEM = PLATFORMS["debian-12-4.13"]
OPAM = PLATFORMS["debian-12-ocaml-5.2"]
BOTH = pytest.mark.parametrize("platform", [SYSTEM, OPAM], ids=lambda p: p.name)


def _all_specs(platform: Platform, package: str = "greet.1.1") -> dict[str, str]:
    return {
        **{kind: specs.build_spec(platform, package, kind)
           for kind in ("build", "test", "lower-bounds")},
        "revdeps": specs.revdeps_spec(platform, package),
        "revdep": specs.revdep_spec(platform, package, "hello.1.0"),
    }


def _ops(text: str) -> tuple[S.Op, ...]:
    return S.parse(text).ops


@BOTH
def test_golden_specs(platform: Platform) -> None:
    for job, text in _all_specs(platform).items():
        assert_golden(EXPECTED / f"{platform.name}-{job}.spec", text)


@BOTH
def test_specs_parse_are_canonical_and_deterministic(platform: Platform) -> None:
    first = _all_specs(platform)
    assert first == _all_specs(platform)
    for job, text in first.items():
        assert S.to_sexp(S.parse(text, filename=job)) == text
    # Another package is another spec, for every job.
    other = _all_specs(platform, "greet.2.0")
    assert all(other[job] != first[job] for job in first)


@BOTH
def test_every_job_starts_with_the_base_stage_and_the_builds_with_the_build(
        platform: Platform) -> None:
    """Shared first steps are what lets the store build them once: the base for every pull
    request, the build's steps for the package's other jobs."""
    base = _ops(base_stage(platform))
    build = _ops(specs.build_spec(platform, "greet.1.1", "build"))
    for job, text in _all_specs(platform).items():
        ops = _ops(text)
        assert S.parse(text).from_ == platform.image, job
        assert ops[: len(base)] == base, job
        if job != "revdeps":
            assert ops[: len(build)] == build, job
    # The listing needs only the repository: it shares the steps before the package's pin.
    revdeps = _ops(specs.revdeps_spec(platform, "greet.1.1"))
    pin = next(i for i, op in enumerate(build) if isinstance(op, S.Run) and "pin" in op.shell)
    assert revdeps[:pin] == build[:pin]


@BOTH
def test_no_step_after_the_base_has_network(platform: Platform) -> None:
    base = len(_ops(base_stage(platform)))
    for job, text in _all_specs(platform).items():
        assert not [op for op in _ops(text)[base:] if isinstance(op, S.Run) and op.network], job


@BOTH
def test_the_merged_repository_is_copied_without_git_and_opam_uses_it(
        platform: Platform) -> None:
    ops = _ops(specs.build_spec(platform, "greet.1.1", "build"))
    [copy] = [op for op in ops if isinstance(op, S.Copy)]
    assert copy == S.Copy(src=(".",), dst=f"{specs.REPOSITORY}/", exclude=(".git",))
    after = [op.shell for op in ops[ops.index(copy) + 1:] if isinstance(op, S.Run)]
    if platform.kind == "system":
        # A fresh opam root on the copy, its switch on Debian's compiler.
        assert after[0].startswith(f"opam init --bare --no-setup --disable-sandboxing default "
                                   f"{specs.REPOSITORY} && ")
        assert after[0].endswith("opam switch create -y default ocaml-system")
    else:
        # The image's own repository is removed first, so that none of its files survive.
        before = [op.shell for op in ops[: ops.index(copy)] if isinstance(op, S.Run)]
        assert before == [f"rm -rf {specs.REPOSITORY}"]
        assert after[0] == (f"opam repository set-url default file://{specs.REPOSITORY}"
                            " && opam update default")


def test_each_kind_pins_the_package_and_adds_its_own_last_step() -> None:
    runs = {kind: [op.shell for op in _ops(text) if isinstance(op, S.Run)]
            for kind, text in _all_specs(SYSTEM).items()}
    assert runs["build"][-2:] == ["opam pin add -k version -yn greet.1.1 1.1",
                                  "opam reinstall -y greet.1.1"]
    assert runs["test"][-1] == "opam reinstall -y --with-test --verbose greet.1.1"
    assert runs["revdep"][-1] == "opam reinstall -y hello.1.0"
    assert runs["lower-bounds"][-1] == "opam reinstall -y greet.1.1"
    for command in specs.revdeps_commands("greet.1.1"):
        assert command in runs["revdeps"][-1]


def test_lower_bounds_sets_the_criteria_only_for_its_last_step() -> None:
    contexts = list(S.contexts(_ops(specs.build_spec(SYSTEM, "greet.1.1", "lower-bounds"))))
    criteria = {name: specs.LOWER_BOUNDS_CRITERIA
                for name in ("OPAMCRITERIA", "OPAMFIXUPCRITERIA", "OPAMUPGRADECRITERIA")}
    last_op, last = contexts[-1]
    assert isinstance(last_op, S.Run)
    assert criteria.items() <= dict(last.env).items()
    runs = [ctx for op, ctx in contexts[:-1] if isinstance(op, S.Run)]
    assert not any(name in dict(ctx.env) for ctx in runs for name in criteria)
    assert specs.LOWER_BOUNDS_CRITERIA == "+removed,+count[version-lag,solution]"


def test_the_jobs_run_as_the_opam_user_with_ci_settings() -> None:
    base = len(_ops(base_stage(SYSTEM)))
    contexts = list(S.contexts(_ops(specs.build_spec(SYSTEM, "greet.1.1", "test"))))
    for op, ctx in contexts[base:]:
        if isinstance(op, S.Run):
            assert ctx.user == S.UserIds(1000, 1000) and ctx.workdir == "/home/opam"
            # The whole log of a failed build, as opam-repo-ci shows it.
            assert dict(ctx.env)["OPAMERRLOGLEN"] == "0"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown build kind 'docs'"):
        specs.build_spec(SYSTEM, "greet.1.1", "docs")  # type: ignore[arg-type]


def test_package_names_are_quoted_for_the_shell() -> None:
    runs = [op.shell for op in _ops(specs.revdep_spec(SYSTEM, "a.1.0", "b.1.0~beta;x"))
            if isinstance(op, S.Run)]
    assert runs[-1] == "opam reinstall -y 'b.1.0~beta;x'"


# specs.parse_revdeps: the listing between the markers, the builder's own lines left out

_M = MARK.decode()


def _log(*listing: str, header: bool = True) -> str:
    """A build log as the builder writes it around a revdeps listing."""
    spec = specs.revdeps_spec(SYSTEM, "greet.1.1")
    shell = [op.shell for op in _ops(spec) if isinstance(op, S.Run)][-1]
    lines = [f"/home/opam: (run (shell {shell!r})){_M}"] if header else []
    lines += ["[WARNING] a warning opam printed on stderr", *listing,
              f'---> saved as "{"0" * 64}"{_M}']
    return "\n".join(lines) + "\n"


BEGIN, END = "@@@ revdeps begin @@@", "@@@ revdeps end @@@"


def test_the_revdeps_are_read_sorted_without_the_package_and_the_excluded() -> None:
    log = _log(BEGIN, "greet.1.1", "hello.1.0", "app.2.0", "new-pkg.0.1", END)
    assert specs.parse_revdeps(log, "greet.1.1") == ["app.2.0", "hello.1.0", "new-pkg.0.1"]
    assert specs.parse_revdeps(log, "greet.1.1", exclude={"new-pkg.0.1"}) == [
        "app.2.0", "hello.1.0"]
    assert specs.parse_revdeps(log, "hello.1.0") == ["app.2.0", "greet.1.1", "new-pkg.0.1"]


def test_an_empty_listing_is_no_revdeps() -> None:
    assert specs.parse_revdeps(_log(BEGIN, END), "greet.1.1") == []


def test_the_builders_lines_quoting_the_markers_are_not_the_listing() -> None:
    # A header line made only of a marker (as a long header wrapped could be) is still ignored.
    log = f"{BEGIN}{_M}\nnot.a-revdep\n{END}{_M}\n" + _log(BEGIN, "hello.1.0", END)
    assert specs.parse_revdeps(log, "greet.1.1") == ["hello.1.0"]


@pytest.mark.parametrize(("log", "error"), [
    (_log("hello.1.0"), "expected one revdeps listing in the output, found 0"),
    (_log(BEGIN, "hello.1.0", END, BEGIN, END), "found 2"),
    (_log(BEGIN, "hello.1.0"), "not closed"),
    (_log(BEGIN, "[ERROR] No package named greet", END), "not a NAME.VERSION"),
    (_log(BEGIN, "hello", END), "not a NAME.VERSION in the revdeps listing: 'hello'"),
], ids=["no-listing", "two-listings", "unclosed", "an-error", "no-version"])
def test_a_log_without_one_clean_listing_is_an_error(log: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        specs.parse_revdeps(log, "greet.1.1")
