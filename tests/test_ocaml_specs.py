"""Platforms and the specs generated for them, against golden files read by eye.

To accept a change to the generated specs, rewrite the golden files and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_ocaml_specs.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import assert_golden

from pipeline.obuilder import spec as S
from pipeline.ocaml.analysis import Analysis, Dependency, OpamFile
from pipeline.ocaml.platforms import (
    BASE_PACKAGES,
    PLATFORMS,
    Platform,
    base_stage,
    build_spec,
    debian_package,
    lint_spec,
    reproduce_block,
    system_packages,
)

EXPECTED = Path(__file__).parent / "expected" / "ocaml"
SYSTEM = PLATFORMS["debian-12-system"]
OPAM = PLATFORMS["debian-12-ocaml-5.2"]

# A project of two packages, one nested, where `hello-bin` depends on its sibling `hello`.
ANALYSIS = Analysis(
    opam_files=(
        OpamFile("bin/hello-bin.opam", "hello-bin", (Dependency("hello"), Dependency("cmdliner"))),
        OpamFile("hello.opam", "hello", (
            Dependency("ocaml"),
            Dependency("dune", build=True),
            Dependency("fmt"),
            Dependency("ppx_deriving", build=True),
            Dependency("alcotest", with_test=True),
        )),
    ),
    dune_project=True,
    ocamlformat_version="0.26.1",
)


def _golden(name: str, actual: str) -> None:
    """Compare with the golden file, or rewrite it when UPDATE_GOLDEN=1."""
    assert_golden(EXPECTED / name, actual)


def test_platforms() -> None:
    assert Platform("debian-12-system", "debian:12", "system") == SYSTEM
    assert Platform("debian-12-ocaml-5.2", "ocaml/opam:debian-12-ocaml-5.2", "opam") == OPAM
    assert all(name == p.name for name, p in PLATFORMS.items())


@pytest.mark.parametrize(("dep", "package"), [
    ("ocaml", "ocaml-nox"),
    ("dune", "ocaml-dune"),
    ("ocamlfind", "ocaml-findlib"),
    ("alcotest", "libalcotest-ocaml-dev"),
    ("ppx_deriving", "libppx-deriving-ocaml-dev"),
    ("base-unix", "ocaml-nox"),
])
def test_debian_package(dep: str, package: str) -> None:
    assert debian_package(dep) == package


def test_system_packages_cover_all_deps_but_the_projects_own() -> None:
    assert system_packages(ANALYSIS) == sorted({
        *BASE_PACKAGES, "libcmdliner-ocaml-dev", "libfmt-ocaml-dev",
        "libppx-deriving-ocaml-dev", "libalcotest-ocaml-dev",
    })
    assert "libhello-ocaml-dev" not in system_packages(ANALYSIS)
    assert {"ocaml-nox", "ocaml-dune", "opam"} <= set(system_packages(ANALYSIS))


def _all_specs(platform: Platform) -> dict[str, str]:
    repository = "/home/opam/opam-repository" if platform.kind == "opam" else None
    return {
        "base": base_stage(platform),
        "build": build_spec(platform, ANALYSIS, opam_repository=repository),
        **{f"lint-{kind}": lint_spec(platform, ANALYSIS, kind) for kind in ("opam", "fmt", "doc")},
    }


@pytest.mark.parametrize("platform", [SYSTEM, OPAM], ids=lambda p: p.name)
def test_golden_specs(platform: Platform) -> None:
    for job, text in _all_specs(platform).items():
        _golden(f"{platform.name}-{job}.spec", text)


@pytest.mark.parametrize("platform", [SYSTEM, OPAM], ids=lambda p: p.name)
def test_specs_parse_are_canonical_and_deterministic(platform: Platform) -> None:
    first = _all_specs(platform)
    # A fresh but equal analysis: the text depends on content only.
    again = Analysis(tuple(ANALYSIS.opam_files), ANALYSIS.dune_project, "0.26.1")
    assert first == {job: text for job, text in _all_specs(platform).items()}
    assert build_spec(platform, again) == build_spec(platform, ANALYSIS)
    for job, text in first.items():
        parsed = S.parse(text, filename=job)
        assert S.to_sexp(parsed) == text


@pytest.mark.parametrize("platform", [SYSTEM, OPAM], ids=lambda p: p.name)
def test_every_spec_starts_with_the_base_stage(platform: Platform) -> None:
    """Sharing the base's steps is what makes the store build them once for every project."""
    base = S.parse(base_stage(platform))
    for job, text in _all_specs(platform).items():
        spec = S.parse(text)
        assert spec.from_ == platform.image, job
        assert spec.ops[: len(base.ops)] == base.ops, job


