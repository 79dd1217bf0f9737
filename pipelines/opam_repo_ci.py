"""CI for an opam package repository, in the style of opam-repo-ci: every branch other than the
base is a pull request, merged into the base, analysed, linted and built.

    pipeline run pipelines/opam_repo_ci.py -- [--repo PATH]... [--remote URL]... [--base BRANCH]
        [--platforms NAMES] [--store KIND:PATH] [--fetcher F | --image-dir DIR]
        [--cluster tcp://HOST:PORT] [--demo] [--demo-dir DIR] [--analyse-only]
        [--github-token-file FILE [--github-repo OWNER/NAME]] [--public-url URL]

Per pull request (its head, and the base branch's head it is merged into):

- the **analysis** job merges the head into the base in a scratch clone (a conflict fails it
  with "Cannot merge to BASE - please rebase!") and classifies each changed package version:
  new package, new release, deleted, unavailable (`available: false`), insignificant (only
  fields that cannot change a build) or significant (`pipeline.opam_repo.classify`); a path under
  `packages/` outside the layout fails it, naming the path;
- the **lint** job runs `opam lint` and the repository's publication rules
  (`pipeline.opam_repo.lint`) on the changed files, and fails listing each message (file, rule,
  message);
- per new or significant package and platform: the **build** job (`opam reinstall` of exactly
  that version in the merged repository), then, once it passed, in parallel: **test** (when the
  package has `{with-test}` dependencies or `run-test`), **lower-bounds** (the solver preferring
  the oldest versions) and **revdeps**, which lists the reverse dependencies with `opam list`
  (those that can be installed with the package, recursive, and those needing it for their
  tests; the package itself and the pull request's other new versions left out) and builds each
  (`revdep` jobs, drawn as one collapsed box per package and platform).
  The specs are `pipeline.opam_repo.specs`'; the base branch moving builds every pull request
  again, merged into the new base.

The pull request's result is OCaml CI's (`pipeline.ocaml.status`), except that nothing to build
(an insignificant change, a deletion) is "passed": its status files are under
`STATE_DIR/opam-repo-ci/status/<repo>/`, its pages under `/opam` (repositories, pull requests, a
pull request's history, a commit's jobs with rebuild buttons for builders), and with
`--github-token-file` it sets two GitHub commit statuses on the head: `opam-ci` (the result) and
`opam-repo-ci (linter)` (the lint job's). A pull request whose result is not passed fails its
node, so that `--once` exits 1 when any fails. A deleted branch's jobs are cancelled.

`--analyse-only` (with `--once`, as opam-repo-ci-local's flag) merges, classifies and lints each
pull request, prints one JSON object per pull request on a line of its own

    {"pr": BRANCH, "head": SHA, "packages": [{"package": "NAME.VERSION", "kind": KIND}],
     "lint": [{"file": PATH, "rule": ID, "message": TEXT}], "error": null | TEXT}

and builds nothing; a pull request with an error or a lint message fails its node.

`--demo` makes the sample opam repository of `pipeline.opam_repo.sample` in `--demo-dir`
(default `var/opam-repository`) unless one is there, with its three pull requests
(`new-release` passes, `lint-error` fails its lint, `build-failure` fails its build), and
watches it. Sources come from each package's `url`: the sample's are `file://` archives kept in
the repository itself, which the builds copy into the image.

The default platform is `debian-12-4.13` (Debian 12's OCaml 4.13.1, which the sample repository's
packages are written for). The default store is `overlayfs:opam-store` (under the state
directory), or rsync without overlayfs; with `--cluster` the builds go to the cluster's pool of
their platform's architecture (`linux-x86_64`, `linux-arm64`, ...), each worker fetching and
merging the two commits itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pipeline as p
from pipeline.ocaml import build_job as BJ
from pipeline.ocaml import failures as F
from pipeline.ocaml import options as O
from pipeline.ocaml import platforms as P
from pipeline.ocaml import report as R
from pipeline.ocaml import status as St
from pipeline.ocaml import web as ocaml_web
from pipeline.opam_repo import analysis as RA
from pipeline.opam_repo import sample
from pipeline.opam_repo import specs as RS
from pipeline.opam_repo.model import PackageChange, PrAnalysis
from pipeline.output import Active, Failed, NodeState, Ok, Output
from pipeline.primitives import git, git_webhook
from pipeline.primitives.git import Commit

CI = "opam-repo-ci"
"""The name of this CI: its status files' directory."""
JOB_OP = "opam-repo-job"
ANALYSIS_FORMAT = 1
"""The shape of the analysis and lint jobs' values; part of their keys (see OCaml CI's)."""
LINT = "(lint)"
"""The lint job's name in the status file."""

