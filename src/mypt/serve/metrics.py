"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per Server.

The names are fixed (users' dashboards and alerts type them):

    mypt_requests_total{status}              generation requests answered, by HTTP status
                                             (499: the client went away first)
    mypt_time_to_first_token_seconds         request queued -> its first token (histogram)
    mypt_inter_token_latency_seconds         one token of a choice -> its next (histogram)
    mypt_queue_time_seconds                  request queued -> it got a row of the batch (histogram)
    mypt_batch_size                          rows decoded in the latest step (gauge)
    mypt_prefix_cache_hits_total             prompts that began from the prefix cache

Every model of the server adds to the same series. The engine threads observe them; the
prometheus_client types are thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The metrics of one server, in their own CollectorRegistry (several servers in one process
    each count their own)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mypt_requests_total", "Generation requests answered, by HTTP status",
                                ["status"], registry=r)
        self.ttft = Histogram("mypt_time_to_first_token_seconds", "Seconds from a request's arrival in the "
                              "queue to its first token", buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("mypt_inter_token_latency_seconds", "Seconds between consecutive tokens "
                                     "of one choice", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("mypt_queue_time_seconds", "Seconds a request waited for a row of the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Gauge("mypt_batch_size", "Rows decoded in the latest step", registry=r)
        self.prefix_hits = Counter("mypt_prefix_cache_hits_total", "Prompts that began from keys and values "
                                   "kept by the prefix cache", registry=r)

    def answered(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
