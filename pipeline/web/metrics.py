"""Prometheus metrics of an engine, in a registry of their own (one per application)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import pipeline as p


class _EngineGauges(Collector):
    """Gauges read from the engine at scrape time, so they are never stale."""

    def __init__(self, engine: p.Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("pipeline_nodes", "Live pipeline nodes per state",
                                  labels=["state"])
        counts = self.engine.state_counts()
        for state in p.NodeState:
            nodes.add_metric([state], counts.get(state, 0))
        yield nodes
        queue = GaugeMetricFamily("pipeline_pool_queue_length", "Jobs waiting for a pool slot",
                                  labels=["pool"])
        in_use = GaugeMetricFamily("pipeline_pool_slots_in_use", "Pool slots held by jobs",
                                   labels=["pool"])
        for stats in self.engine.pool_stats():
            queue.add_metric([stats["name"]], stats["queue_length"])
            in_use.add_metric([stats["name"]], stats["in_use"])
        yield queue
        yield in_use


class Metrics:
    """The metrics of one engine; counters count from when this object was made."""

    def __init__(self, engine: p.Engine) -> None:
        """Register the metrics and subscribe to the engine's job and evaluation events."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(engine))
        self.started = Counter("pipeline_jobs_started", "Jobs that began running",
                               registry=self.registry)
        self.finished = Counter("pipeline_jobs_finished", "Jobs that finished (ok or failed)",
                                registry=self.registry)
        self.failed = Counter("pipeline_jobs_failed", "Jobs that failed (cancelled included)",
                              registry=self.registry)
        self.skipped = Counter("pipeline_jobs_skipped",
                               "Jobs that finished ok having had nothing to do (Job.skip)",
                               registry=self.registry)
        self.evaluation = Histogram("pipeline_evaluation_seconds",
                                    "Duration of the engine's rounds of evaluation",
                                    registry=self.registry)
        engine.jobs.on_change(self._job_changed)
        engine.on_change(lambda: self.evaluation.observe(engine.last_round_seconds))

    def _job_changed(self, job: p.Job) -> None:
        if job.state == p.JobState.RUNNING:
            self.started.inc()
        elif job.state in (p.JobState.OK, p.JobState.FAILED):
            self.finished.inc()
            if job.state == p.JobState.FAILED:
                self.failed.inc()
            elif job.skipped is not None:
                self.skipped.inc()
