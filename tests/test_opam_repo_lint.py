"""The lint rules of an opam repository's pull requests, each with a passing and a failing
case, and the host's `opam lint` on copies of the files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.ocaml.opam_syntax import parse
from pipeline.opam_repo import lint as L
from pipeline.opam_repo.model import LintMessage

GOOD = '''opam-version: "2.0"
synopsis: "A library for tests"
description: "A longer description of the library."
maintainer: "Alice <alice@example.com>"
authors: "Alice"
license: "MIT"
homepage: "https://example.com/foo"
bug-reports: "https://example.com/foo/issues"
dev-repo: "git+https://example.com/foo.git"
depends: ["ocaml" "dune" {>= "3.0"} "alcotest" {with-test}]
build: ["dune" "build" "-p" name "-j" jobs]
url {
  src: "https://example.com/foo-1.0.tar.gz"
  checksum: "sha256=0000000000000000000000000000000000000000000000000000000000000000"
}
'''
PATH = "packages/foo/foo.1.0/opam"


def target(text: str = GOOD, *, name: str = "foo", version: str = "1.0",
           entries: tuple[str, ...] = ("opam",), new_name: bool = False,
           existing: frozenset[str] = frozenset({"foo", "bar"})) -> L.Target:
    """A package version to lint, `text` being its opam file."""
    path = f"packages/{name}/{name}.{version}/opam"
    return L.Target(name, version, path, parse(text, path=path), entries, new_name, existing)


def messages(rule_id: str, checked: L.Target) -> list[str]:
    """What the rule `rule_id` says about `checked`."""
    return list(L.RULES[rule_id](checked))


def test_a_good_package_passes_every_rule() -> None:
    assert L.check(target()) == []
    assert L.check(target(entries=("opam", "files/"), new_name=True)) == []


def test_check_names_the_file_and_the_rule() -> None:
    assert L.check(target(GOOD + 'pin-depends: [["x.1" "git+https://x"]]\n')) == [
        LintMessage(PATH, "no-pin-depends", "pin-depends is not allowed in the repository")]


def test_a_new_rule_is_one_registered_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "RULES", dict(L.RULES))

    @L.rule("no-foo")
    def no_foo(checked: L.Target) -> Iterator[str]:
        if checked.name == "foo":
            yield "foo is taken"

    assert L.check(target()) == [LintMessage(PATH, "no-foo", "foo is taken")]
    assert L.check(target(name="bar")) == []
    with pytest.raises(ValueError, match="two lint rules named no-foo"):
        L.rule("no-foo")(no_foo)


@pytest.mark.parametrize("fields", ['name: "foo"\nversion: "1.0"\n', ""])
def test_name_and_version_matching_the_path_pass(fields: str) -> None:
    assert messages("name-version", target(GOOD + fields)) == []


def test_name_and_version_not_matching_the_path_fail() -> None:
    assert messages("name-version", target(GOOD + 'name: "fo"\nversion: "1.1"\n')) == [
        "the name field says 'fo' but the path says 'foo' (remove the field: the path gives it)",
        "the version field says '1.1' but the path says '1.0' (remove the field: the path "
        "gives it)"]


def test_a_directory_of_opam_and_files_passes() -> None:
    assert messages("directory-contents", target(entries=("files/", "opam"))) == []


def test_anything_else_in_the_directory_fails() -> None:
    assert messages("directory-contents", target(entries=("opam", "README", "patches/"))) == [
        "unexpected 'README' in packages/foo/foo.1.0: a version's directory holds only `opam` "
        "and `files/`",
        "unexpected 'patches/' in packages/foo/foo.1.0: a version's directory holds only "
        "`opam` and `files/`"]


def test_sha256_and_sha512_checksums_pass() -> None:
    text = GOOD.replace('checksum: "sha256=00', 'checksum: ["sha512=11" "sha256=00') \
        .replace('0"\n}', '0"]\n}') + 'extra-source "a.patch" {\n  src: "https://e/a.patch"\n' \
        '  checksum: "sha256=22"\n}\n'
    assert messages("checksum-algorithm", target(text)) == []


def test_md5_and_sha1_checksums_fail() -> None:
    text = GOOD.replace('checksum: "sha256=', 'checksum: ["md5=0123" "sha256=') \
        .replace('0"\n}', '0"]\n}') + 'extra-source "a.patch" {\n  src: "https://e/a.patch"\n' \
        '  checksum: "sha1=22"\n}\n' + 'extra-source "b.patch" {\n  src: "https://e/b"\n' \
        '  checksum: "0123456789abcdef"\n}\n'
    assert messages("checksum-algorithm", target(text)) == [
        "the checksum 'md5=0123' of url is not SHA-256 or SHA-512 (write sha256=HEX or "
        "sha512=HEX)",
        "the checksum 'sha1=22' of extra-source 'a.patch' is not SHA-256 or SHA-512 (write "
        "sha256=HEX or sha512=HEX)",
        "the checksum '0123456789abcdef' of extra-source 'b.patch' is not SHA-256 or SHA-512 "
        "(write sha256=HEX or sha512=HEX)"]


@pytest.mark.parametrize("text", [
    GOOD,
    GOOD.replace('"Alice <alice@example.com>"', '["Alice" "bob@example.org"]'),
    GOOD.replace('"Alice <alice@example.com>"', '"Alice"'),  # bug-reports is set
])
def test_a_maintainer_email_or_bug_reports_passes(text: str) -> None:
    assert messages("maintainer-contact", target(text)) == []


def test_neither_maintainer_email_nor_bug_reports_fails() -> None:
    text = GOOD.replace('"Alice <alice@example.com>"', '["Alice" "at example.com"]') \
        .replace('bug-reports: "https://example.com/foo/issues"\n', "")
    assert messages("maintainer-contact", target(text)) == [
        "no maintainer has an email address and there is no bug-reports field"]


def test_no_pin_depends_passes_and_pin_depends_fails() -> None:
    assert messages("no-pin-depends", target()) == []
    assert messages("no-pin-depends", target(GOOD + 'pin-depends: [["x.1" "file:///x"]]\n')) \
        == ["pin-depends is not allowed in the repository"]


def test_no_extra_files_passes_and_extra_files_fails() -> None:
    assert messages("no-extra-files", target()) == []
    assert messages("no-extra-files", target(GOOD + 'extra-files: [["a.patch" "md5=00"]]\n')) \
        == ["extra-files is not allowed in the repository: use extra-source sections"]


@pytest.mark.parametrize("dune", ['"dune"', '"dune" {>= "3.0"}', '"dune" {with-test}',
                                  '"dune" {build | with-test}'])
def test_dune_not_marked_build_passes(dune: str) -> None:
    text = GOOD.replace('"dune" {>= "3.0"}', dune)
    assert messages("dune-not-build", target(text)) == []


@pytest.mark.parametrize("dune", ['"dune" {build}', '"dune" {>= "3.0" & build}'])
def test_dune_marked_build_fails(dune: str) -> None:
    text = GOOD.replace('"dune" {>= "3.0"}', dune)
    assert messages("dune-not-build", target(text)) == ["dune must not be marked {build}"]


def test_an_unreadable_depends_fails_the_dune_rule_with_its_line() -> None:
    assert messages("dune-not-build", target(GOOD.replace('"ocaml" "dune"', '42 "dune"'))) == [
        "packages/foo/foo.1.0/opam:10: expected a package name (a string); got `42`"]


CONF = GOOD + 'flags: conf\ndepexts: [["libgmp-dev"] {os-family = "debian"}]\n'


@pytest.mark.parametrize("text", [CONF, CONF.replace("flags: conf", "flags: [conf avoid-version]")])
def test_a_conf_package_with_the_flag_and_depexts_passes(text: str) -> None:
    assert messages("conf-package", target(text, name="conf-gmp", version="4")) == []
    # The rule is about conf- packages only.
    assert messages("conf-package", target(GOOD)) == []


def test_a_conf_package_without_the_flag_or_depexts_fails() -> None:
    assert messages("conf-package", target(GOOD, name="conf-gmp", version="4")) == [
        "a conf- package needs `flags: conf`",
        "a conf- package needs depexts naming the system packages it checks for"]
    assert messages("conf-package", target(CONF.replace("flags: conf", "flags: light-uninstall"),
                                           name="conf-gmp", version="4")) == [
        "a conf- package needs `flags: conf`"]


def test_a_new_name_unlike_the_others_passes() -> None:
    existing = frozenset({"foo", "foo-bar", "Baz"})
    assert messages("name-collision", target(name="foobaz", new_name=True,
                                             existing=existing)) == []
    # A new release of an existing package collides with nothing.
    assert messages("name-collision", target(name="foo_bar", new_name=False,
                                             existing=existing)) == []


@pytest.mark.parametrize("name", ["foo_bar", "FooBar", "foo-bar-", "f-o-o-b-a-r"])
def test_a_new_name_colliding_ignoring_case_and_separators_fails(name: str) -> None:
    assert messages("name-collision", target(name=name, new_name=True,
                                             existing=frozenset({"foo-bar", "baz"}))) == [
        f"the new package name {name!r} is too close to the existing 'foo-bar' (names are "
        "compared ignoring case, '-' and '_')"]


def test_opam_lint_reports_errors_and_warnings_by_file_with_their_numbers() -> None:
    without_authors = GOOD.replace('authors: "Alice"\n', "")
    found = L.opam_lint({
        "packages/foo/foo.1.0/opam": GOOD.encode(),
        "packages/foo/foo.2.0/opam": without_authors.encode(),
        "packages/bar/bar.1.0/opam": b'opam-version: "2.0"\nfoo bar\n'})
    assert found == [
        LintMessage("packages/bar/bar.1.0/opam", "opam-lint-02",
                    "error 2: File format error at line 2, column 4: Parse error"),
        LintMessage("packages/foo/foo.2.0/opam", "opam-lint-25",
                    "warning 25: Missing field 'authors'")]


def test_opam_lint_of_nothing_runs_nothing() -> None:
    assert L.opam_lint({}) == []
