"""Measure opam-repo-ci's analysis and revdeps listing on a generated opam repository.

    python benchmarks/opam_repo_ci.py --json [--packages 5000] [--versions 7] [--seed 16]
        [--opam-repository GIT_DIR]

Generates (in a temporary directory, from a fixed seed) a git opam repository of PACKAGES
packages x VERSIONS versions with a power-law dependency graph: 50 core libraries depend on one
another, every other package depends on one to four of them, chosen with weights falling as a
power of their rank, and sometimes on an earlier non-core package; the library `target` is
depended on by about a fifth of the non-core packages (over 1,000) and by no core library. Then
it times:

- `analyse` (merge + classify + lint, `opam lint` included; no build) of pull requests adding a
  new release of 1, 50 and 500 packages (the median of 5 runs, 3 for 500);
- listing the reverse dependencies of `target` with `specs.revdeps_commands` (both `opam list`
  commands, one after the other, as the revdeps job runs them) with the host's opam, on an
  opam root initialised in the temporary directory on a checkout of the repository, with an
  empty switch: only the listing is timed, after `opam init` and the switch's creation (whose
  times are given apart);
- the peak memory (`ru_maxrss`) of this process and of its children.

With `--opam-repository`, a git directory holding ocaml/opam-repository, it also clones that
(`--shared`) and measures the same for a one-package pull request (a new release of `fmt`) and
the revdeps listing of `fmt`'s latest version. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.opam_repo.analysis import analyse
from pipeline.opam_repo.specs import revdeps_commands

CORE = 50
"""The core libraries, depended on with power-law weights."""
TARGET = "target"
"""The library whose reverse dependencies are listed."""
TARGET_SHARE = 0.21
"""The share of non-core packages that depend on `TARGET`."""
ANALYSE_TARGET_S = 1.0
REVDEPS_TARGET_S = 5.0

OPAM = '''opam-version: "2.0"
synopsis: "The {name} library"
description: """
{name} does one thing and does it well; it is generated for the benchmark of
opam-repo-ci's analysis.
"""
maintainer: "Maintainer <maintainer@example.com>"
authors: ["Author One" "Author Two"]
license: "MIT"
homepage: "https://example.com/{name}"
bug-reports: "https://example.com/{name}/issues"
dev-repo: "git+https://example.com/{name}.git"
depends: [
  "ocaml" {{>= "1.0.0"}}
  "dune" {{>= "1.0.0"}}
{depends}]
build: [
  ["dune" "subst"] {{dev}}
  ["dune" "build" "-p" name "-j" jobs "@install" "@runtest" {{with-test}}]
]
url {{
  src: "https://example.com/{name}/{name}-{version}.tbz"
  checksum: "sha256={checksum}"
}}
'''
BASE_OPAM = 'opam-version: "2.0"\nsynopsis: "{synopsis}"\nmaintainer: "m@example.com"\n' \
    'authors: "Author"\nlicense: "MIT"\nhomepage: "https://example.com"\n' \
    'bug-reports: "https://example.com/issues"\ndev-repo: "git+https://example.com/x.git"\n'


def version(index: int) -> str:
    """The `index`th version of every package (0 the oldest)."""
    return f"1.{index}.0"


def package_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct names: `target`, then core libraries, then the rest; no two collide
    even ignoring case, `-` and `_` (they end with their index)."""
    syllables = ["ca", "mel", "lib", "ox", "fmt", "log", "re", "yo", "son", "lwt", "uri",
                 "tls", "cstruct", "base", "zarith", "dream", "irmin", "mirage", "ppx"]
    names = [TARGET]
    for index in range(1, count):
        stem = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        names.append(f"{stem}-{index}")
    return names


def dependencies(rng: random.Random, names: list[str]) -> list[list[str]]:
    """Each package's dependencies (indices into `names` below its own: a DAG)."""
    weights = [1 / rank ** 1.2 for rank in range(1, CORE)]
    graph: list[list[str]] = [[]]
    for index in range(1, len(names)):
        chosen: set[int] = set()
        if index < CORE:
            # Core libraries depend on earlier core ones, never on `target`.
            if index > 1:
                chosen.update(rng.sample(range(1, index), min(index - 1, rng.randint(0, 3))))
        else:
            for _ in range(rng.randint(1, 4)):
                chosen.add(rng.choices(range(1, CORE), weights)[0])
            if rng.random() < TARGET_SHARE:
                chosen.add(0)
            if rng.random() < 0.2:
                chosen.add(rng.randrange(CORE, index))
        graph.append([names[d] for d in sorted(chosen)])
    return graph


def opam_file(rng: random.Random, name: str, release: str, depends: list[str],
              newest_bound: int) -> str:
    """An opam file of `name` at the version `release`, each dependency's lower bound being
    one of its versions up to the `newest_bound`th."""
    lines = "".join(f'  "{d}" {{>= "{version(rng.randrange(newest_bound + 1))}"}}\n'
                    for d in depends)
    return OPAM.format(name=name, version=release, depends=lines,
                       checksum=f"{rng.getrandbits(256):064x}")


