"""Helpers of the service tests: real API and worker processes on free ports, an SSE collector,
and a scripted pipeline for in-process worker tests."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis

from strokes.model.spec.events import (
    Done,
    ImageCompleted,
    ImageProgress,
    IterationCompleted,
    Stage,
    StageCompleted,
    StageStarted,
    TextDelta,
    Verdict,
)
from strokes.model.spec.params import GenerationParams
from strokes.service.cli.serve import free_port
from strokes.service.cli.sse_client import SSE, iter_sse
from strokes.service.queue import keys
from strokes.service.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("job.completed", "job.failed", "job.canceled")

# A job of the tiny model that takes ~0.5 s: guided, one iteration, every stage.
QUICK = {
    "prompt": "a red cube on a blue sphere",
    "width": 64,
    "height": 64,
    "max_iterations": 1,
    "seed": 3,
    "draft": {"steps": 4},
    "refine": {"steps": 4},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}
# A job that takes several seconds (made slow by its parameters: size, steps, iterations).
SLOW = {
    "prompt": "a red cube on a blue sphere",
    "width": 256,
    "height": 256,
    "max_iterations": 3,
    "seed": 3,
    "draft": {"steps": 60},
    "refine": {"steps": 60},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}


class Proc:
    """A `strokes` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strokes.service.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


# The local blob store shared by this session's API and worker processes (a test may name its own).
BLOB_DIR = Path(tempfile.mkdtemp(prefix="strokes-test-blobs-"))
atexit.register(shutil.rmtree, BLOB_DIR, ignore_errors=True)


