"""Platforms and the specs generated for them, against golden files read by eye.

To accept a change to the generated specs, rewrite the golden files and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_ocaml_specs.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from golden import assert_golden
from ocaml_fixtures import recorded_index, trixie_index
from test_ocaml_ci_reporting import ocaml_ci

from pipeline.obuilder import spec as S
from pipeline.ocaml.analysis import Analysis, Dependency, OpamFile, to_json
from pipeline.ocaml.platforms import (
    PLATFORMS,
    Platform,
    base_stage,
    build_spec,
    job_dependencies,
    lint_spec,
    reproduce_block,
)
from pipeline.primitives.git import Commit

EXPECTED = Path(__file__).parent / "expected" / "ocaml"
SYSTEM = PLATFORMS["debian-12-4.13"]
TRIXIE = PLATFORMS["debian-13-5.3"]
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
            Dependency("odoc", with_doc=True),
        )),
    ),
    dune_project=True,
    ocamlformat_version="0.26.1",
)


def _golden(name: str, actual: str) -> None:
    """Compare with the golden file, or rewrite it when UPDATE_GOLDEN=1."""
    assert_golden(EXPECTED / name, actual)


def test_platforms() -> None:
    assert Platform("debian-12-4.13", "debian:12", "system", "bookworm", "linux/amd64") == SYSTEM
    assert Platform("debian-13-5.3", "debian:13", "system", "trixie", "linux/amd64") == TRIXIE
    assert Platform("debian-12-ocaml-5.2", "ocaml/opam:debian-12-ocaml-5.2", "opam", "bookworm",
                    "linux/amd64") == OPAM
    assert all(name == p.name for name, p in PLATFORMS.items())


def test_another_architecture_has_the_same_specs() -> None:
    """The architecture is the builder's (`--platform`), not the spec's: trixie's specs are the
    same on each, and so is the text a job's key holds."""
    arm64 = PLATFORMS["debian-13-5.3_arm64"]
    assert (arm64.image, arm64.platform, arm64.arch) == ("debian:13", "linux/arm64", "arm64")
    assert _all_specs(arm64) == _all_specs(TRIXIE)


def test_job_dependencies_leave_out_the_projects_own_and_the_other_jobs() -> None:
    assert job_dependencies(ANALYSIS, "build") == [
        "alcotest", "cmdliner", "dune", "fmt", "ocaml", "ppx_deriving"]
    # The doc job needs odoc, not the test framework.
    assert job_dependencies(ANALYSIS, "doc") == [
        "cmdliner", "dune", "fmt", "ocaml", "odoc", "ppx_deriving"]


# What a system platform's caller resolves `job_dependencies` to (beyond the base packages).
SYSTEM_PACKAGES = {
    "build": ["libalcotest-ocaml-dev", "libcmdliner-ocaml-dev", "libfmt-ocaml-dev",
              "libppx-deriving-ocaml-dev"],
    "fmt": ["ocamlformat"],
    "doc": ["libcmdliner-ocaml-dev", "libfmt-ocaml-dev", "libppx-deriving-ocaml-dev",
            "ocaml-odoc"],
}


def _all_specs(platform: Platform) -> dict[str, str]:
    repository = "/home/opam/opam-repository" if platform.kind == "opam" else None
    packages = SYSTEM_PACKAGES if platform.kind == "system" else {}
    return {
        "base": base_stage(platform),
        "build": build_spec(platform, ANALYSIS, packages=packages.get("build", ()),
                            opam_repository=repository),
        **{f"lint-{kind}": lint_spec(platform, ANALYSIS, kind, packages=packages.get(kind, ()))
           for kind in ("opam", "fmt", "doc")},
    }


@pytest.mark.parametrize("platform", [SYSTEM, TRIXIE, OPAM], ids=lambda p: p.name)
def test_golden_specs(platform: Platform) -> None:
    for job, text in _all_specs(platform).items():
        _golden(f"{platform.name}-{job}.spec", text)


@pytest.mark.parametrize("platform", [SYSTEM, OPAM], ids=lambda p: p.name)
def test_specs_parse_are_canonical_and_deterministic(platform: Platform) -> None:
    first = _all_specs(platform)
    # A fresh but equal analysis: the text depends on content only.
    again = Analysis(tuple(ANALYSIS.opam_files), ANALYSIS.dune_project, "0.26.1")
    assert first == {job: text for job, text in _all_specs(platform).items()}
    assert build_spec(platform, again, packages=["x"]) == build_spec(platform, ANALYSIS,
                                                                      packages=["x"])
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
    system = S.parse(build_spec(SYSTEM, ANALYSIS, packages=SYSTEM_PACKAGES["build"])).ops
    apt = next(op for op in system if isinstance(op, S.Run) and "libfmt-ocaml-dev" in op.shell)
    assert system.index(copies[1]) < system.index(apt) < system.index(copies[2])


