"""A small generated opam repository, as a git repository, for the demo and the tests: offline,
with real OCaml sources, built on Debian 12's OCaml.

The base branch `master` holds (at its root `repo`, `packages/` and `archives/`):

- `ocaml-system.4.13.1` (Debian 12's OCaml; available only when `sys-ocaml-version` is 4.13.1,
  flagged `compiler`) and `ocaml.4.13.1` depending on it, as opam-repository has them: a switch
  made with `opam switch create default ocaml-system` uses the system's compiler;
- `dune.2.9.3`, a stub of Debian 12's `ocaml-dune` whose build does nothing: the image's dune is
  used;
- five packages with real sources (dune projects), each a deterministic `file://` archive under
  `archives/NAME-VERSION.tar.gz`, at the path where the build specs copy the repository in the
  image (`SOURCE_URL`): `strutil.1.0` and `strutil.1.1` (a string library), `testkit.1.0` (a
  test helper), `greet.1.0` (a library depending on `strutil {>= "1.0"}`, whose tests need
  `testkit {with-test}` and run with `dune runtest`), `hello.1.0` (an executable depending on
  `greet`) and `wordcount.1.0` (an executable needing `strutil {>= "1.1"}`).

`master` has two commits: everything, then a new synopsis for `hello.1.0` (so that a branch made
from the first commit can conflict with it: `add_conflicting_change`).

`make_demo` adds three pull-request branches, one for each kind of result:

- `new-release`: `greet.1.1`, which builds (also with `strutil.1.0`, the choice of its lower
  bounds), whose tests pass and whose reverse dependency `hello.1.0` builds;
- `lint-error`: `testkit.1.1`, whose archive has an md5 checksum (the publication rules want
  SHA-256 or SHA-512);
- `build-failure`: `wordcount.1.1`, whose source does not compile (a type error).

Tests make more branches with `add_release`, `add_insignificant_change` and
`add_conflicting_change` (or any files with `commit_files`). Everything is deterministic: the
same calls give the same commits (fixed author, dates and archive bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.opam_repo.specs import REPOSITORY

OCAML_VERSION = "4.13.1"
"""Debian 12's OCaml (`ocaml-nox` 4.13.1-4)."""
DUNE_VERSION = "2.9.3"
"""Debian 12's dune (`ocaml-dune` 2.9.3-1)."""
BASE = "master"
"""The base branch."""
DEMO_BRANCHES = ("new-release", "lint-error", "build-failure")
"""The pull-request branches `make_demo` adds, in that order."""

SOURCE_URL = f"file://{REPOSITORY}/archives"
"""Where the packages' `url`s find their archives: the repository's `archives/`, in the image."""
# Archive members' modification time (2024-01-01): fixed, and recent enough for tar not to warn.
_ARCHIVE_MTIME = 1_704_067_200
_GIT_DATE = "2024-01-01T00:00:00Z"
_AUTHOR = "pipeline developers"
_EMAIL = "pipeline@example.invalid"
_MAINTAINER = f"{_AUTHOR} <{_EMAIL}>"


