"""Prometheus metrics of the API process (a name per line, as /metrics serves them).

API (served at /metrics):
    strokes_api_requests_total{method,route,status}     requests answered
    strokes_api_request_seconds{method,route}           time to the response's first byte
    strokes_api_jobs_submitted_total                     jobs accepted (202)
    strokes_api_rejections_total{reason}                 requests refused for load (queue_full: 429s)
    strokes_api_sse_streams                              SSE streams open now
    strokes_queue_depth                                  jobs accepted and not started
    strokes_queue_lag                                    queue entries not yet delivered to a worker
    strokes_queue_pending                                entries delivered and not acknowledged
    strokes_workers_alive                                workers with a live heartbeat
    strokes_blob_store_up, strokes_blob_store_state{state}, strokes_blob_store_errors_total{kind}
                                                         the blob store as this replica sees it
    strokes_webhook_outbox_messages                      webhook messages waiting for delivery
    strokes_webhook_outbox_dropped_total                 events not queued: the outbox was full

Several API processes (uvicorn --workers N): set PROMETHEUS_MULTIPROC_DIR and every process
writes its values to files there; /metrics then aggregates them (prometheus_client multiprocess
mode). Each worker process serves its own registry on its own port.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ApiMetrics:
    def __init__(self) -> None:
        # In multiprocess mode values live in files and the registry is only for exposition.
        self.registry = None if multiprocess() else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "strokes_api_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "strokes_api_request_seconds",
            "time to the response's first byte",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.submitted = Counter("strokes_api_jobs_submitted", "jobs accepted", registry=r)
        self.rejections = Counter(
            "strokes_api_rejections", "requests refused for load", ["reason"], registry=r
        )
        self.sse_streams = Gauge(
            "strokes_api_sse_streams", "SSE streams open", registry=r, multiprocess_mode="livesum"
        )
        self.queue_depth = Gauge(
            "strokes_queue_depth", "jobs accepted and not started", registry=r, multiprocess_mode="mostrecent"
        )
        self.queue_lag = Gauge(
            "strokes_queue_lag", "queue entries not yet delivered", registry=r, multiprocess_mode="mostrecent"
        )
        self.queue_pending = Gauge(
            "strokes_queue_pending",
            "entries delivered, not acknowledged",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.workers_alive = Gauge(
            "strokes_workers_alive",
            "workers with a live heartbeat",
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def exposition(self, *collectors: Collector) -> bytes:
        """The metrics, with `collectors` of this request's (the blob store's state, read now)."""
        if self.registry is not None:
            own = generate_latest(self.registry)
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            own = generate_latest(registry)
        extra = CollectorRegistry()
        for collector in collectors:
            extra.register(collector)
        return own + generate_latest(extra)


class OutboxCollector:
    """The webhook outbox's figures, read from Redis at this scrape (the API runs whether or not a
    dispatcher does, which is when the outbox fills)."""

    def __init__(self, length: int, dropped: int):
        self.length, self.dropped = length, dropped

    def collect(self):
        length = GaugeMetricFamily("strokes_webhook_outbox_messages", "webhook messages waiting for delivery")
        length.add_metric([], float(self.length))
        dropped = CounterMetricFamily(
            "strokes_webhook_outbox_dropped", "events not queued for delivery: the outbox was full"
        )
        dropped.add_metric([], float(self.dropped))
        return [length, dropped]