web_links = [("/opam", "opam-repo-ci")]
"""The nav bar link `pipeline run` adds to the web UI."""


def web_routes(state_dir: Path) -> list[Any]:
    """The opam-repo-ci pages, read from the status files under `state_dir`, and the git
    webhook (`POST /webhooks/git`, on with `--webhook-secret-file`)."""
    return [*ocaml_web.routes(state_dir, site=ocaml_web.OPAM_REPO_CI), *git_webhook.routes()]


# A pull request

@dataclasses.dataclass(frozen=True)
class PullRequest:
    """A pull request's head and the base it is merged into, both fetched into one local
    repository."""

    base: Commit
    head: Commit

    @property
    def base_name(self) -> str:
        """The base branch's name, as a conflict's message gives it."""
        return self.base.branch or self.base.ref

    @property
    def merge(self) -> BJ.Merge:
        """The head merged into the base: what every build's context is."""
        return BJ.Merge(self.head.repo, self.base.hash, self.head.hash, self.base_name)



def _pp_pr(pr: PullRequest) -> str:
    return f"{pr.head.short} into {pr.base_name} {pr.base.short}"


def _analysis_digest(pr: PullRequest) -> str:
    # The commits', not the branches': the same head on two branches is analysed once.
    return p.digest((ANALYSIS_FORMAT, pr.base.hash, pr.head.hash, pr.base_name))


class AnalysisFailed(F.Reason):
    """The pull request cannot be analysed (a conflict, a path outside the layout) or linted;
    the message says why."""


async def _analysis(job: p.Job, pr: PullRequest, *, lint: bool) -> PrAnalysis:
    """`analyse` of `pr` (merged, classified and, with `lint`, linted) in a thread, its
    changes and lint messages logged."""
    job.log(f"Merging {pr.head} into {pr.base_name} at {pr.base.short}")
    analysis = await asyncio.to_thread(RA.analyse, pr.head.repo, pr.base.hash, pr.head.hash,
                                       pr=pr.head.branch or pr.head.ref,
                                       base_name=pr.base_name, lint=lint)
    for change in analysis.packages:
        job.log(f"{change.package}: {change.kind}")
    if not analysis.packages and analysis.error is None:
        job.log("No package changed")
    for message in analysis.lint:
        job.log(f"{message.file}: [{message.rule}] {message.message}")
    return analysis


@p.builder("opam-repo-analysis", auto_cancel=True, pp=_pp_pr,
           key_digest=_analysis_digest)
async def _analyse(job: p.Job, pr: PullRequest) -> dict[str, Any]:
    """The head's message, author and date and the classification of its changes
    (`PrAnalysis.to_value`); fails with the analysis's error."""
    analysis = await _analysis(job, pr, lint=False)
    if analysis.error is not None:
        raise AnalysisFailed(analysis.error)
    info = St.CommitInfo(*await git.describe(pr.head))
    return {"job_id": job.id, "analysis": analysis.to_value(),
            "commit": dataclasses.asdict(info)}


@p.builder("opam-repo-lint", auto_cancel=True, pp=_pp_pr,
           key_digest=_analysis_digest)
async def _lint(job: p.Job, pr: PullRequest) -> dict[str, Any]:
    """The lint of the pull request's changed files; fails with the number of messages and the
    first (each is in the log), or with the analysis's error."""
    analysis = await _analysis(job, pr, lint=True)
    if analysis.error is not None:
        raise AnalysisFailed(analysis.error)
    if analysis.lint:
        first = analysis.lint[0]
        more = f" (and {len(analysis.lint) - 1} more)" if len(analysis.lint) > 1 else ""
        raise AnalysisFailed(f"{first.file}: {first.message}{more}")
    job.log("Lint passed")
    return {"job_id": job.id}


@p.builder("opam-repo-analyse-only", auto_cancel=True, pp=_pp_pr,
           key_digest=_analysis_digest)
async def _analyse_only(job: p.Job, pr: PullRequest) -> dict[str, Any]:
    """The whole analysis, lint included, as a value (`PrAnalysis.to_value`): the pull
    request's faults are in it, not failures of the job."""
    return (await _analysis(job, pr, lint=True)).to_value()


# The package jobs

