"""`pipeline cluster scheduler | worker | admin ...`: the build cluster's processes and its
administration (each subcommand's options are its module's: `pipeline.cluster.scheduler`,
`pipeline.cluster.worker`, `pipeline.cluster.admin`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "scheduler": "pipeline.cluster.scheduler",
    "worker": "pipeline.cluster.worker",
    "admin": "pipeline.cluster.admin",
}


def main(args: list[str]) -> int:
    """Run `pipeline cluster COMMAND ARGS...`; its exit status (2 for a usage error)."""
    if not args or args[0] not in COMMANDS:
        print("usage: pipeline cluster {scheduler,worker,admin} ...\n"
              "pipeline cluster: error: give a command: scheduler, worker or admin",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]])
    status: int = module.main(args[1:])
    return status
