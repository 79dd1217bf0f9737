"""pipeline: incremental, reactive CI pipelines in the style of OCurrent.

A pipeline is a term built from the combinators below; `Engine` evaluates it incrementally,
running cached primitives (declared with `builder` and `publisher`) as jobs.
"""

from pipeline.analysis import pipeline_graph
from pipeline.cache import BuilderOp, PublisherOp, builder, digest, publisher
from pipeline.clock import Clock, FakeClock, SystemClock
from pipeline.diagram import COLOURS, DiagramError, to_dot, to_svg
from pipeline.engine import CycleError, Engine, PipelineError
from pipeline.file_monitor import FileMonitor, watch_file
from pipeline.jobs import Job, JobCancelled, JobRegistry, JobState, follow_log
from pipeline.level import Level
from pipeline.monitor import Monitor
from pipeline.output import Active, Failed, Ok, Output
from pipeline.pool import Pool
from pipeline.term import (
    Term,
    Variable,
    all,
    all_labelled,
    as_term,
    bind,
    catch,
    collapse,
    component,
    const,
    cutoff,
    fail,
    gate,
    list_map,
    map,
    option_map,
    pair,
    state,
    watch,
)

__all__ = [
    "COLOURS", "Active", "BuilderOp", "Clock", "CycleError", "DiagramError", "Engine", "Failed",
    "FakeClock", "FileMonitor", "Job", "JobCancelled", "JobRegistry", "JobState", "Level",
    "Monitor", "Ok", "Output", "PipelineError", "Pool", "PublisherOp", "SystemClock", "Term",
    "Variable", "all", "all_labelled", "as_term", "bind", "builder", "catch", "collapse",
    "component", "const", "cutoff", "digest", "fail", "follow_log", "gate", "list_map", "map",
    "option_map", "pair", "pipeline_graph", "publisher", "state", "to_dot", "to_svg", "watch",
    "watch_file",
]