@dataclasses.dataclass(frozen=True)
class PackageJob:
    """One job of a package version on a platform: `kind` is "build", "test",
    "lower-bounds", "revdeps" (listing them) or "revdep" (building `revdep` with it).
    `exclude` are the versions a revdeps listing leaves out (the pull request's other new
    ones). `place` says where it builds: not part of its key (a build is the same anywhere)
    but for the store and fetcher."""

    pr: PullRequest
    platform: str
    package: str
    kind: str
    spec: str
    place: BJ.Place
    revdep: str | None = None
    exclude: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Its name in the status file and diagram: "foo.1.0 debian-12-4.13 build"."""
        name = f"{self.package} {self.platform} {self.kind}"
        return f"{name} {self.revdep}" if self.revdep is not None else name

    @property
    def label(self) -> str:
        """Its name in the diagram, where its platform is its group's: "foo.1.0 build"."""
        return self.revdep if self.revdep is not None else f"{self.package} {self.kind}"

    @property
    def digest(self) -> str:
        """Its key's digest: the commits, never the branches."""
        return p.digest((self.pr.base.hash, self.pr.head.hash, self.platform, self.package,
                         self.kind, self.revdep, self.exclude, self.spec, self.place.store,
                         self.place.fetcher))

    @property
    def status_spec(self) -> St.JobSpec:
        """How the status file names it and finds its runs."""
        return St.JobSpec(self.name, self.kind, self.platform, JOB_OP, self.digest,
                          package=self.package, revdep=self.revdep)


@p.builder(JOB_OP, auto_cancel=True, starts_job=True,
           pp=lambda key: f"{key.pr.head.short} {key.name}", key_digest=lambda key: key.digest)
async def _run_job(job: p.Job, key: PackageJob) -> dict[str, Any]:
    """Build `key`'s spec on the merged repository: `{"job_id", "result"}`, plus `"revdeps"`
    (the versions listed) for a revdeps job; fails as `build_job.run_spec` does."""
    if key.place.cluster is None:
        await BJ.start(job)
    if key.kind != "revdeps":
        return {"job_id": job.id, "result": await BJ.run_spec(job, key.spec, key.pr.merge,
                                                               key.place)}
    output = bytearray()
    result = await BJ.run_spec(job, key.spec, key.pr.merge, key.place, log=output.extend)
    revdeps = RS.parse_revdeps(output.decode(errors="replace"), key.package, key.exclude)
    job.log(f"{len(revdeps)} reverse dependencies: {', '.join(revdeps) or 'none'}")
    return {"job_id": job.id, "result": result, "revdeps": revdeps}


JobOutputs = list[tuple[St.JobSpec, Output]]
"""Jobs as the status needs them: how to find each, and its output."""

_AFTER_BUILD = "the build failed"


def _blocked(spec: St.JobSpec, build: Output) -> tuple[St.JobSpec, Output]:
    """A job that waits for the build: pending while it runs, skipped (no job ran) once it
    failed."""
    if isinstance(build, Failed):
        return spec, Ok({"skipped": _AFTER_BUILD})
    return spec, Active(NodeState.PENDING)


def package_jobs(pr: PullRequest, change: PackageChange, platform: P.Platform,
                 place: BJ.Place, exclude: tuple[str, ...]) -> p.Term[JobOutputs]:
    """The jobs of one package version on one platform: its build, then its tests (if it has
    any), its lower bounds, and its reverse dependencies listed and built."""
    package = change.package

    def key(kind: str, spec: str, revdep: str | None = None) -> PackageJob:
        return PackageJob(pr, platform.name, package, kind, spec, place, revdep,
                          exclude if kind == "revdeps" else ())

    build_key = key("build", RS.build_spec(platform, package, "build"))
    build = _run_job(p.const(build_key, label="build spec"), label=build_key.label)
    after = [key(kind, RS.build_spec(platform, package, kind))
             for kind in (("test",) if change.has_tests else ()) + ("lower-bounds",)]
    listing = key("revdeps", RS.revdeps_spec(platform, package))
    gated = {job: _run_job(build.map(lambda _, job=job: job, label=f"{job.kind} spec"),
                           label=job.label) for job in (*after, listing)}

    def revdep_jobs(value: dict[str, Any]) -> p.Term[JobOutputs]:
        keys = [key("revdep", RS.revdep_spec(platform, package, name), name)
                for name in value["revdeps"]]
        states = [p.state(_run_job(p.const(job, label="revdep spec"), label=job.label))
                  for job in keys]
        return p.all(*states, label="revdep builds").map(
            lambda outputs: [(job.status_spec, output)
                             for job, output in zip(keys, outputs, strict=True)],
            label="revdep states")

    revdeps = p.collapse("revdeps", f"{package} {platform.name}", input=gated[listing],
                         output=gated[listing].bind(revdep_jobs, label="revdeps"))

    def outputs(values: list[Any]) -> JobOutputs:
        build_output, *gated_outputs, revdep_output = values
        jobs = [(build_key.status_spec, build_output)]
        for job, output in zip(gated, gated_outputs, strict=True):
            jobs.append((job.status_spec, output) if isinstance(build_output, Ok)
                        else _blocked(job.status_spec, build_output))
        if isinstance(revdep_output, Ok):
            jobs += revdep_output.value
        return jobs

    return p.all(p.state(build), *(p.state(term) for term in gated.values()),
                 p.state(revdeps), label=f"{package} {platform.name}").map(
        outputs, label="job states")