def test_system_build_installs_packages_as_root_and_builds_as_user() -> None:
    spec = S.parse(build_spec(SYSTEM, ANALYSIS, packages=["ocaml-nox", "libfmt-ocaml-dev"]))
    contexts = list(S.contexts(spec.ops))
    apt = [(op, ctx) for op, ctx in contexts
           if isinstance(op, S.Run) and "libfmt-ocaml-dev" in op.shell]
    assert len(apt) == 1
    op, ctx = apt[0]
    # Only what the base lacks.
    assert "install -y --no-install-recommends libfmt-ocaml-dev &&" in op.shell
    assert op.network == ("host",)
    assert ctx.user == S.ROOT
    build, build_ctx = contexts[-1]
    assert build == S.Run(shell="dune build @install @check @runtest")
    assert build_ctx.user == S.UserIds(1000, 1000)
    assert build_ctx.workdir == "/src"


def test_system_build_without_extra_packages_has_no_apt_step() -> None:
    only_base = Analysis((OpamFile("x.opam", "x", (Dependency("ocaml"),)),), True, None)
    spec = S.parse(build_spec(SYSTEM, only_base, packages=["ocaml-nox"]))
    base = S.parse(base_stage(SYSTEM))
    assert not any(isinstance(op, S.Run) and "apt-get" in op.shell
                   for op in spec.ops[len(base.ops):])


def test_different_analyses_give_different_specs() -> None:
    fewer = Analysis(ANALYSIS.opam_files[1:], True, None)
    assert build_spec(SYSTEM, fewer, packages=["x"]) != build_spec(SYSTEM, ANALYSIS,
                                                                    packages=["x"])
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
    text = build_spec(SYSTEM, ANALYSIS, packages=SYSTEM_PACKAGES["build"])
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
    # A platform's builds are for its architecture: so is the command reproducing one.
    arm64 = reproduce_block(text, platform="linux/arm64")
    assert arm64.endswith(" --store rsync:/tmp/store --platform linux/arm64\n")


def test_reproduce_block_marker_never_ends_the_spec_early() -> None:
    text = '((from busybox)\n (run (shell "cat <<END-OF-SPEC\nEND-OF-SPEC\n")))\n'
    block = reproduce_block(text)
    assert "<<'END-OF-SPEC-'\n" in block
    assert text.rstrip("\n") + "\nEND-OF-SPEC-\n" in block


def test_opam_platform_doc_job_asks_opam_for_doc_deps_and_build_for_test_deps() -> None:
    doc = [op.shell for op in S.parse(lint_spec(OPAM, ANALYSIS, "doc")).ops
           if isinstance(op, S.Run)]
    assert "opam install --deps-only --with-doc -y ./ ./bin/" in doc
    assert not any("--with-test" in shell for shell in doc)
    build = S.parse(build_spec(OPAM, ANALYSIS)).ops
    assert not any(isinstance(op, S.Run) and "--with-doc" in op.shell for op in build)


# The jobs a system platform makes, with the recorded bookworm index

INDEX = recorded_index()


def _jobs(analysis: Analysis) -> dict[str, Any]:
    analysed = ocaml_ci.Analysed(
        Commit(repo="/r", hash="0" * 40, ref="refs/heads/main"), to_json(analysis))
    return {job.kind: job for job in ocaml_ci.platform_jobs(
        analysed, SYSTEM, "rsync:/s", None, debian=INDEX)}


def _apt(spec: str | None) -> str:
    assert spec is not None
    base = len(S.parse(base_stage(SYSTEM)).ops)
    [apt] = [op.shell for op in S.parse(spec).ops[base:]
             if isinstance(op, S.Run) and "apt-get" in op.shell]
    return apt


def test_system_build_installs_test_deps_but_no_doc_deps() -> None:
    apt = _apt(_jobs(ANALYSIS)["build"].spec)
    assert "libalcotest-ocaml-dev" in apt and "libcmdliner-ocaml-dev" in apt
    assert "odoc" not in apt


def test_system_doc_installs_doc_deps_and_odoc_but_no_test_deps() -> None:
    doc = _jobs(ANALYSIS)["doc"]
    assert doc.skip is None
    apt = _apt(doc.spec)
    assert "ocaml-odoc" in apt and "libodoc-ocaml-dev" in apt and "libfmt-ocaml-dev" in apt
    assert "alcotest" not in apt
    assert "odoc -> ocaml-odoc 2.1.1+dfsg-2" in doc.debian
    assert "alcotest -> libalcotest-ocaml-dev 1.6.0-1+b1" in _jobs(ANALYSIS)["build"].debian


def test_lint_opam_installs_nothing() -> None:
    spec = S.parse(_jobs(ANALYSIS)["opam"].spec or "")
    assert not any(isinstance(op, S.Run) and "apt-get" in op.shell
                   for op in spec.ops[len(S.parse(base_stage(SYSTEM)).ops):])


def test_a_dependency_debian_lacks_skips_with_its_opam_name() -> None:
    lacking = Analysis((OpamFile("x.opam", "x", (
        Dependency("alcotest"), Dependency("nosuchlibrary"), Dependency("odoc", with_doc=True),
    )),), True, None)
    jobs = _jobs(lacking)
    assert jobs["build"].spec is None
    assert jobs["build"].skip == "no Debian package in bookworm for the dependency 'nosuchlibrary'"
    assert "nosuchlibrary -> no Debian package" in jobs["build"].debian
    assert "nosuchlibrary" in (jobs["doc"].skip or "")


