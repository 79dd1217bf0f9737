"""`pipeline cluster scheduler | worker | admin ...`: the build cluster's processes and its
administration (each subcommand's options are its module's: `pipeline.cluster.scheduler`,
`pipeline.cluster.worker`, `pipeline.cluster.admin`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

EXIT_USAGE = 2
"""The exit status of a usage error."""

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
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[args[0]])
    status: int = module.main(args[1:])
    return status


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (argparse adds the usage): the
    `pipeline cluster` commands' and `pipeline run`'s."""

    def error(self, message: str) -> NoReturn:
        """Print `PROG: message` and the way to help on one line; exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    """A TCP port number, 0 (any free port) to 65535."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return number