def pr_jobs(pr: PullRequest, analysis: PrAnalysis, platforms: list[P.Platform],
            place: BJ.Place) -> p.Term[JobOutputs]:
    """Every package job of the pull request: each built change on each platform."""
    new = tuple(change.package for change in analysis.to_build
                if change.kind in ("new-package", "new-release"))
    per_package = [
        package_jobs(pr, change, platform,
                     dataclasses.replace(place, platform=platform.platform),
                     tuple(name for name in new if name != change.package))
        for change in analysis.to_build for platform in platforms]
    return p.all(*per_package, label="packages").map(
        lambda lists: [job for jobs in lists for job in jobs], label="package states")


# The pull request's status

def _lint_value(status: St.CommitStatus) -> dict[str, Any]:
    """The GitHub status `opam-repo-ci (linter)`: the lint job's state."""
    lint = next((job for job in status.jobs if job.name == LINT), None)
    state = lint.state if lint is not None else "pending"
    github = {"passed": "success", "failed": "failure"}.get(state, "pending")
    description = {"passed": "Passed", "failed": f"Failed: {lint.reason if lint else ''}"
                   }.get(state, "Running")
    return {"state": github, "description": description}


def publication(head: Commit, pr: PullRequest, analysis: Output, lint: Output, jobs: Output,
                ) -> St.Publication:
    """The status of the pull request whose head is `head` (as its monitor saw it: its
    repository names the status files, where `pr`'s is the fetched one's) from the outputs of
    its analysis, lint and package jobs; nothing to build is passed."""
    digest = _analysis_digest(pr)
    first = [(St.JobSpec(St.ANALYSIS, "analysis", None, "opam-repo-analysis", digest), analysis),
             (St.JobSpec(LINT, "lint", None, "opam-repo-lint", digest), lint)]
    return R.publication(head, first, jobs, builds_required=False)


STATUSES = {"opam-ci": R.ocaml_github_value, "opam-repo-ci (linter)": _lint_value}
"""The GitHub commit statuses set on a pull request's head, by context."""


def _pull_request(base: p.Term[Commit], head: p.Term[Commit]) -> p.Term[PullRequest]:
    return p.pair(base, git.fetch(head)).map(lambda pair: PullRequest(*pair), label="merge")


def pull_request(base: p.Term[Commit], head: p.Term[Commit], platforms: list[P.Platform],
                 place: BJ.Place, github: R.GitHub | None, public_url: str | None,
                 ) -> p.Term[str]:
    """The jobs of one pull request (`head`, to merge into the fetched `base`), its status
    files and GitHub statuses, and its result (failing unless passed)."""
    pr = _pull_request(base, head)
    analysed = _analyse(pr, label="analysis")

    def jobs(inputs: tuple[PullRequest, dict[str, Any]]) -> p.Term[JobOutputs]:
        request, value = inputs
        return pr_jobs(request, PrAnalysis.from_value(value["analysis"]), platforms, place)

    states = p.all(p.state(analysed), p.state(_lint(pr, label="lint")),
                   p.state(p.pair(pr, analysed).bind(jobs, label="packages")),
                   label="job states")
    status = p.pair(p.pair(head, pr), states).map(
        lambda pair: publication(*pair[0], *pair[1]), label="result")
    return R.report(head, status, ci=CI, github=github, public_url=public_url,
                    site=ocaml_web.OPAM_REPO_CI, statuses=STATUSES)


