"""End to end: the real API and worker processes on free ports, the tiny model, a real
redis-server, and real RawEvent consumed with httpx. Jobs are made long by their parameters (image
size, denoising steps, iterations), never by sleeps in the product."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from strokes_client.events import RawEvent
from testkit.jobs import QUICK, SLOW, TERMINAL, iter_events, payload, stream_events, submit
from testkit.processes import Proc, launch_worker, start_api, start_worker, wait_for, wait_workers

from strokes.service.cli.serve import free_port
from strokes.service.queue import keys

pytestmark = pytest.mark.slow

MEDIUM = {
    **QUICK,
    "width": 128,
    "height": 128,
    "max_iterations": 2,
    "draft": {"steps": 30},
    "refine": {"steps": 30},
    "plan": {"max_tokens": 16},
    "reflect": {"max_tokens": 16},
}


def _ms(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/generations/{job_id}", timeout=5).json()


def _wait_status(base: str, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    return wait_for(
        lambda: (s := _status(base, job_id))["status"] in statuses and s,
        timeout,
        interval=0.1,
        what=f"{job_id} to be {statuses}",
    )


class Follower(threading.Thread):
    """Follows a job's RawEvent stream in the background to its end, reconnecting with Last-Event-ID
    when the stream breaks, as an EventSource does."""

    def __init__(self, base: str, job_id: str):
        super().__init__(daemon=True)
        self.base, self.job_id = base, job_id
        self.events: list[RawEvent] = []
        self.reconnects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        last = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                for sse in _iter(self.base, self.job_id, last):
                    if sse.name == "error":
                        break
                    self.events.append(sse)
                    last = sse.id
                    if sse.name in TERMINAL:
                        return
            except (httpx.HTTPError, AssertionError) as exc:
                self.error = exc
            self.reconnects += 1
            time.sleep(0.3)

    def seen(self, name: str) -> bool:
        return any(e.name == name for e in list(self.events))


def _iter(base: str, job_id: str, last: str | None):
    headers = {"Last-Event-ID": last} if last else {}
    with httpx.stream(
        "GET", f"{base}/v1/generations/{job_id}/events", headers=headers, timeout=httpx.Timeout(5, read=60)
    ) as reply:
        if reply.status_code != 200:
            raise AssertionError(f"events answered {reply.status_code}")
        yield from iter_events(reply.iter_lines())


@dataclass
class Service:
    base: str
    redis_url: str
    worker: Proc
    metrics_port: int


@pytest.fixture(scope="module")
def service(redis_server, tiny_checkpoint, tmp_path_factory):
    """API + one worker (with its metrics port) on a redis-server of this module."""
    tmp = tmp_path_factory.mktemp("e2e")
    server = type(redis_server)(tmp / "redis")
    server.start()
    api, base = start_api(server.url, tmp, blob_dir=tmp / "blobs")
    port = free_port()
    # The tiny model's denoising steps take a few ms: read the cancel flag at every check (the
    # default, 50 ms, is shorter than a denoising step of a real model on a GPU).
    worker = start_worker(
        server.url, tiny_checkpoint, tmp, "shared", metrics_port=port, cancel_poll_s=0, blob_dir=tmp / "blobs"
    )
    yield Service(base, server.url, worker, port)
    worker.stop()
    api.stop()
    server.stop()


def test_guided_job_streams_every_stage_with_fetchable_pngs_and_one_terminal_event(service: Service):
    job = submit(service.base, QUICK)
    events = stream_events(service.base, job["id"])
    names = [e.name for e in events]
    assert names[:2] == ["job.queued", "job.started"]
    assert names[-1] == "job.completed" and sum(n in TERMINAL for n in names) == 1
    ids = [_ms(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    data = [payload(e) for e in events]
    assert {d["job_id"] for d in data} == {job["id"]}
    pairs = [(e.name, payload(e)) for e in events]

    started = [(d["iteration"], d["stage"]) for name, d in pairs if name == "stage.started"]
    completed = {d["stage"]: d for name, d in pairs if name == "stage.completed"}
    assert started[:3] == [(1, "plan"), (1, "draft"), (1, "reflect")]
    if completed["reflect"]["verdict"] != "correct":  # the tiny model's reflections are noise
        assert started[3] == (1, "refine") and "refine" in completed
    deltas = {d["stage"] for name, d in pairs if name == "text.delta"}
    assert deltas == {"plan", "reflect"}
    progress = [d for name, d in pairs if name == "image.progress" and d["stage"] == "draft"]
    assert progress and [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    assert progress[-1]["step"] == progress[-1]["steps"]
    assert completed["plan"]["prefilled_tokens"] > 0 and completed["draft"]["cached_tokens"] > 0

    for stage in ("draft", "refine"):
        if stage not in completed:
            continue
        image = completed[stage]["image"]
        assert set(image) >= {"id", "url", "width", "height"}
        reply = httpx.get(service.base + image["url"], timeout=5)
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        png = Image.open(io.BytesIO(reply.content))
        assert png.format == "PNG" and png.size == (image["width"], image["height"]) == (64, 64)
        png.load()

    done = data[-1]
    final = httpx.get(service.base + done["final_image"]["url"], timeout=5)
    assert Image.open(io.BytesIO(final.content)).format == "PNG"
    assert done["iterations"] == 1 and done["usage"]["generated_tokens"] > 0
    status = _status(service.base, job["id"])
    assert status["status"] == "succeeded" and status["final_image"] == done["final_image"]
    assert [s["stage"] for s in status["stages"]][:3] == ["plan", "draft", "reflect"]
    trajectory = httpx.get(f"{service.base}/v1/generations/{job['id']}/trajectory", timeout=5)
    assert trajectory.status_code == 200 and isinstance(trajectory.json(), dict)


def _after(n: int):
    """A stop condition: cut the connection after n events."""
    seen = []

    def stop(event: RawEvent) -> bool:
        seen.append(event)
        return len(seen) >= n

    return stop


def test_resume_with_last_event_id_gives_every_event_exactly_once_in_order(service: Service):
    job = submit(service.base, MEDIUM)
    got = stream_events(service.base, job["id"], stop=_after(5))
    assert _status(service.base, job["id"])["status"] in ("queued", "running")  # cut mid-job
    got += stream_events(service.base, job["id"], last_event_id=got[-1].id, stop=_after(25))
    assert got[-1].name not in TERMINAL
    got += stream_events(service.base, job["id"], after=got[-1].id)  # ?after= works the same
    full = stream_events(service.base, job["id"])  # the whole log, read after the end
    assert [(e.id, e.name, e.data) for e in got] == [(e.id, e.name, e.data) for e in full]
    assert sum(e.name in TERMINAL for e in got) == 1
    reply = httpx.get(
        f"{service.base}/v1/generations/{job['id']}/events", headers={"Last-Event-ID": full[-1].id}, timeout=5
    )
    assert reply.status_code == 204  # finished, nothing left after that id


def _steps_after(events: list[RawEvent], t: float) -> int:
    """How many denoising steps the pipeline produced after wall time `t` (an event's `ts` is when
    the worker's pipeline produced it, not when it was written): how soon a job stopped, counted
    in steps rather than seconds, since a loaded machine is slow, not wrong."""
    return sum(e.name == "image.progress" and payload(e)["ts"] > t for e in events)


def test_cancel_of_a_queued_and_of_a_running_job(service: Service):
    running = submit(service.base, SLOW)
    before = stream_events(service.base, running["id"], stop=lambda e: e.name == "image.progress")
    queued = submit(service.base, QUICK)  # behind the running job on the only worker
    reply = httpx.delete(f"{service.base}/v1/generations/{queued['id']}", timeout=5)
    assert reply.status_code == 200 and reply.json()["status"] == "canceled"

    reply = httpx.delete(f"{service.base}/v1/generations/{running['id']}", timeout=5)
    requested = time.time()  # the cancel flag is set before DELETE answers
    assert reply.status_code == 202 and reply.json()["cancel_requested"] is True
    after = stream_events(service.base, running["id"], last_event_id=before[-1].id)
    assert after[-1].name == "job.canceled"
    assert _steps_after(after, requested) <= 1, "denoising went on for more than one step after the cancel"
    assert httpx.delete(f"{service.base}/v1/generations/{running['id']}", timeout=5).status_code == 200

    # The worker is free now, and takes entries in order: once a job submitted after the
    # canceled one has completed, the worker has passed the canceled job's entry.
    later = submit(service.base, QUICK)
    assert stream_events(service.base, later["id"])[-1].name == "job.completed"
    events = [e.name for e in stream_events(service.base, queued["id"])]
    assert events == ["job.queued", "job.canceled"]
    assert _status(service.base, queued["id"])["started_at"] is None


def test_client_disconnect_does_not_cancel_the_job(service: Service):
    job = submit(service.base, MEDIUM)
    stream_events(service.base, job["id"], stop=lambda e: e.name == "stage.started")
    assert _wait_status(service.base, job["id"], ("succeeded", "failed", "canceled"))["status"] == "succeeded"


def test_edit_job_with_an_input_image_runs_from_that_image(service: Service):
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(png, format="PNG")
    upload = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    job = submit(service.base, {**QUICK, "input_image": upload})
    events = stream_events(service.base, job["id"])
    assert events[-1].name == "job.completed"
    status = _status(service.base, job["id"])
    assert "input" in {image["id"] for image in status["images"]}
    draft = next(s for s in status["stages"] if s["stage"] == "draft")
    assert draft["image"]["width"] > draft["image"]["height"]  # follows the landscape input, not 64x64


def test_worker_logs_are_json_lines_with_job_fields_and_no_prompt_text(service: Service):
    prompt = "a secret prompt about a lighthouse"
    job = submit(service.base, {**QUICK, "prompt": prompt})
    stream_events(service.base, job["id"])
    text = service.worker.output()
    text = text[: text.rfind("\n") + 1]  # complete lines only: the worker may be mid-write
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "msg", "job_id", "attempt", "stage"} <= set(r) for r in lines)
    mine = [r for r in lines if r["job_id"] == job["id"]]
    assert {r["attempt"] for r in mine} == {1}
    assert any(r["msg"] == "job started" and r["prompt_chars"] == len(prompt) for r in mine)
    # written on the pipeline thread when each stage ends, so before the terminal event
    ended = {r["stage"] for r in mine if r["msg"] == "stage completed"}
    assert {"plan", "draft", "reflect"} <= ended
    assert prompt not in service.worker.output()


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in metrics.items() if n == name and set(labels.items()) <= set(lab))


def _scrape_until(url: str, name: str, **labels: str) -> dict:
    """The metrics at `url` once `name` is non-zero: counters that move after the terminal event
    (the job's outcome, the RawEvent request's end) may lag the client by a moment."""
    deadline = time.monotonic() + 10
    while True:
        metrics = _metrics(httpx.get(url, timeout=5).text)
        if _total(metrics, name, **labels) > 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_metrics_of_api_and_worker_move_with_a_tiny_model_job(service: Service):
    job = submit(service.base, QUICK)
    stream_events(service.base, job["id"])
    worker = _scrape_until(
        f"http://127.0.0.1:{service.metrics_port}/metrics", "strokes_worker_jobs_total", outcome="succeeded"
    )
    for name, labels in [
        ("strokes_worker_jobs_total", {"outcome": "succeeded"}),
        ("strokes_worker_attempts_total", {}),
        ("strokes_worker_stage_seconds_count", {"stage": "plan"}),
        ("strokes_worker_stage_seconds_count", {"stage": "draft"}),
        ("strokes_worker_stage_seconds_count", {"stage": "reflect"}),
        ("strokes_worker_denoise_steps_total", {}),
        ("strokes_worker_denoise_steps_per_second_count", {"stage": "draft"}),
        ("strokes_worker_decoded_tokens_total", {}),
        ("strokes_worker_decode_tokens_per_second_count", {"stage": "plan"}),
        ("strokes_worker_prefilled_tokens_total", {}),
        ("strokes_worker_cached_tokens_total", {}),
        ("strokes_worker_events_total", {}),
        ("strokes_worker_model_load_seconds", {}),
    ]:
        assert _total(worker, name, **labels) > 0, name
    for name in (
        "strokes_worker_takeovers_total",
        "strokes_worker_gpu_memory_bytes",
        "strokes_worker_gpu_memory_peak_bytes",
        "strokes_worker_busy",
    ):
        assert any(n == name for n, _ in worker), name  # present (zero on a CPU, without takeovers)

    api = _scrape_until(
        f"{service.base}/metrics", "strokes_api_requests_total", route="/v1/generations/{job_id}/events"
    )
    assert _total(api, "strokes_api_requests_total", route="/v1/generations", status="202") >= 1
    assert _total(api, "strokes_api_requests_total", route="/v1/generations/{job_id}/events") >= 1
    assert _total(api, "strokes_api_request_seconds_count", route="/v1/generations") >= 1
    assert _total(api, "strokes_api_jobs_submitted_total") >= 1
    assert _total(api, "strokes_workers_alive") == 1
    for name in (
        "strokes_queue_depth",
        "strokes_queue_lag",
        "strokes_queue_pending",
        "strokes_api_sse_streams",
        "strokes_api_rejections_total",
    ):
        assert any(n == name for n, _ in api) or name == "strokes_api_rejections_total", name


def test_event_stream_opens_with_a_comment_at_once_and_heartbeats_while_quiet(redis_url, logdir, procs):
    api, base = start_api(redis_url, logdir, sse_ping_s=0.4)
    procs.append(api)
    job = submit(base, QUICK)  # no worker: the job stays queued and its stream stays quiet
    lines: list[str] = []
    with httpx.stream("GET", f"{base}/v1/generations/{job['id']}/events", timeout=10) as reply:
        for line in reply.iter_lines():
            lines.append(line)
            if sum(text.startswith(": ping") for text in lines) >= 2:
                break
    # "At once" without a clock: the comment comes before job.queued, which is in the log already,
    # so the stream writes it before it reads anything.
    assert lines[0] == ": stream open"
    assert [text for text in lines if text.startswith("event:")] == ["event: job.queued"]


# ---- failures of processes: each test has its own Redis, API and workers ---------------------


def _two_workers(
    redis_url: str, checkpoint: Path, logdir: Path, procs: list[Proc]
) -> dict[str, tuple[Proc, int]]:
    ports = {"alpha": free_port(), "beta": free_port()}
    workers = {
        name: launch_worker(redis_url, checkpoint, logdir, name, metrics_port=port)
        for name, port in ports.items()
    }
    procs.extend(workers.values())
    wait_workers(redis_url, workers)
    return {name: (workers[name], ports[name]) for name in workers}


def test_kill_9_of_a_worker_mid_job_is_taken_over_within_15_s_with_one_terminal_event(
    private_redis, tiny_checkpoint, logdir, procs
):
    api, base = start_api(private_redis.url, logdir)
    procs.append(api)
    workers = _two_workers(private_redis.url, tiny_checkpoint, logdir, procs)  # default 10 s lease
    job = submit(base, {**SLOW, "max_iterations": 2})
    follower = Follower(base, job["id"])
    follower.start()
    wait_for(lambda: follower.seen("image.progress"), 60, what="the first denoising step")
    victim = next(payload(e)["worker"] for e in follower.events if e.name == "job.started")
    killed_at = time.time()
    os.kill(workers[victim][0].pid, signal.SIGKILL)
    follower.join(90)
    assert not follower.is_alive(), "the job did not end"

    events = follower.events
    names = [e.name for e in events]
    assert names[-1] == "job.completed" and sum(n in TERMINAL for n in names) == 1
    starts = [(e, payload(e)) for e in events if e.name == "job.started"]
    assert [(d["attempt"], d["worker"], d["takeover"]) for _, d in starts] == [
        (1, victim, False),
        (2, next(n for n in workers if n != victim), True),
    ]
    taken_over_after = _ms(starts[1][0].id)[0] / 1000 - killed_at
    assert taken_over_after < 15, f"taken over {taken_over_after:.1f} s after the kill"
    later = events[events.index(starts[1][0]) :]
    assert all(payload(e)["attempt"] == 2 for e in later)  # nothing from the dead attempt after
    ids = [_ms(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    client = redis.Redis.from_url(private_redis.url)
    assert client.xpending(keys.JOBS, keys.GROUP)["pending"] == 0
    client.close()
    survivor_port = workers[starts[1][1]["worker"]][1]
    survivor = _metrics(httpx.get(f"http://127.0.0.1:{survivor_port}/metrics", timeout=5).text)
    assert _total(survivor, "strokes_worker_takeovers_total") == 1


def test_sigterm_hands_the_running_job_back_at_once_and_the_worker_exits_0(
    private_redis, tiny_checkpoint, logdir, procs
):
    api, base = start_api(private_redis.url, logdir)
    procs.append(api)
    workers = _two_workers(private_redis.url, tiny_checkpoint, logdir, procs)
    job = submit(base, SLOW)
    follower = Follower(base, job["id"])
    follower.start()
    wait_for(lambda: follower.seen("image.progress"), 60, what="the first denoising step")
    victim = next(payload(e)["worker"] for e in follower.events if e.name == "job.started")
    proc = workers[victim][0]
    sent = time.time()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0  # a deadline for the exit; how soon is counted in steps below
    follower.join(90)
    events = follower.events
    handback = next(e for e in events if e.name == "job.queued" and payload(e).get("reason") == "handback")
    dead = events[: events.index(handback)]
    assert _steps_after(dead, sent) <= 1, (
        "denoising went on for more than one step after SIGTERM: not at once"
    )
    assert events[-1].name == "job.completed" and sum(e.name in TERMINAL for e in events) == 1
    starts = [payload(e) for e in events if e.name == "job.started"]
    assert [s["worker"] for s in starts] == [victim, next(n for n in workers if n != victim)]
    assert "worker stopped" in proc.output()


def test_redis_stopped_and_restarted_under_a_running_api_and_worker(
    private_redis, tiny_checkpoint, logdir, procs
):
    api, base = start_api(private_redis.url, logdir)
    procs.append(api)
    procs.append(start_worker(private_redis.url, tiny_checkpoint, logdir, "solo"))
    first = submit(base, {**SLOW, "max_iterations": 2})
    follower = Follower(base, first["id"])
    follower.start()
    wait_for(lambda: follower.seen("image.progress"), 60, what="the first denoising step")

    private_redis.stop()
    for method, path in [
        ("POST", "/v1/generations"),
        ("GET", f"/v1/generations/{first['id']}"),
        ("GET", "/readyz"),
    ]:
        began = time.monotonic()
        reply = httpx.request(method, base + path, json=QUICK if method == "POST" else None, timeout=10)
        assert reply.status_code == 503, (path, reply.text)
        assert time.monotonic() - began < 2.0
    time.sleep(1.0)
    private_redis.start()  # same port and folder: the AOF brings every accepted job back

    second = wait_for(
        lambda: (
            (r := httpx.post(base + "/v1/generations", json=QUICK, timeout=10)).status_code == 202
            and r.json()
        ),
        15,
        interval=0.2,
        what="the API to recover",
    )
    follower.join(90)
    assert _wait_status(base, first["id"], ("succeeded", "failed", "canceled"))["status"] == "succeeded"
    assert _wait_status(base, second["id"], ("succeeded", "failed", "canceled"))["status"] == "succeeded"
    events = stream_events(base, first["id"])
    assert sum(e.name in TERMINAL for e in events) == 1
    assert [(e.id, e.data) for e in follower.events] == [(e.id, e.data) for e in events]  # resumed whole
    assert follower.reconnects >= 1


def test_worker_and_serve_fail_with_a_message_on_a_missing_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "strokes.service.cli"]
    missing = str(tmp_path / "nope")
    worker = subprocess.run(
        [*cmd, "worker", "--device", "cpu", "--checkpoint", missing, "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 2
    assert "cannot load the model" in worker.stderr and "Traceback" not in worker.stderr
    serve = subprocess.run(
        [*cmd, "serve", "--device", "cpu", "--checkpoint", missing, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 1, serve.stderr
    assert "checkpoint folder not found" in serve.stderr and "the worker exited with 2" in serve.stderr