def test_build_copies_opam_files_before_installing_and_source_after() -> None:
    spec = S.parse(build_spec(OPAM, ANALYSIS))
    copies = [op for op in spec.ops if isinstance(op, S.Copy)]
    assert copies == [
        S.Copy(src=("hello.opam",), dst="/src/"),
        S.Copy(src=("bin/hello-bin.opam",), dst="/src/bin/"),
        S.Copy(src=(".",), dst="/src/", exclude=(".git", "_build", "_opam")),
    ]
    runs = [op.shell for op in spec.ops if isinstance(op, S.Run)]
    assert runs == [
        "opam install --deps-only --with-test -y ./ ./bin/",
        "opam exec -- dune build @install @check @runtest",
    ]
    install = spec.ops.index(next(op for op in spec.ops if isinstance(op, S.Run)))
    assert spec.ops.index(copies[1]) < install < spec.ops.index(copies[2])
    system = S.parse(build_spec(SYSTEM, ANALYSIS)).ops
    apt = next(op for op in system if isinstance(op, S.Run) and "libfmt-ocaml-dev" in op.shell)
    assert system.index(copies[1]) < system.index(apt) < system.index(copies[2])


def test_system_build_installs_packages_as_root_and_builds_as_user() -> None:
    spec = S.parse(build_spec(SYSTEM, ANALYSIS, packages=["ocaml-nox", "libfmt-ocaml-dev"]))
    contexts = list(S.contexts(spec.ops))
    apt = [(op, ctx) for op, ctx in contexts
           if isinstance(op, S.Run) and "libfmt-ocaml-dev" in op.shell]
    assert len(apt) == 1
    op, ctx = apt[0]
    # Only what the base lacks, from the `packages` given rather than the analysis.
    assert "install -y --no-install-recommends libfmt-ocaml-dev &&" in op.shell
    assert op.network == ("host",)
    assert ctx.user == S.ROOT
    build, build_ctx = contexts[-1]
    assert build == S.Run(shell="dune build @install @check @runtest")
    assert build_ctx.user == S.UserIds(1000, 1000)
    assert build_ctx.workdir == "/src"


def test_system_build_without_extra_packages_has_no_apt_step() -> None:
    only_base = Analysis((OpamFile("x.opam", "x", (Dependency("ocaml"),)),), True, None)
    spec = S.parse(build_spec(SYSTEM, only_base))
    base = S.parse(base_stage(SYSTEM))
    assert not any(isinstance(op, S.Run) and "apt-get" in op.shell
                   for op in spec.ops[len(base.ops):])


def test_different_analyses_give_different_specs() -> None:
    fewer = Analysis(ANALYSIS.opam_files[1:], True, None)
    assert build_spec(SYSTEM, fewer) != build_spec(SYSTEM, ANALYSIS)
    assert build_spec(OPAM, fewer) != build_spec(OPAM, ANALYSIS)


def test_opam_repository_is_set_before_the_project_files() -> None:
    spec = S.parse(build_spec(OPAM, ANALYSIS, opam_repository="/srv/repo"))
    assert spec.ops[1] == S.Run(
        shell="opam repository set-url default file:///srv/repo && opam update default")
    # Before the workdir: a command run in a missing /src would make it root's.
    assert spec.ops[2] == S.Workdir("/src")
    assert isinstance(spec.ops[3], S.Copy)


def test_lint_specs_run_their_command_last() -> None:
    assert S.parse(lint_spec(SYSTEM, ANALYSIS, "opam")).ops[-1] == S.Run(
        shell="opam lint bin/hello-bin.opam hello.opam")
    assert S.parse(lint_spec(SYSTEM, ANALYSIS, "fmt")).ops[-1] == S.Run(shell="dune build @fmt")
    assert S.parse(lint_spec(OPAM, ANALYSIS, "doc")).ops[-1] == S.Run(
        shell="opam exec -- dune build @doc")
    fmt = S.parse(lint_spec(OPAM, ANALYSIS, "fmt"))
    assert S.Run(shell="opam install -y ocamlformat=0.26.1", network=("host",)) in fmt.ops


def test_lint_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown lint kind 'style'"):
        lint_spec(SYSTEM, ANALYSIS, "style")  # type: ignore[arg-type]


def test_reproduce_block_holds_the_spec_and_the_command() -> None:
    text = build_spec(SYSTEM, ANALYSIS)
    block = reproduce_block(text, store="overlayfs:/var/tmp/my store")
    assert block.startswith("To reproduce locally")
    _, _, rest = block.partition("cat > build.spec <<'END-OF-SPEC'\n")
    spec, _, tail = rest.partition("\nEND-OF-SPEC\n")
    assert spec + "\n" == text
    assert tail == (
        "mkdir -p '/var/tmp/my store'\n"
        "pipeline obuilder build -f build.spec . --store 'overlayfs:/var/tmp/my store'\n")
    default = reproduce_block(text)
    assert default.endswith("pipeline obuilder build -f build.spec . --store rsync:/tmp/store\n")


def test_reproduce_block_marker_never_ends_the_spec_early() -> None:
    text = '((from busybox)\n (run (shell "cat <<END-OF-SPEC\nEND-OF-SPEC\n")))\n'
    block = reproduce_block(text)
    assert "<<'END-OF-SPEC-'\n" in block
    assert text.rstrip("\n") + "\nEND-OF-SPEC-\n" in block