def test_bookworm_has_no_ocamlformat_so_lint_fmt_skips() -> None:
    jobs = _jobs(ANALYSIS)
    assert jobs["fmt"].spec is None
    assert jobs["fmt"].skip == \
        "Debian 12 (bookworm) has no ocamlformat (.ocamlformat asks for 0.26.1)"
    no_file = dataclasses.replace(ANALYSIS, ocamlformat_version=None)
    assert _jobs(no_file)["fmt"].skip == "no .ocamlformat file"


@pytest.mark.parametrize(("wanted", "skip"), [
    ("0.27.0", None),
    ("0.26.2", ".ocamlformat asks for ocamlformat 0.26.2; Debian 13 (trixie) has 0.27.0"),
])
def test_lint_fmt_runs_only_with_the_version_debian_has(wanted: str, skip: str | None) -> None:
    analysed = ocaml_ci.Analysed(Commit(repo="/r", hash="0" * 40, ref="refs/heads/main"),
                                 to_json(dataclasses.replace(ANALYSIS,
                                                             ocamlformat_version=wanted)))
    fmt = {job.kind: job for job in ocaml_ci.platform_jobs(
        analysed, TRIXIE, "rsync:/s", None, debian=trixie_index("amd64"))}["fmt"]
    assert fmt.skip == skip
    assert fmt.debian == ("ocamlformat -> ocamlformat 0.27.0-1+b6",)
    if skip is None:
        assert "ocamlformat" in _apt(fmt.spec)
        assert S.parse(fmt.spec or "").ops[-1] == S.Run(shell="dune build @fmt")
    else:
        assert fmt.spec is None


# With --cluster: the pool and cache hint of each job; nothing changes without it

def test_a_platforms_pool_is_named_for_its_architecture() -> None:
    assert {p.name: p.pool for p in PLATFORMS.values()} == {
        "debian-12-4.13": "linux-x86_64", "debian-13-5.3": "linux-x86_64",
        "debian-13-5.3_arm64": "linux-arm64", "debian-13-5.3_ppc64le": "linux-ppc64le",
        "debian-13-5.3_s390x": "linux-s390x", "debian-13-5.3_riscv64": "linux-riscv64",
        "debian-12-ocaml-5.2": "linux-x86_64"}


def _cluster_jobs(analysis: Analysis, platform: Any, repo: str = "/r") -> list[Any]:
    analysed = ocaml_ci.Analysed(Commit(repo=repo, hash="0" * 40, ref="refs/heads/main"),
                                 to_json(analysis))
    return ocaml_ci.platform_jobs(analysed, platform, "rsync:/s", None, debian=INDEX,
                                  cluster="tcp://127.0.0.1:8786")


def test_with_a_cluster_every_job_of_a_platform_has_its_cache_hint() -> None:
    jobs = _cluster_jobs(ANALYSIS, SYSTEM)
    assert {job.cluster for job in jobs} == {"tcp://127.0.0.1:8786"}
    [hint] = {job.cache_hint for job in jobs}
    assert hint == ocaml_ci.cache_hint("/r", SYSTEM, ANALYSIS)
    # Another repository, platform or dependency list is another hint.
    fewer = dataclasses.replace(ANALYSIS, opam_files=ANALYSIS.opam_files[1:])
    assert job_dependencies(fewer, "build") != job_dependencies(ANALYSIS, "build")
    others = {_cluster_jobs(ANALYSIS, SYSTEM, repo="/other")[0].cache_hint,
              _cluster_jobs(ANALYSIS, OPAM)[0].cache_hint,
              _cluster_jobs(fewer, SYSTEM)[0].cache_hint}
    assert hint not in others and len(others) == 3


def test_the_cluster_is_not_part_of_a_jobs_key() -> None:
    in_process = {job.kind: job for job in ocaml_ci.platform_jobs(
        ocaml_ci.Analysed(Commit(repo="/r", hash="0" * 40, ref="refs/heads/main"),
                          to_json(ANALYSIS)), SYSTEM, "rsync:/s", None, debian=INDEX)}
    assert all(job.cluster is None and job.cache_hint is None for job in in_process.values())
    for job in _cluster_jobs(ANALYSIS, SYSTEM):
        assert ocaml_ci._job_digest(job) == ocaml_ci._job_digest(in_process[job.kind])


def test_the_cluster_option_is_read(tmp_path: Path) -> None:
    options = ocaml_ci.parse_args(["--repo", str(tmp_path), "--debian-mirror", "http://m/d",
                                   "--cluster", "tcp://127.0.0.1:8786"])
    assert options.cluster == "tcp://127.0.0.1:8786"
    assert ocaml_ci.parse_args(["--repo", str(tmp_path), "--debian-mirror",
                                "http://m/d"]).cluster is None
