"""Golden files: compare text with `tests/expected/...`, or rewrite it with UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def assert_golden(path: Path, actual: str) -> None:
    """`actual` equals the content of `path`; with UPDATE_GOLDEN=1, `path` is rewritten instead
    (read the new file by eye before committing it)."""
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run with UPDATE_GOLDEN=1 to create it")
    assert actual == path.read_text(), f"differs from {path} (UPDATE_GOLDEN=1 rewrites)"
