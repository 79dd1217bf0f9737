"""The form of a build's log: what the builder writes for each step, and how a reader finds it.

For each step the builder writes a header (`WORKDIR: OP`, over several lines for a long op), the
step's output (replayed from the store for a cached step), then `---> using "<id>" from cache` or
`---> saved as "<id>"`; a failed step has no such last line. The builder's own lines (headers
and outcomes) each end with `MARK` just before their newline and start on a line of their own;
a step's output never contains `MARK` (the builder shows it as `MARK_SHOWN`), so a reader of the
log (the web UI's job page) can tell the builder's lines from anything a command prints.
Terminals do not show the byte, and `str.strip` removes it. Logs written before the marker
existed have none: a reader shows them as plain lines.
"""

from __future__ import annotations

import re

MARK = b"\x1f"
"""Ends each line the builder writes itself (ASCII unit separator: invisible on a terminal)."""
MARK_SHOWN = "\u241f".encode()
"""What a step's output shows instead of `MARK` (the visible symbol for it, "␟")."""

_OUTCOME = re.compile(r'---> (?:(using)|saved as) "([0-9a-f]{64})"(?(1) from cache)')


def outcome(step_id: str, cached: bool) -> str:
    """The line (without its mark) that ends a step: found in the store, or built and saved."""
    return f'---> using "{step_id}" from cache' if cached else f'---> saved as "{step_id}"'


def parse_outcome(text: str) -> tuple[str, bool] | None:
    """The step id and whether it was cached, if `text` (a marked line, without its mark) is
    the end of a step; None if it is a header."""
    match = _OUTCOME.fullmatch(text)
    return (match[2], match[1] is not None) if match else None
