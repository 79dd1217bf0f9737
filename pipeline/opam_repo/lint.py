"""The lint of a pull request's package versions: the repository's publication rules and
`opam lint`.

Each rule is one function of a `Target` (a package version as merged, its opam file parsed)
that yields what is wrong, as text; `@rule("ID")` registers it in `RULES` under its id, which
names it in every `LintMessage`. A new rule is one more decorated function.

`opam_lint` runs the host's `opam lint` on copies of the opam files, as an unprivileged user
(nobody, through `setpriv`, when running as root), with a timeout. As opam-repo-ci does, its
errors and its warnings both fail the lint (opam-repo-ci reports "warning 25: Missing field
'authors'" as a failure): each becomes a `LintMessage` with the rule `opam-lint-NN`, NN being
opam's number for it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.ocaml.analysis import AnalysisError, dependencies
from pipeline.ocaml.opam_syntax import Document, Value
from pipeline.opam_repo.model import LintMessage

OPAM_LINT_TIMEOUT = 120
"""Seconds `opam lint` may take (about 20 ms a file)."""

NOBODY = 65534
"""The uid and gid `opam lint` runs as when we are root: the files it reads are the PR's."""

CHECKSUM_ALGORITHMS = ("sha256", "sha512")
"""The checksums the repository accepts."""

