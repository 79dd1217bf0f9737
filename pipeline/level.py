"""Risk levels of jobs, compared against the `--confirm` threshold."""

from __future__ import annotations

import enum


class Level(enum.IntEnum):
    """How much harm a job could do; jobs at or above the confirmation threshold wait for a person.

    Levels are ordered, so ``Level.DANGEROUS > Level.AVERAGE``. ``str(level)`` gives the name used
    on the command line and in the web UI (``"mostly-harmless"``); :meth:`parse` reads it back.
    """

    HARMLESS = 0
    MOSTLY_HARMLESS = 1
    AVERAGE = 2
    ABOVE_AVERAGE = 3
    DANGEROUS = 4

    def __str__(self) -> str:
        """Return the user-facing name, e.g. ``"above-average"``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> Level:
        """Read a level name such as ``"mostly-harmless"``.

        Case is ignored and ``_`` is accepted for ``-``, so ``"MOSTLY_HARMLESS"`` also works.
        Raises ValueError naming the valid levels for anything else.
        """
        wanted = text.strip().lower().replace("_", "-")
        for level in cls:
            if str(level) == wanted:
                return level
        valid = ", ".join(str(level) for level in cls)
        raise ValueError(f"unknown level {text!r}: expected one of {valid}")
