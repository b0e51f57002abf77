"""Prometheus metrics of the webhook dispatcher, served on its own port (`strokes webhooks --metrics-port`)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebhookMetrics:
    """The dispatcher's (`strokes webhooks --metrics-port`):
    strokes_webhook_deliveries_total{outcome}   delivered|failed (an attempt, retried)|given_up|refused
    strokes_webhook_attempt_seconds             one delivery attempt's HTTP time
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.deliveries = Counter(
            "strokes_webhook_deliveries", "webhook attempts by outcome", ["outcome"], registry=r
        )
        self.seconds = Histogram(
            "strokes_webhook_attempt_seconds", "one attempt's HTTP time", buckets=LATENCY_BUCKETS, registry=r
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