_EMAIL = re.compile(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+")


@dataclass(frozen=True)
class Target:
    """A package version to lint, as merged: its "NAME.VERSION", its opam file's path (relative
    to the repository's root) and contents parsed, the entries of its directory (a
    subdirectory's name ends with "/"), whether its name is new to the repository, and the
    names of the packages on the base."""

    name: str
    version: str
    path: str
    document: Document
    entries: tuple[str, ...]
    new_name: bool
    existing_names: frozenset[str]


Rule = Callable[[Target], Iterable[str]]
RULES: dict[str, Rule] = {}
"""The repository's rules by id, in the order registered."""


def rule(rule_id: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule `rule_id`."""
    def register(function: Rule) -> Rule:
        if rule_id in RULES:
            raise ValueError(f"two lint rules named {rule_id}")
        RULES[rule_id] = function
        return function
    return register


@rule("name-version")
def name_and_version_match_the_path(target: Target) -> Iterator[str]:
    """The `name` and `version` fields, when given, are those of the path."""
    for field, expected in (("name", target.name), ("version", target.version)):
        value = target.document.value(field)
        if value is not None and (value.kind, value.text) != ("string", expected):
            written = value.text or value.kind
            yield (f"the {field} field says {written!r} but the path says {expected!r} "
                   f"(remove the field: the path gives it)")


@rule("directory-contents")
def directory_holds_only_opam_and_files(target: Target) -> Iterator[str]:
    """A version's directory holds its `opam` file and a `files/` directory, nothing else."""
    for entry in target.entries:
        if entry not in ("opam", "files/"):
            yield (f"unexpected {entry!r} in {target.path.removesuffix('/opam')}: a version's "
                   "directory holds only `opam` and `files/`")


def _checksums(document: Document) -> Iterator[tuple[str, Value]]:
    """The checksums of the `url` and `extra-source` sections, with the section's name."""
    for section in document.sections:
        if section.kind in ("url", "extra-source"):
            checksum = section.fields.get("checksum")
            if checksum is not None:
                where = section.kind + ("" if section.label is None else f" {section.label!r}")
                for value in checksum.value.as_list():
                    yield where, value


@rule("checksum-algorithm")
def checksums_are_sha256_or_sha512(target: Target) -> Iterator[str]:
    """Each checksum is `sha256=...` or `sha512=...` (an MD5 or SHA-1 is too weak)."""
    for where, value in _checksums(target.document):
        algorithm = value.text.split("=", 1)[0] if "=" in value.text else "md5"
        if value.kind != "string" or algorithm not in CHECKSUM_ALGORITHMS:
            yield (f"the checksum {value.text or value.kind!r} of {where} is not SHA-256 or "
                   "SHA-512 (write sha256=HEX or sha512=HEX)")


@rule("maintainer-contact")
def maintainer_can_be_reached(target: Target) -> Iterator[str]:
    """A maintainer has an email address, or `bug-reports` says where to report problems."""
    maintainers = target.document.value("maintainer")
    bug_reports = target.document.value("bug-reports")
    emails = [text for text in (maintainers.strings() if maintainers else ())
              if _EMAIL.search(text)]
    if not emails and not (bug_reports and any(bug_reports.strings())):
        yield "no maintainer has an email address and there is no bug-reports field"


@rule("no-pin-depends")
def no_pin_depends(target: Target) -> Iterator[str]:
    """`pin-depends` has no place in a repository: its packages come from the repository."""
    if "pin-depends" in target.document.fields:
        yield "pin-depends is not allowed in the repository"


@rule("no-extra-files")
def no_extra_files(target: Target) -> Iterator[str]:
    """`extra-files` is not allowed: use `extra-source` sections (with checksums)."""
    if "extra-files" in target.document.fields:
        yield "extra-files is not allowed in the repository: use extra-source sections"


@rule("dune-not-build")
def dune_is_not_a_build_dependency(target: Target) -> Iterator[str]:
    """`dune` is not marked `{build}`: it installs files the package uses afterwards, so a
    `{build}` dune could be removed while the package still needs it."""
    try:
        depends = dependencies(target.document)
    except AnalysisError as error:
        yield str(error)
        return
    if any(dependency.name == "dune" and dependency.build for dependency in depends):
        yield "dune must not be marked {build}"


@rule("conf-package")
def conf_packages_are_flagged_and_have_depexts(target: Target) -> Iterator[str]:
    """A `conf-` package, which checks for a system package, carries the `conf` flag and
    names the system packages in `depexts`."""
    if not target.name.startswith("conf-"):
        return
    flags = target.document.value("flags")
    if flags is None or ("ident", "conf") not in [(v.kind, v.text) for v in flags.as_list()]:
        yield "a conf- package needs `flags: conf`"
    depexts = target.document.value("depexts")
    if depexts is None or not depexts.as_list():
        yield "a conf- package needs depexts naming the system packages it checks for"


def _collision_key(name: str) -> str:
    """A package name as the collision rule compares them: no case, no `-` or `_`."""
    return name.lower().replace("-", "").replace("_", "")


@rule("name-collision")
def new_name_does_not_collide(target: Target) -> Iterator[str]:
    """A new package's name differs from every existing one's ignoring case, `-` and `_`."""
    if not target.new_name:
        return
    key = _collision_key(target.name)
    for existing in sorted(target.existing_names):
        if existing != target.name and _collision_key(existing) == key:
            yield (f"the new package name {target.name!r} is too close to the existing "
                   f"{existing!r} (names are compared ignoring case, '-' and '_')")


def check(target: Target) -> list[LintMessage]:
    """The messages of every rule about `target`, in the order of `RULES`."""
    return [LintMessage(target.path, rule_id, message)
            for rule_id, function in RULES.items() for message in function(target)]


class OpamLintError(RuntimeError):
    """`opam lint` could not be run or gave no result (not a fault of the files)."""


def opam_lint(files: Mapping[str, bytes]) -> list[LintMessage]:
    """`opam lint` of the opam files `files` (contents by path, relative to the repository's
    root, each `packages/NAME/NAME.VERSION/opam`): its errors and warnings, in order of
    path, then as opam lists them. Raises `OpamLintError` when opam fails or times out."""
    if not files:
        return []
    with tempfile.TemporaryDirectory(prefix="opam-lint-") as scratch:
        root = Path(scratch)
        # Readable by nobody: the copies, and a directory it may write its results in.
        root.chmod(0o755)
        copies: dict[str, str] = {}
        for path, contents in files.items():
            copy = root / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            for directory in copy.relative_to(root).parents:
                (root / directory).chmod(0o755)
            copy.write_bytes(contents)
            copy.chmod(0o644)
            copies[str(copy)] = path
        results = root / "results"
        results.mkdir()
        command = ["opam", "lint", f"--json={results / 'lint.json'}", *copies]
        if os.geteuid() == 0:
            os.chown(results, NOBODY, NOBODY)
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                       *command]
        # No opam root is needed to lint; this keeps opam from looking for one elsewhere.
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(results),
                       "OPAMROOT": str(results / "root"), "OPAMCOLOR": "never"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=environment,
                                  timeout=OPAM_LINT_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise OpamLintError(f"opam lint took more than {OPAM_LINT_TIMEOUT} s") from None
        try:
            report = json.loads((results / "lint.json").read_text())["lint"]
        except (OSError, ValueError, KeyError) as error:
            raise OpamLintError(f"opam lint gave no result ({error}): "
                                f"{done.stdout}{done.stderr}".strip()) from None
    messages: list[LintMessage] = []
    for entry in sorted(report, key=lambda entry: copies[entry["file"]]):
        for severity, key in (("error", "errors"), ("warning", "warnings")):
            for finding in entry[key]:
                messages.append(LintMessage(copies[entry["file"]],
                                            f"opam-lint-{finding['id']:02d}",
                                            f"{severity} {finding['id']}: {finding['message']}"))
    return messages

