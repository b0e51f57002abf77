"""Service overhead and event latency, on this machine's CPUs.

1. Overhead: one generation through the whole service (POST -> Redis -> worker process -> SSE ->
   client sees job.completed) against the same pipeline run in-process (iterate its events), same
   checkpoint, parameters and seed, runs interleaved; medians after a warm-up of each. Two
   checkpoints: the shared "small" configuration of DESIGN.md section 5 (256x256, 20 steps: the
   representative case) and the tiny one (a ~0.3 s job that is nearly all events: the worst case).
2. Event latency, worker -> client, with 200 concurrent SSE clients on loopback (tiny model):
   a. "own job": 200 clients each follow their own job; the jobs run back to back on one worker
      (the production shape: many open streams, one GPU's events at a time);
   b. "fan-out": 200 clients follow the same job (every event delivered 200 times).
   Latency = client receive time - the event's `ts` (when the worker's pipeline produced it; the
   clocks are the same machine's). `redis->client` uses the XADD time in the event id instead.
   All clients connect while a blocker job runs, so the figures are for events flowing to open
   streams (opening 200 streams at once costs the API about a second of CPU: all_connected_s).
   Everything shares the 2 cores: the worker computing, the API, Redis and the 200 clients.

Usage: .venv/bin/python bench/service_overhead.py --json bench/results/service_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # `python bench/service_overhead.py` from anywhere
    sys.path.insert(0, str(REPO))

from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings  # noqa: E402
from strokes.service.cli.serve import PrivateRedis, free_port  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def small_checkpoint(seed: int = 0) -> Path:
    """The shared "small" random checkpoint (DESIGN.md section 5), in bench/.ckpt like the other
    CPU benchmarks (written on first use, then reused)."""
    from strokes.model.testing.tiny import make_tiny

    folder = Path(os.environ.get("STROKES_BENCH_CKPT", BENCH_DIR / ".ckpt" / f"small-seed{seed}"))
    if not (folder / "tiny_bagel_info.json").is_file():
        log(f"writing the small random checkpoint to {folder} ...")
        make_tiny(folder, seed=seed, sizes="small")
    return folder


def setup_threads(threads: int = 2) -> None:
    import torch

    torch.set_num_threads(threads)


def _busy(seconds: float) -> float:
    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    try:
        t0, i0 = times()
        time.sleep(seconds)
        t1, i1 = times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_busy: float = 0.25, timeout: float = 180.0) -> dict:
    """The machine is shared: wait (up to `timeout` s) until other processes leave the cores idle."""
    start = time.perf_counter()
    busy = _busy(1.0)
    while busy > max_busy and time.perf_counter() - start < timeout:
        log(f"machine busy ({busy:.0%} of the cores): waiting for quiet ...")
        busy = _busy(3.0)
    return {"busy_before_start": round(busy, 3), "waited_s": round(time.perf_counter() - start, 1)}


def machine() -> dict:
    import platform

    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else "unknown"
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {path}")


TERMINAL = ("job.completed", "job.failed", "job.canceled")

SMALL_JOB = {
    "prompt": "a red cube on top of a blue sphere",
    "width": 256,
    "height": 256,
    "max_iterations": 1,
    "seed": 1,
    "draft": {"steps": 20},
    "refine": {"steps": 20},
    "plan": {"max_tokens": 32},
    "reflect": {"max_tokens": 32},
}
TINY_JOB = {
    **SMALL_JOB,
    "width": 64,
    "height": 64,
    "draft": {"steps": 8},
    "refine": {"steps": 8},
    "plan": {"max_tokens": 16},
    "reflect": {"max_tokens": 16},
}
BLOCKER_JOB = {
    **TINY_JOB,
    "width": 256,
    "height": 256,
    "max_iterations": 2,
    "draft": {"steps": 40},
    "refine": {"steps": 40},
}  # ~3 s on the worker while the clients connect
FANOUT_JOB = {
    **TINY_JOB,
    "width": 128,
    "height": 128,
    "max_iterations": 2,
    "draft": {"steps": 30},
    "refine": {"steps": 30},
}


def params_of(job: dict) -> GenerationParams:
    return GenerationParams(
        prompt=job["prompt"],
        width=job["width"],
        height=job["height"],
        max_iterations=job["max_iterations"],
        seed=job["seed"],
        draft=ImageSettings(steps=job["draft"]["steps"]),
        refine=ImageSettings(
            steps=job["refine"]["steps"],
            cfg_img_scale=2.0,
            cfg_interval=(0.0, 1.0),
            cfg_renorm_type="text_channel",
        ),
        plan=TextSettings(max_tokens=job["plan"]["max_tokens"]),
        reflect=TextSettings(max_tokens=job["reflect"]["max_tokens"]),
    )


@contextmanager
def service(checkpoint: Path, threads: int):
    """A private redis-server, `strokes api` and one `strokes worker` (torch threads = `threads`)."""
    tmp = Path(tempfile.mkdtemp(prefix="strokes-bench-"))
    redis = PrivateRedis(tmp / "redis")
    redis.start()
    env = {
        **os.environ,
        "STROKES_REDIS_URL": redis.url,
        "STROKES_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": str(threads),
        "STROKES_SSE_MAX_STREAMS": "4000",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "strokes.service.cli"]
    api_log, worker_log = (tmp / "api.log").open("wb"), (tmp / "worker.log").open("wb")
    api = subprocess.Popen(
        [*cli, "api", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=api_log
    )
    worker = subprocess.Popen(
        [*cli, "worker", "--checkpoint", str(checkpoint), "--device", "cpu", "--name", "bench"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=worker_log,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if worker.poll() is not None or api.poll() is not None:
                raise RuntimeError((tmp / "worker.log").read_text() + (tmp / "api.log").read_text())
            time.sleep(0.2)
        else:
            raise RuntimeError("the service did not become ready")
        yield base
    finally:
        for proc in (worker, api):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()
        api_log.close()
        worker_log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_in_process(pipeline, job: dict) -> float:
    began = time.perf_counter()
    for _event in pipeline.run(params_of(job)):
        pass
    return time.perf_counter() - began


def run_through_service(base: str, job: dict) -> dict:
    began = time.perf_counter()
    reply = httpx.post(base + "/v1/generations", json=job, timeout=30)
    reply.raise_for_status()
    job_id = reply.json()["id"]
    final = None
    with httpx.stream(
        "GET", f"{base}/v1/generations/{job_id}/events", timeout=httpx.Timeout(30, read=600)
    ) as s:
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in TERMINAL:
                final = (event, json.loads(line[6:]))
                break
    elapsed = time.perf_counter() - began
    assert final and final[0] == "job.completed", final
    return {
        "client_s": elapsed,
        "pipeline_s": final[1]["timings"]["pipeline_s"],
        "attempt_run_s": final[1]["timings"]["attempt_run_s"],
    }


def overhead(checkpoint: Path, job: dict, runs: int, label: str) -> dict:
    from strokes.model.generation.loading import load_engine
    from strokes.model.generation.pipeline import Pipeline

    setup_threads(2)
    pipeline = Pipeline(load_engine(checkpoint, device="cpu"))
    inproc, served = [], []
    with service(checkpoint, threads=2) as base:
        run_in_process(pipeline, job)  # warm-ups
        run_through_service(base, job)
        for i in range(runs):
            # A pause before each run: OpenMP threads of the other process spin-wait for a while
            # after their last parallel region, and would otherwise slow whichever run comes next.
            time.sleep(1.0)
            inproc.append(run_in_process(pipeline, job))
            time.sleep(1.0)
            served.append(run_through_service(base, job))
            log(
                f"{label} run {i + 1}/{runs}: in-process {inproc[-1]:.3f} s, service {served[-1]['client_s']:.3f} s"
            )
    med_in = statistics.median(inproc)
    med_client = statistics.median(r["client_s"] for r in served)
    med_worker_pipeline = statistics.median(r["pipeline_s"] for r in served)
    return {
        "label": label,
        "job": job,
        "runs": runs,
        "in_process_s": [round(x, 4) for x in inproc],
        "service_client_s": [round(r["client_s"], 4) for r in served],
        "service_worker_pipeline_s": [round(r["pipeline_s"], 4) for r in served],
        "median_in_process_s": round(med_in, 4),
        "median_service_s": round(med_client, 4),
        "ratio_service_over_in_process": round(med_client / med_in, 4),
        "overhead_pct": round(100 * (med_client / med_in - 1), 2),
        "worker_pipeline_over_in_process": round(med_worker_pipeline / med_in, 4),
        # the fastest of each: less sensitive to other load on a shared machine
        "ratio_of_minimums": round(min(r["client_s"] for r in served) / min(inproc), 4),
    }


async def _follow(base: str, job_id: str, sink: list, opened: list) -> None:
    """One SSE client on a raw socket: HTTP/1.1 chunked, SSE frames split on blank lines. (httpx's
    line iterator costs ~100 us a line in Python; 200 of them in one process on 2 cores measured
    the client, not the service.)"""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/generations/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
        pending = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            pending += (await reader.readexactly(size + 2))[:-2]
            now = time.time()
            pending = pending.replace(b"\r\n", b"\n")
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                fields = dict(line.split(b": ", 1) for line in frame.split(b"\n") if b": " in line)
                if frame.startswith(b": stream open"):
                    opened.append(now)
                if b"data" not in fields:
                    continue
                data = json.loads(fields[b"data"])
                if "ts" in data:
                    event_ms = int(fields[b"id"].split(b"-")[0])
                    sink.append((now - data["ts"], now - event_ms / 1000))
                if fields.get(b"event", b"").decode() in TERMINAL:
                    return
    finally:
        writer.close()
        await writer.wait_closed()


def _percentiles(samples: list[tuple[float, float]]) -> dict:
    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    produced = [s[0] for s in samples]
    written = [s[1] for s in samples]
    return {
        "events": len(samples),
        "p50_ms": round(pct(produced, 0.50), 2),
        "p99_ms": round(pct(produced, 0.99), 2),
        "max_ms": round(max(produced) * 1000, 2),
        "redis_to_client_p50_ms": round(pct(written, 0.50), 2),
        "redis_to_client_p99_ms": round(pct(written, 0.99), 2),
    }


async def latency(base: str, clients: int, mode: str) -> dict:
    """A blocker job runs first, so every client has connected before the measured jobs start:
    the figures are for events flowing to 200 open streams, not for opening them."""
    limits = httpx.Limits(max_connections=clients + 50, max_keepalive_connections=clients + 50)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30, read=600)) as client:
        samples: list = []
        opened: list = []
        blocker = (await client.post(base + "/v1/generations", json=BLOCKER_JOB)).json()["id"]
        if mode == "own job":
            ids = []
            for _ in range(clients):
                reply = await client.post(base + "/v1/generations", json=TINY_JOB)
                reply.raise_for_status()
                ids.append(reply.json()["id"])
        else:
            reply = await client.post(base + "/v1/generations", json=FANOUT_JOB)
            reply.raise_for_status()
            ids = [reply.json()["id"]] * clients
        began = time.perf_counter()
        followers = [asyncio.create_task(_follow(base, job_id, samples, opened)) for job_id in ids]
        while len(opened) < clients:
            await asyncio.sleep(0.01)
        connected_s = time.perf_counter() - began
        running = (await client.get(f"{base}/v1/generations/{ids[0]}")).json()["status"]
        await asyncio.gather(*followers)
        await client.delete(f"{base}/v1/generations/{blocker}")
        return {
            "mode": mode,
            "clients": clients,
            "jobs": len(set(ids)),
            "all_connected_s": round(connected_s, 2),
            "first_job_status_when_all_connected": running,
            "wall_s": round(time.perf_counter() - began, 2),
            **_percentiles(samples),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tiny-runs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    quiet = wait_for_quiet()
    result = {
        "benchmark": "service_overhead",
        "machine": machine(),
        "quiet": quiet,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    tiny = Path(tempfile.mkdtemp(prefix="strokes-tiny-")) / "ckpt"
    from strokes.model.testing.tiny import make_tiny

    make_tiny(tiny, seed=0)
    result["overhead_small"] = overhead(small_checkpoint(), SMALL_JOB, args.runs, "small")
    result["overhead_tiny"] = overhead(tiny, TINY_JOB, args.tiny_runs, "tiny")
    with service(tiny, threads=1) as base:
        result["latency"] = [
            asyncio.run(latency(base, args.clients, "own job")),
            asyncio.run(latency(base, args.clients, "fan-out")),
        ]
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    shutil.rmtree(tiny.parent, ignore_errors=True)

    print(f"service overhead ({result['command']})")
    for key in ("overhead_small", "overhead_tiny"):
        o = result[key]
        print(
            f"  {o['label']:5s}: in-process {o['median_in_process_s']:.3f} s, through the service "
            f"{o['median_service_s']:.3f} s -> ratio {o['ratio_service_over_in_process']:.3f} "
            f"({o['overhead_pct']:+.1f} %), ratio of minimums {o['ratio_of_minimums']:.3f}, "
            f"worker-side pipeline {o['worker_pipeline_over_in_process']:.3f}x"
        )
    for lat in result["latency"]:
        print(
            f"  latency, {lat['clients']} SSE clients, {lat['mode']} ({lat['jobs']} jobs, {lat['events']} "
            f"events): p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
            f"(redis->client p50 {lat['redis_to_client_p50_ms']} ms, p99 {lat['redis_to_client_p99_ms']} ms)"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
