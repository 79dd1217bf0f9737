"""The analysis of a pull request to an opam repository: merge, classify, lint (no build).

`analyse` merges the head into the base (`merge.open_merge`: a scratch clone, the repository
untouched), maps `git diff --name-only BASE MERGED` onto package versions and classifies each
(`classify`), then lints those that are new, changed or made unavailable (`lint`: the
repository's rules and `opam lint`). Only what is needed is read from git: the touched versions'
opam files (one `git cat-file --batch` for the base, one for the merge), their directories'
entries and the base's package names (`git ls-tree`), so a one-package pull request on the
35,000-file opam-repository takes a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.ocaml.opam_syntax import OpamSyntaxError, parse
from pipeline.opam_repo import classify as C
from pipeline.opam_repo import lint as L
from pipeline.opam_repo.merge import MergeConflict, MergedTree, open_merge
from pipeline.opam_repo.model import LintMessage, PackageChange, PrAnalysis

LINTED_KINDS = frozenset({"new-package", "new-release", "significant", "unavailable"})
"""The kinds of change that are linted: a deleted or insignificant one is not."""


def _text(contents: bytes | None) -> str | None:
    # An opam file is UTF-8; anything else still parses as far as it can, and opam lint
    # reports the encoding.
    return None if contents is None else contents.decode("utf-8", errors="replace")


def _lint(merged: MergedTree, touched: list[C.Touched], changes: list[PackageChange],
          texts: dict[str, str | None], base_names: frozenset[str]) -> list[LintMessage]:
    """The lint messages of the linted `changes`: the rules' in order of package, then
    `opam lint`'s."""
    linted = [t for t, c in zip(touched, changes, strict=True) if c.kind in LINTED_KINDS]
    entries = merged.entries(merged.tree, [t.directory for t in linted])
    messages: list[LintMessage] = []
    for target in linted:
        text = texts[target.opam_path]
        assert text is not None  # a linted kind has an opam file
        try:
            document = parse(text, path=target.opam_path)
        except OpamSyntaxError as error:
            messages.append(LintMessage(target.opam_path, "opam-syntax", str(error)))
            continue
        messages.extend(L.check(L.Target(
            target.name, target.version, target.opam_path, document,
            tuple(entries[target.directory]), target.name not in base_names, base_names)))
    messages.extend(L.opam_lint({t.opam_path: (texts[t.opam_path] or "").encode()
                                 for t in linted}))
    return messages


def analyse(repo: str | Path, base: str, head: str, *, pr: str, base_name: str,
            lint: bool = True) -> PrAnalysis:
    """Analyse the pull request `pr` (its branch) whose head is the commit `head`, against the
    commit `base` named `base_name` (for the conflict message), both in the git repository
    `repo` (bare or not; left unmodified).

    The pull request's own faults become the result's `error`, with nothing else known: a
    merge conflict ("Cannot merge to BASE_NAME - please rebase!"), a path outside the layout.
    `lint=False` skips the rules and `opam lint`. Raises `merge.GitError` for trouble with the
    repository itself (not a repository, a missing commit) and `lint.OpamLintError` when
    `opam lint` cannot be run.
    """
    try:
        with open_merge(repo, base, head, base_name=base_name) as merged:
            try:
                touched = C.touched_packages(merged.changed_paths())
                paths = [t.opam_path for t in touched]
                base_texts = merged.read(base, paths)
                merged_texts = {path: _text(contents)
                                for path, contents in merged.read(merged.tree, paths).items()}
                base_names = frozenset(name.removesuffix("/") for name
                                       in merged.entries(base, ["packages"])["packages"])
                changes = [C.classify(t, _text(base_texts[t.opam_path]),
                                      merged_texts[t.opam_path],
                                      name_on_base=t.name in base_names) for t in touched]
            except C.LayoutError as error:
                return PrAnalysis(pr, head, base, error=str(error))
            messages = _lint(merged, touched, changes, merged_texts, base_names) if lint else []
    except MergeConflict as conflict:
        return PrAnalysis(pr, head, base, error=str(conflict))
    return PrAnalysis(pr, head, base, tuple(changes), tuple(messages))
