"""OCaml CI's platform matrix: its names and architectures, `--platforms` (names, `all`, the
native default, usage errors), the one platform the lints run on, and where each platform's
builds go (its architecture, its cluster pool, its Debian index)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ocaml_fixtures import trixie_index
from test_ocaml_ci_reporting import ocaml_ci

from pipeline.ocaml import platforms as P
from pipeline.ocaml.analysis import Analysis, Dependency, OpamFile, to_json
from pipeline.primitives.git import Commit

EMULATED = ["debian-13-5.3_arm64", "debian-13-5.3_ppc64le", "debian-13-5.3_s390x",
            "debian-13-5.3_riscv64"]


def test_the_matrix_is_ocaml_cis_within_what_debian_offers() -> None:
    assert [(p.name, p.image, p.release, p.platform) for p in P.MATRIX] == [
        ("debian-12-4.13", "debian:12", "bookworm", "linux/amd64"),
        ("debian-13-5.3", "debian:13", "trixie", "linux/amd64"),
        ("debian-13-5.3_arm64", "debian:13", "trixie", "linux/arm64"),
        ("debian-13-5.3_ppc64le", "debian:13", "trixie", "linux/ppc64le"),
        ("debian-13-5.3_s390x", "debian:13", "trixie", "linux/s390x"),
        ("debian-13-5.3_riscv64", "debian:13", "trixie", "linux/riscv64"),
    ]
    assert {p.kind for p in P.MATRIX} == {"system"}
    # Debian's names of the architectures, as its indexes are named.
    assert [p.arch for p in P.MATRIX] == ["amd64", "amd64", "arm64", "ppc64el", "s390x",
                                          "riscv64"]
    # This host is amd64: the others are emulated, and not chosen unless asked for.
    assert [p.name for p in P.native()] == ["debian-12-4.13", "debian-13-5.3"]


def test_choose_takes_names_and_all() -> None:
    assert [p.name for p in P.choose("debian-13-5.3_arm64,debian-12-4.13")] == [
        "debian-13-5.3_arm64", "debian-12-4.13"]
    assert P.choose("all") == list(P.MATRIX)
    # Each once; the opam platform is not in the matrix, but can be named.
    assert [p.name for p in P.choose("debian-13-5.3,all,debian-12-ocaml-5.2")] == [
        "debian-13-5.3", "debian-12-4.13", *EMULATED, "debian-12-ocaml-5.2"]
    with pytest.raises(ValueError, match=r"^unknown platform 'debian-12-system', 'x'; known: "
                                         r"all, debian-12-4.13, debian-13-5.3, "):
        P.choose("debian-12-system,debian-13-5.3,x")


def test_the_lints_run_on_debian_13_natively_when_chosen() -> None:
    def lint(names: str) -> str | None:
        chosen = P.lint_platform(P.choose(names))
        return chosen.name if chosen is not None else None

    assert lint("all") == "debian-13-5.3"
    assert lint("debian-13-5.3_arm64,debian-13-5.3") == "debian-13-5.3"
    # Else the first built natively, else the first.
    assert lint("debian-13-5.3_arm64,debian-12-4.13") == "debian-12-4.13"
    assert lint("debian-13-5.3_riscv64,debian-13-5.3_arm64") == "debian-13-5.3_riscv64"
    assert P.lint_platform([]) is None


def _names(args: list[str]) -> list[str]:
    options = ocaml_ci.parse_args([*args, "--debian-mirror", "http://m/debian"])
    return [p.name for p in options.platform_list]


def test_platforms_option(tmp_path: Path) -> None:
    native = ["debian-12-4.13", "debian-13-5.3"]
    # The emulated ones are off by default, in the demo or not.
    assert _names(["--demo"]) == native
    assert _names(["--repo", str(tmp_path)]) == native
    assert _names(["--demo", "--platforms", "all"]) == [p.name for p in P.MATRIX]
    assert _names(["--repo", str(tmp_path), "--platforms", "debian-13-5.3_s390x"]) == [
        "debian-13-5.3_s390x"]


@pytest.mark.parametrize("platforms", ["debian-12-system", "all,nope", ""])
def test_an_unknown_platform_is_a_one_line_usage_error(
        platforms: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        ocaml_ci.parse_args(["--demo", "--platforms", platforms])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("ocaml_ci.py: error: unknown platform "), err


# Where each platform's jobs go

ANALYSIS = Analysis((OpamFile("hello.opam", "hello", (
    Dependency("ocaml"), Dependency("astring"), Dependency("alcotest", with_test=True))),),
    dune_project=True, ocamlformat_version="0.27.0")
ANALYSED = ocaml_ci.Analysed(Commit(repo="/r", hash="0" * 40, ref="refs/heads/main"),
                             to_json(ANALYSIS))


def _jobs(name: str, *, lints: bool = True, cluster: str | None = None) -> list[Any]:
    platform = P.PLATFORMS[name]
    return ocaml_ci.platform_jobs(ANALYSED, platform, "rsync:/s", None,
                                  debian=trixie_index(platform.arch), cluster=cluster,
                                  lints=lints)


def test_a_platform_without_the_lints_has_its_build_only() -> None:
    assert [job.kind for job in _jobs("debian-13-5.3")] == ["build", "opam", "fmt", "doc"]
    [build] = _jobs("debian-13-5.3_riscv64", lints=False)
    assert (build.kind, build.name, build.label) == (
        "build", "debian-13-5.3_riscv64", "debian-13-5.3_riscv64 build")


def test_each_platform_takes_its_packages_from_its_architectures_index() -> None:
    [amd64] = _jobs("debian-13-5.3", lints=False)
    [riscv64] = _jobs("debian-13-5.3_riscv64", lints=False)
    assert "astring -> libastring-ocaml-dev 0.8.5-2+b4" in amd64.debian
    assert "astring -> libastring-ocaml-dev 0.8.5-2+b5" in riscv64.debian
    # The same spec (the architecture is the builder's), but not the same job.
    assert amd64.spec == riscv64.spec
    assert ocaml_ci._job_digest(amd64) != ocaml_ci._job_digest(riscv64)


def test_a_platforms_builds_are_for_its_architecture_and_go_to_its_pool() -> None:
    for name, platform, pool in [("debian-13-5.3", "linux/amd64", "linux-x86_64"),
                                 ("debian-13-5.3_riscv64", "linux/riscv64", "linux-riscv64")]:
        [build] = _jobs(name, lints=False, cluster="tcp://127.0.0.1:8786")
        place = ocaml_ci._place(build)
        assert (place.platform, place.pool, place.cluster) == (
            platform, pool, "tcp://127.0.0.1:8786"), name
