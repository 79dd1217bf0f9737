"""The `pipeline` command, as the console script and as `python -m pipeline`.

`pipeline obuilder ...` goes straight to the builder's command line (`pipeline.obuilder.cli`),
which needs nothing of the engine: a fully cached build then starts without importing it. Every
other command is the engine's (`pipeline.cli`).
"""

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pipeline ARGV` (default: the process's arguments); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["obuilder"]:
        from pipeline.obuilder.cli import main as obuilder_main

        return obuilder_main(args[1:])
    from pipeline.cli import main as engine_main

    return engine_main(args)


if __name__ == "__main__":
    sys.exit(main())