def fast_import(repo: Path, commits: list[tuple[str, str | None, dict[str, str]]]) -> None:
    """Write commits (branch, parent branch or None, files by path) with `git fast-import`."""
    chunks: list[bytes] = []
    for mark, (branch, parent, files) in enumerate(commits, start=1):
        message = f"{branch}\n".encode()
        chunks.append(f"commit refs/heads/{branch}\nmark :{mark}\n"
                      f"committer Bench <bench@example.com> 1700000000 +0000\n"
                      f"data {len(message)}\n".encode() + message)
        if parent is not None:
            chunks.append(f"from refs/heads/{parent}\n".encode())
        for path, text in sorted(files.items()):
            data = text.encode()
            chunks.append(f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n")
        chunks.append(b"\n")
    subprocess.run(["git", "-C", str(repo), "fast-import", "--quiet"], input=b"".join(chunks),
                   check=True)


def generate(repo: Path, packages: int, versions: int, seed: int) -> dict[str, Any]:
    """The generated repository at `repo` (branch master, and pr-1, pr-50, pr-500 each adding
    a new release of that many non-core packages); what it holds."""
    rng = random.Random(seed)
    names = package_names(rng, packages)
    graph = dependencies(rng, names)
    files = {"repo": 'opam-version: "2.0"\n'}
    for name in ("ocaml", "dune"):
        for index in range(versions):
            files[f"packages/{name}/{name}.{version(index)}/opam"] = \
                BASE_OPAM.format(synopsis=f"The {name} stand-in")
    for name, depends in zip(names, graph, strict=True):
        for index in range(versions):
            files[f"packages/{name}/{name}.{version(index)}/opam"] = \
                opam_file(rng, name, version(index), depends, index)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "master", str(repo)], check=True)
    commits: list[tuple[str, str | None, dict[str, str]]] = [("master", None, files)]
    touched = rng.sample(range(CORE, packages), 500)
    for size in (1, 50, 500):
        new = {f"packages/{names[i]}/{names[i]}.2.0.0/opam":
               opam_file(rng, names[i], "2.0.0", graph[i], versions - 1)
               for i in touched[:size]}
        commits.append((f"pr-{size}", "master", new))
    fast_import(repo, commits)
    direct = sum(TARGET in depends for depends in graph)
    return {"packages": packages + 2, "versions_per_package": versions,
            "package_versions": (packages + 2) * versions, "files": len(files),
            "target_direct_reverse_dependencies": direct}


def rev(repo: Path, name: str) -> str:
    """The commit `name` (a branch) of `repo`."""
    return subprocess.run(["git", "--git-dir", str(repo), "rev-parse", name], check=True,
                          capture_output=True, text=True).stdout.strip()


def timed(action: Callable[[], object], runs: int) -> dict[str, Any]:
    """`action` run `runs` times: the median and every time, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times]}


def time_analyses(repo: Path, sizes: tuple[int, ...]) -> dict[str, Any]:
    """The timed analyses of the branches `pr-SIZE` against master."""
    base = rev(repo, "master")
    results: dict[str, Any] = {}
    for size in sizes:
        head = rev(repo, f"pr-{size}")
        analysis = analyse(repo, base, head, pr=f"pr-{size}", base_name="master")
        assert analysis.error is None and len(analysis.packages) == size, analysis.to_json()
        results[f"pr_{size}_packages"] = {
            **timed(lambda head=head, size=size: analyse(
                repo, base, head, pr=f"pr-{size}", base_name="master"), 3 if size > 50 else 5),
            "kinds": sorted({change.kind for change in analysis.packages}),
            "lint_messages": len(analysis.lint)}
    return results


def opam_environment(root: Path) -> dict[str, str]:
    """The environment of opam on the opam root `root` (as root, non-interactive)."""
    return {**os.environ, "OPAMROOT": str(root), "OPAMSWITCH": "default", "OPAMYES": "1",
            "OPAMROOTISOK": "1", "OPAMCOLOR": "never", "OPAMNODEPEXTS": "1"}


def run_opam(command: list[str], env: dict[str, str], timeout: float | None = None) -> str:
    """Run an opam command; its output. Raises SystemExit with opam's errors if it fails,
    subprocess.TimeoutExpired after `timeout` seconds (its process group killed: `sh -c`
    leaves opam in a child)."""
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: {out}{err}")
    return out


def time_revdeps(repo: Path, work: Path, package: str, timeout: float) -> dict[str, Any]:
    """Check out master of `repo`, initialise an opam root on it with an empty switch, and time
    the listing of `package`'s reverse dependencies, each command stopped after `timeout`
    seconds (then the listing's time is None)."""
    checkout = work / "checkout"
    checkout.mkdir(parents=True)
    archive = subprocess.Popen(["git", "--git-dir", str(repo), "archive", "master"],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(checkout)], stdin=archive.stdout, check=True)
    archive.wait()
    env = opam_environment(work / "opamroot")
    start = time.perf_counter()
    run_opam(["opam", "init", "--bare", "-n", "--disable-sandboxing", "default",
              str(checkout)], env)
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    run_opam(["opam", "switch", "create", "default", "--empty"], env)
    switch_s = time.perf_counter() - start
    listed: set[str] = set()
    commands: list[dict[str, Any]] = []
    for command in revdeps_commands(package):
        start = time.perf_counter()
        try:
            found = run_opam(["sh", "-c", command], env, timeout).split()
        except subprocess.TimeoutExpired:
            commands.append({"command": command, "seconds": None, "timed_out_after_s": timeout})
            continue
        commands.append({"command": command, "seconds": round(time.perf_counter() - start, 3),
                         "listed": len(found)})
        listed.update(found)
    listed.discard(package)
    done = all(c["seconds"] is not None for c in commands)
    return {"package": package,
            "listing_s": round(sum(c["seconds"] for c in commands), 3) if done else None,
            "commands": commands,
            "reverse_dependencies_listed": len(listed) if done else None,
            "reverse_dependency_packages": len({p.split(".", 1)[0] for p in listed})
                                           if done else None,
            "opam_init_s": round(init_s, 1), "switch_create_s": round(switch_s, 1),
            "timed": "only the two `opam list` commands of revdeps_commands, one after the "
                     "other, after opam init and the creation of an empty switch"}


