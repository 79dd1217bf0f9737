"""`pipeline cluster admin SCHEDULER show [--json] | pause WORKER | unpause WORKER | drain WORKER
| forget WORKER`: look at the cluster and act on its workers, through the scheduler plugin's
`ADMIN_HANDLER` (`pipeline.cluster.scheduler`).

Exit status: 0 done, 1 refused or failed (an unknown worker, an unreachable scheduler: one line
on standard error), 2 a usage error."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from distributed import Client

from pipeline.cluster.cli import UsageParser
from pipeline.cluster.protocol import ADMIN_HANDLER

CONNECT_TIMEOUT = "3s"
"""How long to try to reach the scheduler before giving up."""

EXIT_FAILED = 1
"""The exit status when the scheduler refused the command or could not be reached."""


class AdminError(Exception):
    """The command could not be done; the message says why, on one line."""


def build_parser() -> UsageParser:
    """The options of `pipeline cluster admin`."""
    parser = UsageParser(prog="pipeline cluster admin",
                         description="Show the build cluster, or pause, unpause, drain or "
                                     "forget one of its workers.")
    parser.add_argument("scheduler", metavar="SCHEDULER", help="e.g. tcp://127.0.0.1:8786")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=UsageParser)
    show = commands.add_parser("show", help="pools, workers and queues")
    show.add_argument("--json", action="store_true", help="print the state as JSON")
    for command, text in (("pause", "take no new build (running builds go on)"),
                          ("unpause", "take builds again (also stops a drain)"),
                          ("drain", "take no new build, leave once the running ones end"),
                          ("forget", "remove a gone worker and its cache-hint entries")):
        commands.add_parser(command, help=text).add_argument("worker", metavar="WORKER",
                                                             help="a worker's name or address")
    return parser


def main(args: list[str]) -> int:
    """Run `pipeline cluster admin ...`; its exit status."""
    options = build_parser().parse_args(args)
    # Dask logs its connection attempts; the one line below says what matters.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    try:
        answer = asyncio.run(call_admin(options.scheduler, options.command,
                                        getattr(options, "worker", None)))
    except AdminError as exc:
        print(f"pipeline cluster admin: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if options.command != "show":
        print(answer["done"])
    elif options.json:
        print(json.dumps(answer, indent=2))
    else:
        print(format_show(answer))
    return 0


async def call_admin(scheduler: str, command: str, worker: str | None) -> dict[str, Any]:
    """The scheduler's answer to `command` (on `worker`); AdminError if it refused or could
    not be reached."""
    try:
        async with Client(scheduler, asynchronous=True, timeout=CONNECT_TIMEOUT) as client:
            handler = getattr(client.scheduler, ADMIN_HANDLER)
            answer: dict[str, Any] = await handler(command=command, worker=worker)
    except (OSError, TimeoutError) as exc:
        raise AdminError(f"cannot reach the scheduler at {scheduler}: {exc}") from None
    except ValueError as exc:
        # Dask's answer when the scheduler has no such handler (not `pipeline cluster
        # scheduler`), or when the address is not one.
        raise AdminError(f"{scheduler}: {exc}") from None
    if "error" in answer:
        raise AdminError(answer["error"])
    return answer


def format_show(state: dict[str, Any]) -> str:
    """The answer to `show` as two tables, pools then workers."""
    pools = [["POOL", "WORKERS", "CAPACITY", "RUNNING", "QUEUED"]]
    pools += [[pool["name"], pool["workers"], pool["capacity"], pool["running"], pool["queued"]]
              for pool in state["pools"]]
    workers = [["WORKER", "POOL", "ADDRESS", "RUNNING", "QUEUED", "STATE", "LAST SEEN",
                "FREE DISK"]]
    for worker in state["workers"]:
        workers.append([
            worker["name"], worker["pool"], worker["address"],
            f"{worker['running']}/{worker['capacity']}", worker["queued"], _state(worker),
            "now" if worker["connected"] else
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(worker["last_seen"])),
            _size(worker["free_disk"]) if "free_disk" in worker else "-"])
    return f"{_table(pools)}\n\n{_table(workers)}"


def _state(worker: dict[str, Any]) -> str:
    if not worker["connected"]:
        return "gone, paused" if worker["paused"] else "gone"
    if worker["draining"]:
        return "draining"
    return "paused" if worker["paused"] else "running"


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _table(rows: list[list[Any]]) -> str:
    """Left-aligned columns two spaces apart."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in cells)
