"""`pipelines/ocaml_ci.py` on an opam platform, end to end, against a local opam repository.

The public opam repository and Docker Hub are out of reach here, so the test makes a stand-in
for the `ocaml/opam:debian-12-ocaml-5.2` image, built with the real builder on the session's
store (`ocaml_store`): Debian 12's OCaml, dune and opam, a user `opam` (uid 1000) whose opam root
is initialised (offline) on a local repository, with a switch on the system compiler. The
repository holds hand-written `ocaml-system`, `ocaml` and `dune` packages (stand-ins for the
system's compiler and dune) and one real library, `greet`, whose source is a `file://` archive
made here. The image is exported as a rootfs tarball and routed to the pipeline with
`--image-dir`; the project built depends on `ocaml`, `dune` and `greet`, and its test uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import subprocess
import tarfile
from pathlib import Path

from ocaml_fixtures import HANG_GUARD, PIPELINE
from test_build_primitive import Repo
from test_ocaml_ci import (
    PIPELINE_FILE,
    final_status,
    head,
    jobs_of,
    log_of,
)

import pipeline as p
from pipeline.cli import load_pipeline
from pipeline.obuilder import spec as S
from pipeline.obuilder.stores import open_store
from pipeline.ocaml import platforms as P

PLATFORM = P.PLATFORMS["debian-12-ocaml-5.2"]
HOME = "/home/opam"
REPOSITORY = f"{HOME}/opam-repository"
SOURCES = f"{HOME}/sources"
OCAML_VERSION = "4.13.1"  # Debian 12's
DUNE_VERSION = "2.9.3"  # Debian 12's

OPAM_HEADER = 'opam-version: "2.0"\nmaintainer: "pipeline developers"\n'

GREET_FILES = {
    "dune-project": "(lang dune 2.9)\n",
    "greet.opam": OPAM_HEADER + 'synopsis: "Greetings"\ndepends: ["ocaml" "dune"]\n',
    "src/dune": "(library (name greet) (public_name greet))\n",
    "src/greet.ml": 'let greet name = "Hello, " ^ name ^ "!"\n',
}

PROJECT_FILES = {
    "dune-project": "(lang dune 2.9)\n",
    "shout.opam": OPAM_HEADER + """synopsis: "Greetings, louder"
authors: ["pipeline developers"]
license: "MIT"
homepage: "https://example.invalid/shout"
bug-reports: "https://example.invalid/shout/issues"
depends: [
  "ocaml" {>= "4.08"}
  "dune" {>= "2.9"}
  "greet"
]
build: [
  ["dune" "build" "-p" name "-j" jobs "@install" "@runtest" {with-test}]
]
""",
    "src/dune": "(library (name shout) (public_name shout) (libraries greet))\n",
    "src/shout.ml": "let shout name = String.uppercase_ascii (Greet.greet name)\n",
    "test/dune": "(test (name test_shout) (libraries shout))\n",
    "test/test_shout.ml": 'let () =\n  let got = Shout.shout "opam" in\n'
                          '  print_endline ("shout: " ^ got);\n'
                          '  assert (got = "HELLO, OPAM!")\n',
}


def tarball(files: dict[str, str], prefix: str) -> bytes:
    """A gzipped tar of `files` under the directory `prefix`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def opam_repository(sources: Path) -> dict[str, str]:
    """The local opam repository's files by path, `greet`'s archive being written to
    `sources` (copied to `SOURCES` in the image)."""
    archive = tarball(GREET_FILES, "greet-1.0")
    (sources / "greet-1.0.tar.gz").write_bytes(archive)
    checksum = hashlib.sha256(archive).hexdigest()
    return {
        "repo": 'opam-version: "2.0"\n',
        f"packages/ocaml-system/ocaml-system.{OCAML_VERSION}/opam": OPAM_HEADER + f"""\
synopsis: "The system's OCaml compiler (Debian's)"
flags: compiler
build: ["sh" "-c" "ocaml -version | grep -F {OCAML_VERSION}"]
""",
        f"packages/ocaml/ocaml.{OCAML_VERSION}/opam": OPAM_HEADER + f"""\
synopsis: "The OCaml compiler (virtual package)"
flags: conf
depends: ["ocaml-system" {{= "{OCAML_VERSION}"}}]
setenv: [OCAMLPATH += "%{{lib}}%"]
""",
        f"packages/dune/dune.{DUNE_VERSION}/opam": OPAM_HEADER + """\
synopsis: "The system's dune (Debian's ocaml-dune)"
depends: ["ocaml"]
""",
        "packages/greet/greet.1.0/opam": OPAM_HEADER + f"""\
synopsis: "Greetings"
depends: ["ocaml" "dune"]
build: [["dune" "build" "-p" name "-j" jobs]]
url {{
  src: "file://{SOURCES}/greet-1.0.tar.gz"
  checksum: "sha256={checksum}"
}}
""",
    }


