"""The analysis of OCaml projects: the opam file parser and the search of a checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.ocaml.analysis import (
    Analysis,
    AnalysisError,
    Dependency,
    OpamFile,
    analyse,
    from_json,
    parse_opam,
    to_json,
)

REAL_LOOKING = '''\
opam-version: "2.0"
synopsis: "A library"   # a comment running to the end of the line
description: """
A description over
several lines, with "quotes" inside.
"""
maintainer: ["someone@example.com"]
(* a comment (* nested *) over
   two lines *)
depends: [
  "ocaml" {>= "4.08"}
  "dune" {>= "3.0" & build}
  "alcotest" {>= "1.5.0" & with-test}
  "fmt" {with-test}
  ("lwt" | "async")
  "yojson" {>= "2.0" & < "3.0"}
  "ppx_deriving" {build & !with-test}
  "odoc" {with-doc}
]
depopts: ["ssl" "tls"]
build: [
  ["dune" "subst"] {dev}
  ["dune" "build" "-p" name "-j" jobs "@install" "@runtest" {with-test}]
]
available: os != "win32" & !(os-distribution = "alpine")
url {
  src: "https://example.com/a.tbz"
  checksum: ["sha256=00"]
}
extra-source "patch.diff" { src: "file:///p" }
x-ci-accept-failures: ["debian-12"]
'''


def test_parse_opam_reads_depends_with_filters() -> None:
    parsed = parse_opam(REAL_LOOKING, path="lib/mylib.opam")
    assert parsed == OpamFile(
        path="lib/mylib.opam",
        name="mylib",
        depends=(
            Dependency("ocaml"),
            Dependency("dune", build=True),
            Dependency("alcotest", with_test=True),
            Dependency("fmt", with_test=True),
            # Of an alternative, the first package only.
            Dependency("lwt"),
            Dependency("yojson"),
            # A negated variable does not make the dependency test-only.
            Dependency("ppx_deriving", build=True),
            Dependency("odoc", with_doc=True),
        ),
    )


def test_a_repeated_dependency_is_test_only_if_every_mention_is() -> None:
    text = '''depends: [
      "ocaml" {>= "4.08"} "ocaml" {< "5.0" & with-test}
      "alcotest" {with-test} "alcotest" {>= "1.0" & with-test}
    ]'''
    assert parse_opam(text, path="a.opam").depends == (
        Dependency("ocaml"), Dependency("alcotest", with_test=True))


def test_strings_escapes_and_single_element_depends() -> None:
    text = 'description: "line one\\n\\\n    continued \\"quoted\\" \\065"\ndepends: "fmt"\n'
    assert parse_opam(text, path="x.opam").depends == (Dependency("fmt"),)


def test_grouped_conjunction_and_options_on_groups() -> None:
    text = 'depends: [ ("a" & "b") {build} "c" {with-test | dev} ]'
    # `c` is needed in dev mode too (a pinned checkout is), so not only for the tests.
    assert parse_opam(text, path="x.opam").depends == (
        Dependency("a", build=True), Dependency("b", build=True), Dependency("c"))


@pytest.mark.parametrize(("dependency", "expected"), [
    ('"odoc" {with-doc}', Dependency("odoc", with_doc=True)),
    ('"odoc" {with-doc & >= "2.0"}', Dependency("odoc", with_doc=True)),
    ('"odoc" {>= "2.0" & with-doc}', Dependency("odoc", with_doc=True)),
    ('"odoc" {(with-doc)}', Dependency("odoc", with_doc=True)),
    ('"x" {with-test | with-doc}', Dependency("x")),
    ('"x" {with-doc | >= "1.0"}', Dependency("x")),
    ('"x" {!with-doc}', Dependency("x")),
    ('"x" {with-test & with-doc}', Dependency("x", with_test=True, with_doc=True)),
    ('"x" {with-doc & !with-test}', Dependency("x", with_doc=True)),
    ('"x" {with-doc | false}', Dependency("x", with_doc=True)),
    ('"x" {with-doc | true}', Dependency("x")),
    ('("a" {with-doc} | "b")', Dependency("a", with_doc=True)),
    ('("x" & "y" {with-test}) {with-doc}', Dependency("x", with_doc=True)),
])
def test_a_dependency_is_only_for_docs_when_its_filter_needs_with_doc(
        dependency: str, expected: Dependency) -> None:
    assert parse_opam(f"depends: [ {dependency} ]", path="x.opam").depends[0] == expected


def test_a_dependency_inside_a_doc_only_group_keeps_its_own_filter_too() -> None:
    text = 'depends: [ ("x" & "y" {with-test}) {with-doc} ]'
    assert parse_opam(text, path="x.opam").depends == (
        Dependency("x", with_doc=True), Dependency("y", with_test=True, with_doc=True))


def test_a_repeated_dependency_is_doc_only_if_every_mention_is() -> None:
    text = 'depends: [ "odoc" {with-doc} "odoc" {>= "2.0"} "sherlodoc" {with-doc} ]'
    assert parse_opam(text, path="a.opam").depends == (
        Dependency("odoc"), Dependency("sherlodoc", with_doc=True))


def test_no_depends_gives_no_dependencies() -> None:
    assert parse_opam('opam-version: "2.0"\n', path="empty.opam").depends == ()


@pytest.mark.parametrize(("text", "message"), [
    ('opam-version: "2.0"\ndepends: [\n  "ocaml"\n', "foo.opam:4: expected `]` to close the `[` "
     "of line 2; got the end of the file"),
    ('name: "x"\n\ndepends: [ "a" {>= "1" ]\n', "foo.opam:3: expected `}` to close the `{` of "
     "line 3; got `]`"),
    ('opam-version: "2.0"\nsynopsis "x"\n', "foo.opam:2: expected `:` after the field name "
     '`synopsis`; got the string "x"'),
    ('url "label" src: "x"', 'foo.opam:1: expected `:` after the field name `url`; got the '
     'string "label"'),
    ('opam-version: "2.0"\ndescription: "never\nclosed\n', "foo.opam:2: expected `\"` to close "
     "the string opened here"),
    ('a: "1"\n(* open\n(* nested *)\n', "foo.opam:2: expected `*)` to close the comment "
     "opened here"),
    ('a: "1"\nb: @\n', "foo.opam:2: expected a value, a field or a section; got `@`"),
    ('a: "1"\n\ndepends: [ "a" 42 ]\n', "foo.opam:3: expected a package name (a string); got `42`"),
    ('depends: [ "a" ]\nbuild: []\ndepends: []\n', "foo.opam:3: expected one `depends` field; "
     "line 1 has another"),
    ('depends: [ "a" ]\n]\n', "foo.opam:2: expected a field name or a section; got `]`"),
    ('x: "bad \\q escape"\n', "foo.opam:1: expected a valid escape after `\\`; got `\\q`"),
])
def test_malformed_opam_files_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(AnalysisError) as info:
        parse_opam(text, path="foo.opam")
    assert str(info.value) == message


def _tree(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_analyse_finds_opam_files_to_depth_three(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "b.opam": 'depends: ["ocaml" "dune"]',
        "a.opam": 'depends: ["b" "alcotest" {with-test}]',
        "sub/c.opam": "",
        "sub/deeper/d.opam": 'depends: ["fmt"]',
        "sub/deeper/deepest/e.opam": "",
        "_build/default/f.opam": "",
        "sub/_opam/g.opam": "",
        ".git/h.opam": "",
        "dune-project": "(lang dune 3.0)\n",
        "README.opam.md": "",
    })
    analysis = analyse(root)
    assert [f.path for f in analysis.opam_files] == [
        "a.opam", "b.opam", "sub/c.opam", "sub/deeper/d.opam"]
    assert analysis.opam_files[0] == OpamFile(
        "a.opam", "a", (Dependency("b"), Dependency("alcotest", with_test=True)))
    assert analysis.dune_project is True
    assert analysis.ocamlformat_version is None


def test_analyse_reads_ocamlformat_version(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "x.opam": "", ".ocamlformat": "profile = default\n version = 0.26.1 \nmargin=80\n"})
    analysis = analyse(root)
    assert analysis.ocamlformat_version == "0.26.1"
    assert analysis.dune_project is False


def test_ocamlformat_without_version_gives_none(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"x.opam": "", ".ocamlformat": "profile=default\n"})
    assert analyse(root).ocamlformat_version is None


def test_no_opam_files(tmp_path: Path) -> None:
    _tree(tmp_path, {"a/b/c/deep.opam": "", "_build/x.opam": "", "dune-project": ""})
    with pytest.raises(AnalysisError, match=r"^No opam files found$"):
        analyse(tmp_path)


def test_malformed_opam_file_in_tree_names_its_relative_path(tmp_path: Path) -> None:
    _tree(tmp_path, {"ok.opam": "", "sub/bad.opam": 'opam-version: "2.0"\ndepends: [ "x"\n'})
    with pytest.raises(AnalysisError, match=r"^sub/bad\.opam:3: expected `\]`"):
        analyse(tmp_path)


def test_symlinked_opam_files_are_not_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside.opam"
    outside.write_text('depends: ["secret"]')
    root = _tree(tmp_path / "repo", {"real.opam": ""})
    (root / "link.opam").symlink_to(outside)
    assert [f.path for f in analyse(root).opam_files] == ["real.opam"]


def test_json_round_trip_is_exact_and_stable() -> None:
    analysis = Analysis(
        opam_files=(
            parse_opam(REAL_LOOKING, path="lib/mylib.opam"),
            OpamFile("x.opam", "x", ()),
        ),
        dune_project=True,
        ocamlformat_version="0.26.1",
    )
    text = to_json(analysis)
    assert from_json(text) == analysis
    assert to_json(from_json(text)) == text


@pytest.mark.parametrize("text", ["not json", "{}", '{"opam_files": [{"path": "x"}]}'])
def test_from_json_rejects_other_shapes(text: str) -> None:
    with pytest.raises(AnalysisError, match=r"^invalid analysis JSON"):
        from_json(text)