def env_with(redis_url: str, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROKES_")}
    env.update({"STROKES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["STROKES_BLOB_DIR"] = str(BLOB_DIR)
    # The test's redis-server may have just started: reclaim at once unless a test sets the grace.
    env["STROKES_RESTART_GRACE_S"] = "0"
    env.update({f"STROKES_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_api(redis_url: str, logdir: Path, **settings: object) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(["api", "--port", str(port)], env_with(redis_url, **settings), logdir / f"api-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError("the API exited:\n" + proc.output())
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the API did not start:\n" + proc.output())


def launch_worker(
    redis_url: str,
    checkpoint: Path,
    logdir: Path,
    name: str,
    *,
    metrics_port: int | None = None,
    **settings: object,
) -> Proc:
    args = ["worker", "--checkpoint", str(checkpoint), "--device", "cpu", "--name", name]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    return Proc(args, env_with(redis_url, **settings), logdir / f"worker-{name}.log")


def wait_workers(redis_url: str, workers: dict[str, Proc], timeout: float = 60) -> None:
    """Until every worker heartbeats (the model is loaded and the loop runs)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for name, proc in workers.items():
                if not proc.alive():
                    raise RuntimeError(f"worker {name} exited:\n" + proc.output())
            if all(client.exists(keys.heartbeat(name)) for name in workers):
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("workers did not start:\n" + "\n".join(p.output() for p in workers.values()))


def start_worker(
    redis_url: str,
    checkpoint: Path,
    logdir: Path,
    name: str,
    *,
    metrics_port: int | None = None,
    **settings: object,
) -> Proc:
    proc = launch_worker(redis_url, checkpoint, logdir, name, metrics_port=metrics_port, **settings)
    wait_workers(redis_url, {name: proc})
    return proc


def submit(base: str, body: dict, headers: dict[str, str] | None = None) -> dict:
    reply = httpx.post(base + "/v1/generations", json=body, headers=headers, timeout=10)
    assert reply.status_code == 202, reply.text
    return reply.json()


def stream_events(
    base: str,
    job_id: str,
    *,
    last_event_id: str | None = None,
    after: str | None = None,
    stop: Callable[[SSE], bool] | None = None,
    timeout: float = 120,
    headers: dict[str, str] | None = None,
) -> list[SSE]:
    """Consume the job's SSE stream until it ends (or `stop` says so); returns the events."""
    hdrs = dict(headers or {})
    if last_event_id:
        hdrs["Last-Event-ID"] = last_event_id
    params = {"after": after} if after else None
    out: list[SSE] = []
    with httpx.stream(
        "GET",
        f"{base}/v1/generations/{job_id}/events",
        headers=hdrs,
        params=params,
        timeout=httpx.Timeout(10, read=timeout),
    ) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for sse in iter_sse(reply.iter_lines()):
            out.append(sse)
            if stop is not None and stop(sse):
                break
    return out


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


S3_BUCKET = "strokes-test"  # made by the s3_server fixture


def s3_env(endpoint: str, prefix: str) -> dict[str, str]:
    """The settings (env_with keywords) of the S3 blob store at `endpoint`, objects under `prefix`."""
    return {
        "blob_backend": "s3",
        "s3_bucket": S3_BUCKET,
        "s3_prefix": prefix,
        "s3_endpoint_url": endpoint,
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
        "s3_addressing_style": "path",
    }


def s3_settings(base: Settings, endpoint: str, prefix: str, **changes: object) -> Settings:
    """`base` with the S3 blob store at `endpoint`, objects under `prefix`."""
    return Settings(**{**base.model_dump(), **s3_env(endpoint, prefix), **changes})


# ---- a scripted pipeline for in-process worker tests --------------------------------------------


class ScriptedCancel(Exception):
    """What the scripted pipeline raises when should_cancel() turns true (like model's Cancelled)."""


@dataclass
class ScriptedPipeline:
    """Emits a guided trajectory's events like the real pipeline: `steps` denoising steps per image,
    `step_s` seconds each; `fail` raises on every run (a poison job). Counts steps run after a
    cancel request to check that it stops within one step."""

    steps: int = 5
    step_s: float = 0.0
    iterations: int = 1
    fail: bool = False
    runs: int = 0
    steps_after_cancel: list[int] = field(default_factory=list)

    def run(self, params: GenerationParams, should_cancel: Callable[[], bool]) -> Iterator:
        self.runs += 1
        after = 0
        self.steps_after_cancel.append(0)
        h, w = params.height, params.width
        for it in range(1, self.iterations + 1):
            for stage in (Stage.plan, Stage.draft, Stage.reflect, Stage.refine):
                yield StageStarted(it, stage)
                if stage in (Stage.plan, Stage.reflect):
                    for token in ("step ", "one"):
                        if should_cancel():
                            raise ScriptedCancel()
                        yield TextDelta(it, stage, token)
                    verdict = Verdict.wrong if stage == Stage.reflect else None
                    yield StageCompleted(
                        it, stage, 0.01, 5, 3, text="step one", verdict=verdict, generated_tokens=2
                    )
                    continue
                for step in range(1, self.steps + 1):
                    if should_cancel():
                        raise ScriptedCancel()
                    if self.fail:
                        raise RuntimeError("poisoned input")
                    time.sleep(self.step_s)
                    yield ImageProgress(it, stage, step, self.steps)
                    if should_cancel():
                        after += 1
                        self.steps_after_cancel[-1] = after
                image_id = f"it{it}-{stage.value}"
                yield ImageCompleted(it, stage, image_id, np.full((h, w, 3), 40 * it, np.uint8))
                yield StageCompleted(
                    it,
                    stage,
                    self.steps * self.step_s,
                    4,
                    8,
                    image_id=image_id,
                    width=w,
                    height=h,
                    steps=self.steps,
                )
            yield IterationCompleted(it, Verdict.wrong, f"it{it}-refine")
        yield Done(
            f"it{self.iterations}-refine",
            self.iterations,
            0.1,
            {"generated_tokens": 4 * self.iterations},
            {"version": 1, "prompt": params.prompt},
        )


class LongStepPipeline:
    """A pipeline whose first image step does not return for a minute and does not look at
    should_cancel meanwhile, like a VAE decode of a large image (`--pipeline
    svc_testkit:long_step_pipeline`, with tests/service on PYTHONPATH)."""

    def run(self, params: GenerationParams, should_cancel: Callable[[], bool]) -> Iterator:
        yield StageStarted(1, Stage.draft)
        yield ImageProgress(1, Stage.draft, 1, 2)
        time.sleep(60)  # the long step itself: the worker must not wait for it on SIGTERM
        yield ImageProgress(1, Stage.draft, 2, 2)


def long_step_pipeline(checkpoint: str, device: str, dtype: str | None = None) -> LongStepPipeline:
    return LongStepPipeline()


class DeviceErrorPipeline(ScriptedPipeline):
    """ScriptedPipeline, except that the prompt "device error" breaks the (pretend) device."""

    def run(self, params: GenerationParams, should_cancel: Callable[[], bool]) -> Iterator:
        if params.prompt == "device error":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from super().run(params, should_cancel)


def device_error_pipeline(checkpoint: str, device: str, dtype: str | None = None) -> DeviceErrorPipeline:
    return DeviceErrorPipeline(steps=2)
