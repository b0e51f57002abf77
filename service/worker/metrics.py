"""Prometheus metrics of a worker process, served on its own port (`strokes worker --metrics-port`).

Worker (its own port, `strokes worker --metrics-port`):
    strokes_worker_jobs_total{outcome}                   succeeded|failed|canceled|retried|handed_back|deferred|lost
    strokes_worker_attempts_total                        attempts started here
    strokes_worker_takeovers_total                       attempts that took a job over from a dead worker
    strokes_worker_busy                                  1 while a job runs
    strokes_worker_stage_seconds{stage}                  seconds per stage
    strokes_worker_denoise_steps_total                   denoising steps run
    strokes_worker_denoise_steps_per_second{stage}       per image stage
    strokes_worker_decoded_tokens_total                  text tokens decoded
    strokes_worker_decode_tokens_per_second{stage}       per text stage
    strokes_worker_prefilled_tokens_total                tokens computed into the KV cache
    strokes_worker_cached_tokens_total                   tokens served from the reused KV cache
    strokes_worker_events_total                          events published
    strokes_worker_model_load_seconds                    checkpoint load time
    strokes_worker_gpu_memory_bytes                      torch.cuda.memory_allocated, all devices (0 on CPU)
    strokes_worker_gpu_memory_peak_bytes                 torch.cuda.max_memory_allocated, all devices (0 on CPU)
    strokes_worker_gpu_device_memory_bytes{device,kind}  per device: allocated|peak
    strokes_blob_store_up, strokes_blob_store_state{state}, strokes_blob_store_errors_total{kind}
                                                         the blob store as this worker sees it
                                                         (service/blobs/health.py)
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, devices: list[str] | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.devices = devices  # the worker's devices ("cuda:1", ...), for observe_gpu; None: current
        self.jobs = Counter("strokes_worker_jobs", "jobs ended here, by outcome", ["outcome"], registry=r)
        self.attempts = Counter("strokes_worker_attempts", "attempts started here", registry=r)
        self.takeovers = Counter(
            "strokes_worker_takeovers", "attempts taking over from a dead worker", registry=r
        )
        self.busy = Gauge("strokes_worker_busy", "1 while a job runs", registry=r)
        self.stage_seconds = Histogram(
            "strokes_worker_stage_seconds", "seconds per stage", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.denoise_steps = Counter("strokes_worker_denoise_steps", "denoising steps run", registry=r)
        self.denoise_rate = Histogram(
            "strokes_worker_denoise_steps_per_second",
            "denoising steps per second of an image stage",
            ["stage"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.decoded_tokens = Counter("strokes_worker_decoded_tokens", "text tokens decoded", registry=r)
        self.decode_rate = Histogram(
            "strokes_worker_decode_tokens_per_second",
            "decoded tokens per second of a text stage",
            ["stage"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.prefilled_tokens = Counter(
            "strokes_worker_prefilled_tokens", "tokens computed into the KV cache", registry=r
        )
        self.cached_tokens = Counter(
            "strokes_worker_cached_tokens", "tokens served from the reused KV cache", registry=r
        )
        self.events = Counter("strokes_worker_events", "events published", registry=r)
        self.model_load_seconds = Gauge(
            "strokes_worker_model_load_seconds", "checkpoint load time", registry=r
        )
        self.gpu_memory = Gauge("strokes_worker_gpu_memory_bytes", "GPU memory allocated", registry=r)
        self.gpu_memory_peak = Gauge(
            "strokes_worker_gpu_memory_peak_bytes", "peak GPU memory allocated", registry=r
        )
        self.gpu_device_memory = Gauge(
            "strokes_worker_gpu_device_memory_bytes", "GPU memory per device", ["device", "kind"], registry=r
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_stage(
        self,
        stage: str,
        seconds: float,
        *,
        steps: int | None,
        generated_tokens: int,
        prefilled_tokens: int,
        cached_tokens: int,
    ) -> None:
        self.stage_seconds.labels(stage).observe(seconds)
        self.prefilled_tokens.inc(max(0, prefilled_tokens))
        self.cached_tokens.inc(max(0, cached_tokens))
        if steps:
            self.denoise_steps.inc(steps)
            if seconds > 0:
                self.denoise_rate.labels(stage).observe(steps / seconds)
        if generated_tokens:
            self.decoded_tokens.inc(generated_tokens)
            if seconds > 0:
                self.decode_rate.labels(stage).observe(generated_tokens / seconds)

    def observe_gpu(self) -> None:
        """GPU memory of the worker's own CUDA devices (`self.devices`, set by the worker; default the
        calling thread's current one), one figure per device from the process that uses it
        (model/devices.py: a follower's comes from its reports), if torch is loaded and sees a GPU
        (never imports it). The totals sum them; the per-device gauge labels each."""
        from strokes.model import devices as devicelib

        memory = devicelib.memory_by_device(self.devices or [])
        if not memory:
            return
        self.gpu_memory.set(sum(m.allocated for m in memory))
        self.gpu_memory_peak.set(sum(m.peak for m in memory))
        for m in memory:
            self.gpu_device_memory.labels(m.device, "allocated").set(m.allocated)
            self.gpu_device_memory.labels(m.device, "peak").set(m.peak)
