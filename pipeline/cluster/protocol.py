"""What the cluster's three parts say to each other, over Dask's own channels only.

- A client submits a build as the Dask task `run_build(request)` (`pipeline.cluster.worker`),
  with key `task_key(request)`, the resource `{request.pool: 1}` (a worker of pool NAME offers
  `NAME=capacity`), and the placement and priority the scheduler's plugin gives it
  (`PLACE_HANDLER`).
- The worker running it sends `BuildEvent`s as Dask events on the topic `EVENTS_TOPIC`
  (`Worker.log_event(EVENTS_TOPIC, event_message(event))`; the client reads them with
  `Client.subscribe_topic` and `event_from_message`): one `started`,
  then `log` chunks numbered from 0 with nothing left out, then nothing (the task's result
  or error ends the build).
- The client cancels a running build by setting the Dask `Event` named `cancel_event(request)`
  (and cancelling the future); the worker then cancels the build, which kills its sandbox.
- The scheduler's plugin (`pipeline.cluster.scheduler`) answers the handlers named below on the
  scheduler's RPC (`client.scheduler.<handler>(...)` from a client).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

EVENTS_TOPIC = "pipeline-build"
"""The Dask event topic of every build's events (one topic: the scheduler keeps a bounded
history per topic, and topics are never removed)."""

PLACE_HANDLER = "pipeline_place"
"""`(pool, cache_hint, client, urgent) -> {"workers": [address, ...], "priority": int}`: where a
build should go (an empty list: anywhere in the pool) and its Dask priority."""

ENDED_HANDLER = "pipeline_ended"
"""`(pool, cache_hint, worker, client, ok)`: a build ended on `worker` (its name or address); the
cache-hint table learns that `worker` has the hint's steps."""

ADMIN_HANDLER = "pipeline_admin"
"""`(command, worker=None) -> dict`: `show`, or `pause`/`unpause`/`drain`/`forget` a worker
(by name or address)."""

WORKER_PLUGIN = "pipeline-builder"
"""The name of the worker plugin that owns a worker's `Builder`."""


@dataclass(frozen=True)
class Source:
    """What a build's `copy` steps see: the repository at `url`, whose `commits` the worker
    fetches into its own git mirror and merges in order (the first is checked out; each next
    one is merged into it, as OCluster does to test a pull request merged into its base)."""

    url: str
    commits: tuple[str, ...]


@dataclass(frozen=True)
class BuildRequest:
    """One build sent to the cluster.

    `request_id` is unique per submission (a resubmission after a scheduler restart gets a new
    one); `client` names the submitting client, for the fair share; `cache_hint` groups builds
    that share steps (OCaml CI: repository + base image + platform + dependencies).
    """

    request_id: str
    spec: str
    source: Source | None
    pool: str
    cache_hint: str | None
    urgent: bool
    client: str


@dataclass(frozen=True)
class BuildEvent:
    """An event of a running build on `EVENTS_TOPIC`: `kind` is "started" (with `worker`, the
    worker's name) or "log" (`data`: the next chunk of the step log, `seq` counting the log
    chunks of this request from 0). Dask sets the "worker" of a worker's event to the worker's
    address on the way; the client turns it back into the name."""

    request_id: str
    kind: str
    worker: str
    seq: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class BuildOutcome:
    """What `run_build` returns: the result id and the worker that built it."""

    result: str
    worker: str


def task_key(request: BuildRequest) -> str:
    """The Dask key of a build's task."""
    return f"pipeline-build-{request.request_id}"


def cancel_event(request: BuildRequest) -> str:
    """The name of the Dask `Event` that cancels a running build when set."""
    return f"pipeline-cancel-{request.request_id}"


EventMessage = dict[str, dict[str, str | int | bytes]]


def event_message(event: BuildEvent) -> EventMessage:
    """`event` as it travels on `EVENTS_TOPIC`: `Worker.log_event` takes only msgpack-able
    messages (dicts of str, int and bytes), not dataclasses; nested under "build" because the
    scheduler sets the top-level key "worker" of a worker's message to the worker's address."""
    return {"build": dataclasses.asdict(event)}


def event_from_message(message: EventMessage) -> BuildEvent:
    """The event that `event_message` made `message` of (as a subscriber receives it)."""
    return BuildEvent(**message["build"])  # type: ignore[arg-type]
