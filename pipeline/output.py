"""The outcome of a node (a value, an error, or still in progress) and the state it is drawn in.

Outputs are immutable and compare by content: the engine stops propagating a change when a node's
new output equals its old one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class NodeState(enum.StrEnum):
    """The state of a node, as diagrams colour it and the web UI and metrics count it.

    The values are what the diagrams' data, the web UI's JSON and the metrics' labels show.
    """

    OK = "ok"
    """It has a value."""
    READY = "ready"
    """Its job is queued, waiting for a pool slot."""
    RUNNING = "running"
    """Its job is running."""
    WAITING_FOR_CONFIRMATION = "waiting-for-confirmation"
    """Its job's risk level is at or above the threshold: it waits for a person."""
    FAILED = "failed"
    """It failed here (the error originated at this node)."""
    BLOCKED = "blocked"
    """An input failed: it cannot run."""
    PENDING = "pending"
    """An input is not finished yet."""

    @property
    def severity(self) -> int:
        """Its rank from best (ok) to worst (failed): a group drawn as one box shows the state
        of its worst member."""
        return _BEST_TO_WORST.index(self)


_BEST_TO_WORST = (NodeState.OK, NodeState.PENDING, NodeState.BLOCKED, NodeState.READY,
                  NodeState.RUNNING, NodeState.WAITING_FOR_CONFIRMATION, NodeState.FAILED)


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
    """Not finished yet: a job is queued, running or waiting for confirmation at node `origin`.

    `state` is READY, RUNNING or WAITING_FOR_CONFIRMATION.
    """

    state: NodeState
    origin: int = -1


Output = Ok[Any] | Failed | Active
