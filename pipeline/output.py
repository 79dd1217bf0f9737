"""The outcome of a node: a value, an error, or still in progress.

Outputs are immutable and compare by content: the engine stops propagating a change when a node's
new output equals its old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")

ActiveState = Literal["ready", "running", "waiting-for-confirmation"]


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    """A successful output carrying `value`."""

    value: T


@dataclass(frozen=True, slots=True)
class Failed:
    """An error. `origin` is the uid of the node where it arose; other nodes only pass it on."""

    message: str
    origin: int = -1


@dataclass(frozen=True, slots=True)
class Active:
    """Not finished yet: a job is queued, running or waiting for confirmation at node `origin`."""

    state: ActiveState
    origin: int = -1


Output = Ok[Any] | Failed | Active
