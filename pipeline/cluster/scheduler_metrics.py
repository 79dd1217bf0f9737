"""The scheduler's Prometheus metrics, in a registry of their own (served by
`pipeline cluster scheduler --metrics-port N`).

Counters change as builds go through the scheduler; the gauges are set from the scheduler's
state whenever a build or a worker of their pool changes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class SchedulerMetrics:
    """Every metric of the scheduler, labelled by pool where it has one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter("pipeline_cluster_jobs_submitted", "Builds submitted",
                                 ["pool"], registry=self.registry)
        self.finished = Counter("pipeline_cluster_jobs_finished",
                                "Builds finished (outcome: ok or failed)", ["pool", "outcome"],
                                registry=self.registry)
        self.cancelled = Counter("pipeline_cluster_jobs_cancelled",
                                 "Builds cancelled before they finished", ["pool"],
                                 registry=self.registry)
        self.running = Gauge("pipeline_cluster_jobs_running", "Builds running on a worker",
                             ["pool"], registry=self.registry)
        self.queued = Gauge("pipeline_cluster_queue_length",
                            "Builds waiting for a slot (on the scheduler or on a worker)",
                            ["pool"], registry=self.registry)
        self.capacity = Gauge("pipeline_cluster_capacity",
                              "Build slots of the pool's connected workers", ["pool"],
                              registry=self.registry)
        self.workers = Gauge("pipeline_cluster_workers_connected", "Connected workers",
                             ["pool"], registry=self.registry)
        self.paused = Gauge("pipeline_cluster_workers_paused",
                            "Connected workers paused or draining", ["pool"],
                            registry=self.registry)
        self.affinity_hits = Counter("pipeline_cluster_affinity_hits",
                                     "Builds with a known cache hint that ran on a worker the "
                                     "hint table named", ["pool"], registry=self.registry)
        self.affinity_misses = Counter("pipeline_cluster_affinity_misses",
                                       "Builds with a known cache hint that ran on another "
                                       "worker", ["pool"], registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics over HTTP at `host:port` (0: any free port), in a thread of
        prometheus-client's own; the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