def real_repository(source: Path, work: Path, timeout: float) -> dict[str, Any]:
    """The one-package analysis and a revdeps listing on a `--shared` clone of the real
    opam-repository at `source`, with a pull request adding a new release of `fmt`."""
    repo = work / "opam-repository.git"
    subprocess.run(["git", "clone", "-q", "--bare", "--shared", str(source), str(repo)],
                   check=True)
    git = ["git", "--git-dir", str(repo)]

    def out(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        return subprocess.run([*git, *args], input=stdin, env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    versions = out("ls-tree", "--name-only", "master", "packages/fmt/").split()
    latest = max(versions, key=lambda path: [int(part) if part.isdigit() else -1
                                             for part in path.rsplit("fmt.", 1)[1].split(".")])
    opam = out("cat-file", "blob", f"master:{latest}/opam")
    blob = out("hash-object", "-w", "--stdin", stdin=opam + "\n# a new release\n")
    index = {**os.environ, "GIT_INDEX_FILE": str(work / "index")}
    out("read-tree", "master", env=index)
    out("update-index", "--add", "--cacheinfo", f"100644,{blob},packages/fmt/fmt.99.0/opam",
        env=index)
    tree = out("write-tree", env=index)
    identity = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
                "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}
    head = out("commit-tree", tree, "-p", "master", "-m", "fmt.99.0", env=identity)
    base = rev(repo, "master")
    analysis = analyse(repo, base, head, pr="fmt", base_name="master")
    files = int(subprocess.run(f"git --git-dir {repo} ls-tree -r master | wc -l", shell=True,
                               check=True, capture_output=True, text=True).stdout)
    result: dict[str, Any] = {
        "source": "a --shared clone of ocaml/opam-repository",
        "commit": base, "files": files,
        "commits": int(out("rev-list", "--count", "master")),
        "pr_1_package": {**timed(lambda: analyse(repo, base, head, pr="fmt",
                                                 base_name="master"), 5),
                         "kinds": [c.kind for c in analysis.packages],
                         "lint_messages": len(analysis.lint)}}
    result["revdeps"] = time_revdeps(repo, work / "real", latest.rsplit("/", 1)[1], timeout)
    return result


def main() -> None:
    """Generate, measure, print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--packages", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=7)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--revdeps-timeout", type=float, default=300,
                        help="seconds each revdeps listing command may take")
    parser.add_argument("--opam-repository", type=Path,
                        help="a git directory of ocaml/opam-repository to measure too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opam-repo-ci-bench-") as scratch:
        work = Path(scratch)
        repo = work / "generated.git"
        start = time.perf_counter()
        generated = generate(repo, args.packages, args.versions, args.seed)
        generated["generate_s"] = round(time.perf_counter() - start, 1)
        analyses = time_analyses(repo, (1, 50, 500))
        revdeps = time_revdeps(repo, work / "generated", f"{TARGET}.{version(args.versions - 1)}",
                               args.revdeps_timeout)
        real = None if args.opam_repository is None else real_repository(
            args.opam_repository, work / "real-opam-repository", args.revdeps_timeout)
    one = analyses["pr_1_packages"]["median_s"]
    listing = revdeps["listing_s"]
    report = {
        "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
        "seed": args.seed, "repository": generated, "analyse": analyses, "revdeps": revdeps,
        "targets": {
            "analyse_1_package_s": {"target": ANALYSE_TARGET_S, "measured": one,
                                    "met": one <= ANALYSE_TARGET_S},
            "revdeps_s": {"target": REVDEPS_TARGET_S, "measured": listing,
                          "met": listing is not None and listing <= REVDEPS_TARGET_S}},
        "peak_rss_mb": {
            "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)},
        "real_opam_repository": real,
    }
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
