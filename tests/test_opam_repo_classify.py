"""The classification of a pull request's changes to an opam repository: the layout of the
changed paths, each kind of change, and the opam syntax trees it compares."""

from __future__ import annotations

import pytest

from pipeline.ocaml.opam_syntax import parse
from pipeline.opam_repo.classify import (
    LayoutError,
    Touched,
    classify,
    significant_items,
    touched_packages,
)
from pipeline.opam_repo.model import PackageChange

OPAM = '''opam-version: "2.0"
synopsis: "A library"
maintainer: "alice@example.com"
depends: [
  "ocaml" {>= "4.08"}
  "dune" {>= "3.0"}
]
build: ["dune" "build" "-p" name "-j" jobs]
url {
  src: "https://example.com/foo.tar.gz"
  checksum: "sha256=00"
}
'''


def test_changed_paths_map_onto_package_versions_and_others_are_ignored() -> None:
    touched = touched_packages([
        "README.md", "repo", ".github/workflows/ci.yml",
        "packages/foo/foo.1.0/opam", "packages/foo/foo.1.0/files/fix.patch",
        "packages/foo/foo.1.0/files/sub/dir/more.patch",
        "packages/bar-baz/bar-baz.2.0~beta/opam", "packages/foo/foo.0.9/files/a.patch"])
    assert touched == [
        Touched("bar-baz", "2.0~beta", opam_changed=True),
        Touched("foo", "0.9", files_changed=True),
        Touched("foo", "1.0", opam_changed=True, files_changed=True)]
    assert touched[2].opam_path == "packages/foo/foo.1.0/opam"
    assert touched[2].package == "foo.1.0"


@pytest.mark.parametrize("path", [
    "packages/foo/opam", "packages/foo/foo.1.0/README", "packages/foo/bar.1.0/opam",
    "packages/foo/foo./opam", "packages/foo/foo.1.0/files", "packages/foo/foo.1.0/opam/x",
    "packages/README.md", "packages/foo/foo.1.0/url"])
def test_other_paths_under_packages_are_layout_errors_naming_the_path(path: str) -> None:
    with pytest.raises(LayoutError) as info:
        touched_packages(["packages/ok/ok.1/opam", path])
    assert str(info.value) == (
        f"{path}: not in the repository's layout (expected packages/NAME/NAME.VERSION/opam or "
        "packages/NAME/NAME.VERSION/files/...)")


FOO = Touched("foo", "1.0", opam_changed=True)


def test_a_new_version_is_a_new_package_or_a_new_release() -> None:
    assert classify(FOO, None, OPAM, name_on_base=False) == PackageChange("foo.1.0",
                                                                          "new-package")
    assert classify(FOO, None, OPAM, name_on_base=True) == PackageChange("foo.1.0",
                                                                         "new-release")


def test_a_removed_opam_file_is_a_deletion() -> None:
    assert classify(FOO, OPAM, None, name_on_base=True).kind == "deleted"


def test_files_without_an_opam_file_are_a_layout_error() -> None:
    with pytest.raises(LayoutError, match=r"^packages/foo/foo\.1\.0: no opam file beside"):
        classify(Touched("foo", "1.0", files_changed=True), None, None, name_on_base=True)


@pytest.mark.parametrize("available", ["available: false", "available: [false]"])
def test_available_false_is_unavailable_even_for_a_new_release(available: str) -> None:
    assert classify(FOO, OPAM, OPAM + available, name_on_base=True).kind == "unavailable"
    assert classify(FOO, None, OPAM + available, name_on_base=True).kind == "unavailable"


def test_an_availability_that_may_hold_is_not_unavailable() -> None:
    assert classify(FOO, OPAM, OPAM + 'available: os != "win32"',
                    name_on_base=True).kind == "significant"


@pytest.mark.parametrize("merged", [
    # formatting and comments
    OPAM.replace("depends: [\n", "depends: [  (* what it needs *)\n").replace("\n  ", " "),
    "(* reformatted *)\n" + OPAM.replace('"-j" jobs]', '"-j"\n  jobs ]'),
    # the fields that cannot affect a build
    OPAM.replace('"A library"', '"A better library"') + 'description: """\nLong.\n"""\n',
    OPAM.replace('"alice@example.com"', '["bob@example.com" "alice@example.com"]'),
    OPAM + 'authors: "Alice"\nhomepage: "https://a"\ndoc: "https://d"\n'
           'bug-reports: "https://b"\ndev-repo: "git+https://g"\ntags: ["t"]\n',
    OPAM + 'x-maintenance-intent: ["(latest)"]\n',
])
def test_changes_that_cannot_affect_a_build_are_insignificant(merged: str) -> None:
    assert classify(FOO, OPAM, merged, name_on_base=True) == PackageChange("foo.1.0",
                                                                           "insignificant")


@pytest.mark.parametrize("merged", [
    OPAM.replace('"4.08"', '"4.14"'),
    OPAM.replace('"-j" jobs', '"-j" "1"'),
    OPAM.replace("sha256=00", "sha256=01"),
    OPAM + 'x-ci-accept-failures: ["debian-12"]\n',
    OPAM + 'license: "MIT"\n',
    "this is { not an opam file",
])
def test_other_changes_are_significant(merged: str) -> None:
    assert classify(FOO, OPAM, merged, name_on_base=True).kind == "significant"


def test_a_changed_file_under_files_is_significant() -> None:
    touched = Touched("foo", "1.0", files_changed=True)
    assert classify(touched, OPAM, OPAM, name_on_base=True).kind == "significant"


@pytest.mark.parametrize(("extra", "tests"), [
    ("", False),
    ('depends: ["alcotest" {with-test}]\n', True),
    ('depends: ["alcotest" {>= "1.0" & with-test}]\n', True),
    ('depends: ["alcotest" {with-test | dev}]\n', False),
    ('run-test: ["dune" "runtest"]\n', True),
])
def test_has_tests_from_with_test_dependencies_or_run_test(extra: str, tests: bool) -> None:
    text = OPAM.replace("depends: [", "x-depends: [") + extra
    assert classify(FOO, None, text, name_on_base=True).has_tests is tests
    # Only the built kinds have tests to run.
    assert classify(FOO, text, text + "tags: []", name_on_base=True).has_tests is False


def test_parsed_trees_are_equal_whatever_their_lines_but_differ_in_values() -> None:
    one = parse(OPAM, path="a/opam")
    moved = parse("\n\n# a comment\n" + OPAM.replace(" [\n  ", " [ "), path="b/opam")
    assert one == moved
    assert one.fields["build"].line != moved.fields["build"].line
    changed = parse(OPAM.replace("-p", "--only-packages"), path="a/opam")
    assert significant_items(one) != significant_items(changed)