def image_spec() -> str:
    """The stand-in for `ocaml/opam:debian-12-ocaml-5.2`: the system platform's base (Debian's
    OCaml, dune, opam and rsync, a user `opam`; those steps are shared with the system
    platform's builds), the repository and sources from the context, an initialised opam root."""
    system = S.parse(P.base_stage(P.PLATFORMS["debian-12-4.13"]))
    ops = (
        *system.ops,
        S.UserIds(1000, 1000),
        S.Copy(src=("opam-repository", "sources"), dst=f"{HOME}/"),
        S.Run(shell=f"opam init -n --bare --disable-sandboxing default {REPOSITORY}"
                    " && opam switch create default ocaml-system --yes"),
    )
    return S.to_sexp(dataclasses.replace(system, ops=ops))


async def build_image(store: str, work: Path, images: Path) -> None:
    """Build the stand-in image on `store` and export its rootfs as `images/NAME.tar` (with
    its environment in `NAME.env`), where the local fetcher finds `PLATFORM.image`."""
    context = work / "context"
    (context / "sources").mkdir(parents=True)
    for name, text in opam_repository(context / "sources").items():
        (context / "opam-repository" / name).parent.mkdir(parents=True, exist_ok=True)
        (context / "opam-repository" / name).write_text(text)
    (work / "spec").write_text(image_spec())
    built = subprocess.run(
        [str(PIPELINE), "obuilder", "build", "-f", str(work / "spec"), str(context),
         "--store", store], capture_output=True, text=True, timeout=HANG_GUARD)
    assert built.returncode == 0, built.stdout + built.stderr
    [result] = re.findall(r'^Got: "(\S+)"$', built.stdout, re.MULTILINE)
    # The result's rootfs, mounted (an overlayfs view) by the store while it is open.
    opened = open_store(store)
    try:
        path = await opened.result(result)
        assert path is not None, result
        rootfs = path / "rootfs"
        stem = PLATFORM.image.replace("/", "_").replace(":", "_")
        images.mkdir()
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf",
                        str(images / f"{stem}.tar"), "."], check=True, timeout=HANG_GUARD)
    finally:
        opened.close()
    # As a container runtime would give user opam (the builder sets no HOME of its own).
    (images / f"{stem}.env").write_text(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"HOME={HOME}\n")


async def test_an_opam_platform_builds_against_a_local_opam_repository(
        tmp_path: Path, ocaml_store: str) -> None:
    images = tmp_path / "images"
    await build_image(ocaml_store, tmp_path / "image", images)
    project = tmp_path / "shout"
    for name, text in PROJECT_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    repo = Repo(project)
    await repo.git("init", "--quiet", "--initial-branch", "main")
    await repo.commit(None, {})
    state = tmp_path / "var"
    ci = load_pipeline(PIPELINE_FILE, [
        "--repo", str(project), "--store", ocaml_store, "--image-dir", str(images),
        "--platforms", PLATFORM.name, "--opam-repository", REPOSITORY])
    async with p.Engine(ci, state_dir=state):
        status = await final_status(state, repo, "main", await head(repo, "main"))
    jobs = jobs_of(status)
    assert status["result"] == "passed", status
    build_log = log_of(state, jobs[PLATFORM.name])
    assert jobs[PLATFORM.name]["state"] == "passed", build_log
    # opam installed the library from its file:// archive, and the project's test used it.
    assert "greet.1.0" in build_log, build_log
    assert "shout: HELLO, OPAM!" in build_log, build_log
    assert {name: job["state"] for name, job in jobs.items()} == {
        "(analysis)": "passed", PLATFORM.name: "passed",
        f"{PLATFORM.name} (lint-opam)": "passed", f"{PLATFORM.name} (lint-fmt)": "skipped",
        f"{PLATFORM.name} (lint-doc)": "skipped"}, status
    assert jobs[f"{PLATFORM.name} (lint-doc)"]["reason"] == \
        f"odoc is not available on {PLATFORM.name}"
    assert status["result"] == "passed", status