@dataclass(frozen=True)
class Release:
    """A package version with real sources: `depends` are its opam `depends` entries beyond
    `ocaml` and `dune` (e.g. `'"strutil" {>= "1.0"}'`), `sources` its dune project's files by
    path (its `NAME.opam` and `dune-project` are added), `tests` whether `dune runtest` runs
    with `{with-test}`, `checksum` the hash its `url` names the archive by."""

    name: str
    version: str
    synopsis: str
    sources: Mapping[str, str]
    depends: tuple[str, ...] = ()
    tests: bool = False
    checksum: Literal["sha256", "md5"] = "sha256"
    description: str = "Part of the sample opam repository of the pipeline's tests."

    @property
    def package(self) -> str:
        """"NAME.VERSION"."""
        return f"{self.name}.{self.version}"

    @property
    def archive_path(self) -> str:
        """The archive's path in the repository."""
        return f"archives/{self.name}-{self.version}.tar.gz"

    @property
    def opam_path(self) -> str:
        """The opam file's path in the repository."""
        return f"packages/{self.name}/{self.package}/opam"

    def archive(self) -> bytes:
        """The gzipped tarball of the sources under `NAME-VERSION/`, the same bytes each time
        (fixed times, owners and modes; gzip's own time 0)."""
        files = {**self.sources, "dune-project": f"(lang dune 2.9)\n(name {self.name})\n",
                 f"{self.name}.opam": 'opam-version: "2.0"\n'}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for path, text in sorted(files.items()):
                data = text.encode()
                info = tarfile.TarInfo(f"{self.name}-{self.version}/{path}")
                info.size, info.mode, info.mtime = len(data), 0o644, _ARCHIVE_MTIME
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))
        return gzip.compress(buffer.getvalue(), mtime=0)

    def opam(self, archive: bytes) -> str:
        """The opam file, its `url` naming `archive` by its checksum."""
        digest = hashlib.new(self.checksum, archive).hexdigest()
        depends = "".join(f"  {entry}\n" for entry in
                          ('"ocaml" {>= "4.08"}', '"dune" {>= "2.9"}', *self.depends))
        test = '\n  ["dune" "runtest" "-p" name "-j" jobs] {with-test}' if self.tests else ""
        return f"""{_header(self.synopsis, self.name)}description: "{self.description}"
depends: [
{depends}]
build: [
  ["dune" "build" "-p" name "-j" jobs]{test}
]
url {{
  src: "{SOURCE_URL}/{self.name}-{self.version}.tar.gz"
  checksum: "{self.checksum}={digest}"
}}
"""

    def files(self) -> dict[str, bytes]:
        """Its files in the repository by path: the opam file and the archive."""
        archive = self.archive()
        return {self.opam_path: self.opam(archive).encode(), self.archive_path: archive}


def _header(synopsis: str, name: str) -> str:
    """The fields every opam file of the sample starts with."""
    return f"""opam-version: "2.0"
synopsis: "{synopsis}"
maintainer: "{_MAINTAINER}"
authors: ["{_AUTHOR}"]
license: "MIT"
homepage: "https://example.invalid/{name}"
bug-reports: "https://example.invalid/{name}/issues"
dev-repo: "git+https://example.invalid/{name}.git"
"""


def _library(name: str, code: str, libraries: str = "") -> dict[str, str]:
    return {"src/dune": f"(library (name {name}) (public_name {name}) (libraries {libraries}))\n",
            f"src/{name}.ml": code}


def _executable(name: str, libraries: str, code: str) -> dict[str, str]:
    return {"bin/dune": f"(executable (name {name}) (public_name {name}) "
                        f"(libraries {libraries}))\n",
            f"bin/{name}.ml": code}


_STRUTIL_1_0 = """let capitalize s = String.capitalize_ascii s
let repeat n s = String.concat "" (List.init n (fun _ -> s))
"""
_STRUTIL_1_1 = _STRUTIL_1_0 + """let words s =
  List.filter (fun w -> w <> "") (String.split_on_char ' ' s)
"""
_GREET_1_0 = 'let greet name = "Hello, " ^ Strutil.capitalize name ^ "!"\n'
_GREET_CHECKS = ('"greet" "Hello, World!" (Greet.greet "world")',
                 '"capitalized" "Hello, Opam!" (Greet.greet "opam")')


def _greet(version: str, code: str, checks: tuple[str, ...]) -> Release:
    """A release of `greet`: `code` is its module, `checks` the arguments of its tests'
    `Testkit.check` calls."""
    test = "let () =\n" + ";\n".join(f"  Testkit.check {check}" for check in checks) + "\n"
    return Release("greet", version, "Greetings", {
        **_library("greet", code, "strutil"),
        "test/dune": "(test (name test_greet) (libraries greet testkit))\n",
        "test/test_greet.ml": test,
    }, depends=('"strutil" {>= "1.0"}', '"testkit" {with-test}'), tests=True)


