"""The `pipeline` command, as the console script and as `python -m pipeline`.

`pipeline obuilder ...` goes straight to the builder's command line (`pipeline.obuilder.cli`),
which needs nothing of the engine: a fully cached build then starts without importing it. Every
other command is the engine's (`pipeline.cli`).
"""

import os
import sys
from typing import NoReturn


def main() -> NoReturn:
    """Run `pipeline` with the process's arguments; exit with its status."""
    args = sys.argv[1:]
    if args[:1] == ["obuilder"]:
        from pipeline.obuilder.cli import main as obuilder_main

        status = obuilder_main(args[1:])
        # The command has closed every store, sandbox, thread and event loop it opened, so the
        # interpreter's teardown (freeing each module and object, some 20 ms here, a sixth of a
        # cached build) would only delay the end: skip it once the output is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    from pipeline.cli import main as engine_main

    sys.exit(engine_main(args))


if __name__ == "__main__":
    main()
