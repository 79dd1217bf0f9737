"""The `pipeline` command, as the console script and as `python -m pipeline`.

`pipeline obuilder ...` goes straight to the builder's command line (`pipeline.obuilder.cli`),
which needs nothing of the engine: a fully cached build then starts without importing it.
`pipeline cluster ...` is the build cluster's (`pipeline.cluster.cli`). Every other command is
the engine's (`pipeline.cli`).
"""

import os
import sys
from typing import NoReturn

# The status a shell reports for a writer killed by SIGPIPE (128 + 13).
EXIT_READER_GONE = 141


def main() -> NoReturn:
    """Run `pipeline` with the process's arguments; exit with its status.

    A reader of its output that goes away (`pipeline ... | head`) ends it with status 141, as
    SIGPIPE would, and no traceback; `pipeline obuilder build` instead finishes its build (see
    `pipeline.obuilder.cli`).
    """
    try:
        _run(sys.argv[1:])
    except BrokenPipeError:
        from pipeline.obuilder.cli import discard_stdout

        discard_stdout()
        os._exit(EXIT_READER_GONE)


def _run(args: list[str]) -> NoReturn:
    if args[:1] == ["obuilder"]:
        from pipeline.obuilder.cli import main as obuilder_main

        status = obuilder_main(args[1:])
        # The command has closed every store, sandbox, thread and event loop it opened, so the
        # interpreter's teardown (freeing each module and object, some 20 ms here, a sixth of a
        # cached build) would only delay the end: skip it once the output is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args[:1] == ["cluster"]:
        from pipeline.cluster.cli import main as cluster_main

        sys.exit(cluster_main(args[1:]))
    from pipeline.cli import main as engine_main

    sys.exit(engine_main(args))


if __name__ == "__main__":
    main()