def _wordcount(version: str, code: str) -> Release:
    return Release("wordcount", version, "Counts the words of its arguments",
                   _executable("wordcount", "strutil", code), depends=('"strutil" {>= "1.1"}',))


def _testkit(version: str, checksum: Literal["sha256", "md5"] = "sha256") -> Release:
    return Release("testkit", version, "Checks for tests", _library("testkit", """\
let check name expected actual =
  if expected = actual then Printf.printf "testkit: ok %s\\n" name
  else (Printf.printf "testkit: FAILED %s: %S <> %S\\n" name expected actual; exit 1)
"""), checksum=checksum)


BASE_RELEASES: tuple[Release, ...] = (
    Release("strutil", "1.0", "String utilities", _library("strutil", _STRUTIL_1_0)),
    Release("strutil", "1.1", "String utilities", _library("strutil", _STRUTIL_1_1)),
    _testkit("1.0"),
    _greet("1.0", _GREET_1_0, _GREET_CHECKS),
    Release("hello", "1.0", "Says hello", _executable(
        "hello", "greet", 'let () = print_endline (Greet.greet "world")\n'),
        depends=('"greet" {>= "1.0"}',)),
    _wordcount("1.0", 'let () = print_int (List.length (Strutil.words (String.concat " " '
                      '(List.tl (Array.to_list Sys.argv)))))\n'),
)
"""The packages with sources on the base branch."""

NEW_RELEASE = _greet(
    "1.1",
    _GREET_1_0 + 'let greet_all names = String.concat " " (List.map greet names)\n',
    (*_GREET_CHECKS, '"all" "Hello, A! Hello, B!" (Greet.greet_all ["a"; "b"])'),
)
"""`new-release`'s release: a new version of the library `hello` depends on; it uses only
what `strutil.1.0` has, and has tests."""
LINT_ERROR = _testkit("1.1", checksum="md5")
"""`lint-error`'s release: its archive is named by an md5 checksum."""
BUILD_FAILURE = _wordcount("1.1", 'let () = print_string (List.length (Strutil.words "a b"))\n')
"""`build-failure`'s release: a type error (an int where a string is expected)."""


def _system_packages() -> dict[str, bytes]:
    """The compiler packages on the system's OCaml and the dune stub, by path."""
    ocaml_system = f"""{_header("The OCaml compiler (system version, from outside of opam)",
                                "ocaml")}depends: ["ocaml" {{post}}]
conflict-class: "ocaml-core-compiler"
available: sys-ocaml-version = "{OCAML_VERSION}"
flags: compiler
build: ["ocamlc" "-vnum"]
"""
    # Debian's dune finds the switch's libraries through OCAMLPATH.
    ocaml = f"""{_header("The OCaml compiler (virtual package)", "ocaml")}depends: [
  "ocaml-system" {{= "{OCAML_VERSION}"}}
]
flags: conf
setenv: [OCAMLPATH += "%{{lib}}%"]
"""
    dune = f"""{_header(f"Debian's dune (ocaml-dune {DUNE_VERSION}), used as is", "dune")}\
depends: ["ocaml"]
"""
    return {
        f"packages/ocaml-system/ocaml-system.{OCAML_VERSION}/opam": ocaml_system.encode(),
        f"packages/ocaml/ocaml.{OCAML_VERSION}/opam": ocaml.encode(),
        f"packages/dune/dune.{DUNE_VERSION}/opam": dune.encode(),
    }


def _git(repo: Path, *args: str) -> str:
    """Run git in `repo` as the sample's fixed author at its fixed date; its output, stripped."""
    environment = {**os.environ, "GIT_AUTHOR_NAME": _AUTHOR, "GIT_AUTHOR_EMAIL": _EMAIL,
                   "GIT_COMMITTER_NAME": _AUTHOR, "GIT_COMMITTER_EMAIL": _EMAIL,
                   "GIT_AUTHOR_DATE": _GIT_DATE, "GIT_COMMITTER_DATE": _GIT_DATE}
    done = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=environment,
                          check=True, capture_output=True, text=True)
    return done.stdout.strip()