def analyse_only(base: p.Term[Commit], head: p.Term[Commit]) -> p.Term[str]:
    """`--analyse-only` for one pull request: its analysis printed as one JSON line (see the
    module's docstring); fails unless it has neither an error nor a lint message."""

    def report(value: dict[str, Any]) -> str:
        analysis = PrAnalysis.from_value(value)
        # Printed here, once per analysis: this line is what `--analyse-only` is run for.
        print(json.dumps(analysis.to_json()), flush=True)
        if analysis.error is not None:
            raise AnalysisFailed(analysis.error)
        if analysis.lint:
            count, first = len(analysis.lint), analysis.lint[0]
            raise AnalysisFailed(f"{count} lint {'message' if count == 1 else 'messages'}, "
                                 f"the first: {first.file}: {first.message}")
        return "passed"

    return _analyse_only(_pull_request(base, head), label="analysis").map(
        report, label="analysis result")


# Options

def parse_args(args: list[str]) -> argparse.Namespace:
    """The options; exits with status 2 on a usage error."""
    parser = argparse.ArgumentParser(prog="opam_repo_ci.py",
                                     description=__doc__.split("\n")[0])
    O.add_sources(parser, what="each branch but the base is a pull request")
    parser.add_argument("--base", default="master", metavar="BRANCH",
                        help="the branch pull requests are merged into (default: master)")
    # Debian 12's OCaml (4.13.1), which the sample repository's packages are written for.
    O.add_builds(parser, store="opam-store", platforms=[P.PLATFORMS["debian-12-4.13"]])
    parser.add_argument("--analyse-only", action="store_true",
                        help="merge, classify and lint each pull request, print one JSON line"
                             " per pull request, and build nothing (use with --once)")
    O.add_demo(parser, what="a sample opam repository with three pull requests",
               directory="var/opam-repository")
    O.add_github(parser, statuses="statuses opam-ci and opam-repo-ci (linter)")
    return O.parse(parser, args)


def _base_of(base: str, commits: list[Commit]) -> Commit:
    """The head of the branch `base` among `commits`; fails naming the branches there are."""
    found = next((commit for commit in commits if commit.branch == base), None)
    if found is None:
        branches = ", ".join(sorted(c.branch for c in commits if c.branch)) or "none"
        raise ValueError(f"no branch {base} to merge into (branches: {branches}): give --base")
    return found


class PullRequestFailed(F.Reason):
    """A pull request's result is not passed; the message says why."""


def named(head: p.Term[Commit], result: p.Term[str]) -> p.Term[str]:
    """`result` again, as one node labelled with the pull request's branch, so that `--once`
    prints one line per pull request: its state and, for one that failed, why."""
    outcome = p.catch(result)

    def check(output: Ok[str] | Failed) -> str:
        if isinstance(output, Failed):
            raise PullRequestFailed(F.shown(output.message))
        return output.value

    return head.bind(lambda commit: outcome.map(check, label=commit.branch or commit.ref),
                     label="pull request")


def repository(heads: p.Term[list[Commit]], options: argparse.Namespace,
               place: BJ.Place) -> p.Term[list[str]]:
    """The pull requests of one repository (every branch but the base), each merged into the
    base's head."""
    base = git.fetch(heads.map(lambda commits: _base_of(options.base, commits),
                               label=f"{options.base} head"))
    github = O.github(options)

    def per_pr(head: p.Term[Commit]) -> p.Term[str]:
        if options.analyse_only:
            return named(head, analyse_only(base, head))
        return named(head, pull_request(base, head, options.platform_list, place, github,
                                        options.public_url))

    pulls = heads.map(lambda commits: [commit for commit in commits
                                       if commit.branch not in (None, options.base)],
                      label="pull requests")
    return p.list_map(per_pr, pulls, key=lambda commit: commit.ref, label="pull requests")


def _demo(directory: Path) -> Path:
    """The sample repository with its demo pull requests at `directory`, made unless there is
    one already (so that a restart keeps the user's commits)."""
    if not (directory / ".git").exists():
        sample.make_demo(directory)
    return directory


def pipeline(args: list[str]) -> p.Term[list[list[str]]]:
    """The CI of every pull request of the repositories given by `args`."""
    options = parse_args(args)
    repos = list(options.repo)
    if options.demo:
        repos.append(str(_demo(Path(options.demo_dir).absolute())))
    place = BJ.Place(O.store(options), O.fetcher(options), options.cluster)
    return p.all(*(repository(heads, options, place) for heads in O.heads(options, repos)),
                 label="repositories")
