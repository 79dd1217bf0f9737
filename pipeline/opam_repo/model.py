"""What the analysis of a pull request to an opam repository finds, as plain values: the
changed packages and their kinds, the lint messages, and the error that stopped the analysis.

`PrAnalysis.to_json` is the object `--analyse-only` prints for each pull request:

    {"pr": BRANCH, "head": SHA,
     "packages": [{"package": "NAME.VERSION", "kind": KIND}],
     "lint": [{"file": PATH, "rule": ID, "message": TEXT}],
     "error": null | TEXT}

`to_value` / `from_value` keep everything (also what only the builds need), for caching.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

Kind = Literal["new-package", "new-release", "deleted", "unavailable", "insignificant",
               "significant"]
KINDS: tuple[Kind, ...] = get_args(Kind)
BUILT_KINDS: frozenset[Kind] = frozenset({"new-package", "new-release", "significant"})
"""The kinds of change that are built: a deleted, unavailable or insignificant one is not."""


@dataclasses.dataclass(frozen=True)
class PackageChange:
    """A package version a pull request changes: `package` is "NAME.VERSION"; `has_tests`
    (for those built) when its opam file has `{with-test}` dependencies or a `run-test`
    field, so that its tests are run."""

    package: str
    kind: Kind
    has_tests: bool = False

    @property
    def name(self) -> str:
        """The package's name: "foo" of "foo.1.0"."""
        return self.package.split(".", 1)[0]

    @property
    def version(self) -> str:
        """The package's version: "1.0" of "foo.1.0"."""
        return self.package.split(".", 1)[1]

    @property
    def built(self) -> bool:
        """Whether the change is built (a new package or release, or a significant change)."""
        return self.kind in BUILT_KINDS

    def to_json(self) -> dict[str, str]:
        """Its entry in `--analyse-only`'s output."""
        return {"package": self.package, "kind": self.kind}


@dataclasses.dataclass(frozen=True)
class LintMessage:
    """One lint failure: the file (relative to the repository's root), the rule's id and what
    is wrong."""

    file: str
    rule: str
    message: str

    def to_json(self) -> dict[str, str]:
        """Its entry in `--analyse-only`'s output."""
        return {"file": self.file, "rule": self.rule, "message": self.message}


@dataclasses.dataclass(frozen=True)
class PrAnalysis:
    """A pull request `pr` (its branch) at commit `head`, merged into the base commit `base`:
    the packages it changes (sorted by package), its lint messages, and `error` when it could
    not be analysed (a merge conflict, a path outside the repository's layout)."""

    pr: str
    head: str
    base: str
    packages: tuple[PackageChange, ...] = ()
    lint: tuple[LintMessage, ...] = ()
    error: str | None = None

    @property
    def passed(self) -> bool:
        """No error and no lint message."""
        return self.error is None and not self.lint

    @property
    def to_build(self) -> tuple[PackageChange, ...]:
        """The changes that are built, in order."""
        return tuple(change for change in self.packages if change.built)

    def to_json(self) -> dict[str, Any]:
        """The object `--analyse-only` prints (see the module's docstring)."""
        return {"pr": self.pr, "head": self.head,
                "packages": [change.to_json() for change in self.packages],
                "lint": [message.to_json() for message in self.lint],
                "error": self.error}

    def to_value(self) -> dict[str, Any]:
        """Everything, as JSON-compatible values (`from_value` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> PrAnalysis:
        """The analysis `to_value` gave; raises ValueError for a value of another shape."""
        try:
            packages = tuple(PackageChange(str(c["package"]), c["kind"], bool(c["has_tests"]))
                             for c in value["packages"])
            if any(change.kind not in KINDS for change in packages):
                raise ValueError("unknown kind")
            return cls(str(value["pr"]), str(value["head"]), str(value["base"]), packages,
                       tuple(LintMessage(str(m["file"]), str(m["rule"]), str(m["message"]))
                             for m in value["lint"]),
                       None if value["error"] is None else str(value["error"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a PrAnalysis value: {error}") from None