def commit_files(repo: Path, branch: str, files: Mapping[str, bytes | str | None], message: str,
                 *, base: str = BASE) -> str:
    """Commit `files` (path -> content; None removes the file) on `branch`, made from `base`
    if it does not exist yet; return the new commit. The work tree is left on `BASE`."""
    exists = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
                            cwd=repo, capture_output=True).returncode == 0
    _git(repo, "checkout", "--quiet", *([branch] if exists else ["-b", branch, base]))
    try:
        return _commit(repo, files, message)
    finally:
        _git(repo, "checkout", "--quiet", BASE)


def _commit(repo: Path, files: Mapping[str, bytes | str | None], message: str) -> str:
    """Commit `files` on the branch checked out; return the new commit."""
    for path, content in files.items():
        if content is None:
            _git(repo, "rm", "--quiet", "--", path)
            continue
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        _git(repo, "add", "--", path)
    _git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def add_release(repo: Path, branch: str, release: Release, *, base: str = BASE) -> str:
    """A branch adding `release` (its opam file and archive); returns its head."""
    return commit_files(repo, branch, release.files(), f"{release.package}: new release",
                        base=base)


def add_insignificant_change(repo: Path, branch: str, *, base: str = BASE) -> str:
    """A branch changing only `hello.1.0`'s description (nothing a build depends on); returns
    its head."""
    path = "packages/hello/hello.1.0/opam"
    text = _git(repo, "show", f"{base}:{path}") + "\n"
    changed = text.replace('description: "', 'description: "Says hello to the world. ', 1)
    return commit_files(repo, branch, {path: changed}, "hello.1.0: a longer description",
                        base=base)


_HELLO = "packages/hello/hello.1.0/opam"
_HELLO_SYNOPSIS = ('synopsis: "Says hello"', 'synopsis: "Says hello to the world"')


def add_conflicting_change(repo: Path, branch: str) -> str:
    """A branch, made from `BASE`'s first commit, giving `hello.1.0` a synopsis other than the
    one `BASE`'s second commit gives it: merging it into `BASE` conflicts. Returns its head."""
    text = _git(repo, "show", f"{BASE}~1:{_HELLO}") + "\n"
    changed = text.replace(_HELLO_SYNOPSIS[0], 'synopsis: "Prints a greeting"', 1)
    return commit_files(repo, branch, {_HELLO: changed}, "hello.1.0: another synopsis",
                        base=f"{BASE}~1")


def make_repository(directory: Path) -> Path:
    """Make the sample repository in `directory` (created if missing; it must be empty): a git
    repository whose branch `BASE` holds the opam repository the module's docstring describes,
    checked out. Returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    _git(directory, "init", "--quiet", "--initial-branch", BASE)
    files: dict[str, bytes | str | None] = {"repo": 'opam-version: "2.0"\n',
                                            **_system_packages()}
    for release in BASE_RELEASES:
        files.update(release.files())
    _commit(directory, files, "The compiler, dune and the sample's packages")
    hello = (directory / _HELLO).read_text()
    _commit(directory, {_HELLO: hello.replace(*_HELLO_SYNOPSIS, 1)},
            "hello.1.0: a clearer synopsis")
    return directory


def make_demo(directory: Path) -> Path:
    """`make_repository` plus the pull-request branches `DEMO_BRANCHES` (`new-release`,
    `lint-error`, `build-failure`) the module's docstring describes. Returns `directory`."""
    make_repository(directory)
    for branch, release in zip(DEMO_BRANCHES, (NEW_RELEASE, LINT_ERROR, BUILD_FAILURE),
                               strict=True):
        add_release(directory, branch, release)
    return directory
