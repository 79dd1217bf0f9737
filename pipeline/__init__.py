"""pipeline: incremental, reactive CI pipelines in the style of OCurrent.

A pipeline is a term built from the combinators below; `Engine` evaluates it incrementally,
running cached primitives (declared with `builder` and `publisher`) as jobs.

Names are imported on first use, so that commands which need little (`pipeline obuilder ...`,
`pipeline --help`) do not pay for networkx, graphviz or watchdog.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pipeline.analysis": ["pipeline_graph"],
    "pipeline.cache.declarations": ["BuilderOp", "PublisherOp", "builder", "digest", "publisher"],
    "pipeline.clock": ["Clock", "FakeClock", "SystemClock"],
    "pipeline.diagram": ["COLOURS", "DiagramError", "to_dot", "to_svg"],
    "pipeline.engine": ["CycleError", "Engine", "PipelineError", "on_start"],
    "pipeline.file_monitor": ["FileMonitor", "watch_file"],
    "pipeline.jobs": ["Job", "JobCancelled", "JobRegistry", "JobState", "follow_log"],
    "pipeline.level": ["Level"],
    "pipeline.monitor": ["Monitor"],
    "pipeline.output": ["Active", "Failed", "NodeState", "Ok", "Output"],
    "pipeline.pool": ["Pool"],
    "pipeline.term": [
        "Term", "Variable", "all", "all_labelled", "as_term", "bind", "catch", "collapse",
        "component", "const", "cutoff", "fail", "gate", "list_map", "map", "option_map", "pair",
        "state", "watch",
    ],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the module defining `name` on first use."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names."""
    return __all__

