"""Soak: a few hundred small jobs through 2 workers while workers are killed and Redis restarts.

Loopback only, bounded by --minutes. The driver starts a private redis-server (AOF on), the API
and two CPU workers on the tiny checkpoint (each worker's torch threads sized to its share of the
cores: STROKES_LOCAL_WORKERS=2), submits --jobs small jobs (each with its own Idempotency-Key, and
retried on 503/connection errors, so a POST whose reply was lost is not a second job), and while
they run (the chaos phase, the first --chaos-share of the time): kills a random ready worker (one
whose model is loaded) every --kill-every seconds on average with SIGKILL or SIGTERM at random,
starting a new one in its place, and restarts Redis once (a clean shutdown, which flushes the AOF)
when about a third of the jobs have ended. Then it lets the rest drain, without faults, until every
job has ended or --minutes is up. At the end it reads every accepted job's event log from Redis.

Reports: accepted, completed, failed (by cause), canceled, terminal events per job (must be exactly
one), lost (accepted and never ended, or gone: must be 0), jobs completed twice (must be 0), attempts
and takeovers, kills by signal, and peak Redis memory (used_memory sampled every 0.5 s, and
used_memory_peak). Exit status 1 if an invariant failed.

Usage: .venv/bin/python bench/soak.py --jobs 300 --minutes 10 --json bench/results/soak.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # `python bench/soak.py` from anywhere
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from strokes.service.cli.serve import PrivateRedis, free_port  # noqa: E402
from strokes.service.queue import keys  # noqa: E402

JOB = {
    "prompt": "a red cube on a blue sphere",
    "width": 64,
    "height": 64,
    "max_iterations": 1,
    "draft": {"steps": 4},
    "refine": {"steps": 4},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}
TERMINAL = ("job.completed", "job.failed", "job.canceled")
SETTINGS = {
    "STROKES_LEASE_TTL_S": "3",
    "STROKES_HEARTBEAT_INTERVAL_S": "0.5",
    "STROKES_RECLAIM_INTERVAL_S": "0.2",
    "STROKES_QUEUE_CAP": "2000",
    "STROKES_KEY_MAX_JOBS": "0",
    "STROKES_LOCAL_WORKERS": "2",
    "STROKES_LOG_LEVEL": "WARNING",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Cluster:
    """The API and the workers as child processes, their logs in `folder`."""

    def __init__(self, folder: Path, redis_url: str, checkpoint: Path):
        self.folder, self.checkpoint = folder, checkpoint
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("STROKES_", "OMP_"))}
        self.env.update(SETTINGS, STROKES_REDIS_URL=redis_url, PYTHONPATH=str(REPO))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = self._spawn(["api", "--port", str(self.port)], "api")
        self.workers: dict[int, subprocess.Popen] = {}
        self.names: dict[int, str] = {}
        self.generation = 0

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        out = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        return subprocess.Popen(
            [sys.executable, "-m", "strokes.service.cli", *args],
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=out,
        )

    def start_worker(self, slot: int) -> None:
        self.generation += 1
        name = f"w{slot}-{self.generation}"
        self.names[slot] = name
        args = ["worker", "--checkpoint", str(self.checkpoint), "--device", "cpu", "--name", name]
        self.workers[slot] = self._spawn(args, name)

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.api]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers.values(), self.api]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def submit_all(base: str, count: int, deadline: float) -> list[str]:
    """POST `count` jobs; each retried with its Idempotency-Key until accepted (202)."""
    accepted: list[str] = []
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            body = {**JOB, "seed": i}
            while time.monotonic() < deadline:
                try:
                    reply = client.post(
                        f"{base}/v1/generations", json=body, headers={"Idempotency-Key": f"soak-{i}"}
                    )
                except httpx.HTTPError:
                    time.sleep(0.2)
                    continue
                if reply.status_code == 202:
                    accepted.append(reply.json()["id"])
                    break
                if reply.status_code not in (429, 503):
                    raise RuntimeError(f"POST answered {reply.status_code}: {reply.text}")
                time.sleep(
                    float(reply.headers.get("Retry-After", "0.5")) if reply.status_code == 429 else 0.2
                )
    return accepted


def client_exists(client: redis.Redis, worker: str) -> bool:
    """The worker heartbeats: its model is loaded and its loop runs."""
    try:
        return bool(client.exists(keys.heartbeat(worker)))
    except redis.RedisError:
        return False


def ended(client: redis.Redis, job_ids: list[str]) -> int:
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "status")
            statuses = pipe.execute()
    except redis.RedisError:
        return -1
    return sum(s in (b"succeeded", b"failed", b"canceled") for s in statuses)


def report(client: redis.Redis, job_ids: list[str]) -> dict:
    outcome: collections.Counter = collections.Counter()
    causes: collections.Counter = collections.Counter()
    terminal_counts: collections.Counter = collections.Counter()
    attempts: collections.Counter = collections.Counter()
    completed_twice = takeovers = lost = 0
    for job_id in job_ids:
        job = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job_id)).items()}
        events = client.xrange(keys.events(job_id))
        names = [fields[b"event"].decode() for _id, fields in events]
        terminal_counts[sum(n in TERMINAL for n in names)] += 1
        completed_twice += names.count("job.completed") > 1
        started = [json.loads(f[b"data"]) for _id, f in events if f[b"event"] == b"job.started"]
        takeovers += sum(bool(s.get("takeover")) for s in started)
        attempts[int(job.get("attempt", 0))] += 1
        status = job.get("status", "gone")
        if status not in ("succeeded", "failed", "canceled"):
            lost += 1
        outcome[status] += 1
        if status == "failed":
            error = json.loads(job.get("error") or "{}")
            causes[f"{error.get('type')}: {error.get('message', '')[:120]}"] += 1
    return {
        "completed": outcome["succeeded"],
        "failed": outcome["failed"],
        "failed_causes": dict(causes),
        "canceled": outcome["canceled"],
        "lost": lost,
        "terminal_events_per_job": {str(k): v for k, v in sorted(terminal_counts.items())},
        "completed_twice": completed_twice,
        "attempts_per_job": {str(k): v for k, v in sorted(attempts.items())},
        "takeovers": takeovers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=10.0, help="the whole run's bound")
    parser.add_argument("--kill-every", type=float, default=15.0, help="mean seconds between worker kills")
    parser.add_argument("--chaos-share", type=float, default=0.6, help="share of --minutes with faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    deadline = began + args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="strokes-soak-"))
    from strokes.model.testing.tiny import make_tiny

    checkpoint = make_tiny(tmp / "tiny", seed=0)
    server = PrivateRedis(tmp / "redis")
    server.start()
    cluster = Cluster(tmp, server.url, checkpoint)
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    peak = {"used_memory": 0, "used_memory_peak": 0}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.5):
            try:
                info = client.info("memory")
            except redis.RedisError:
                continue
            for key in peak:
                peak[key] = max(peak[key], int(info[key]))

    kills: collections.Counter = collections.Counter()
    redis_restarted_at = None
    try:
        for slot in (0, 1):
            cluster.start_worker(slot)
        threading.Thread(target=sample, daemon=True).start()
        submitter_out: list[str] = []
        submitter = threading.Thread(
            target=lambda: submitter_out.extend(submit_all(cluster.base, args.jobs, deadline)), daemon=True
        )
        while True:  # the API must answer before jobs go in
            try:
                if httpx.get(cluster.base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        submitter.start()
        log(f"submitting {args.jobs} jobs; workers killed every ~{args.kill_every} s")
        next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        chaos_until = began + args.minutes * 60 * args.chaos_share
        while time.monotonic() < deadline:
            time.sleep(0.25)
            done = ended(client, list(submitter_out))
            if not submitter.is_alive() and done == len(submitter_out):
                break
            if redis_restarted_at is None and done >= args.jobs // 3:
                log(f"restarting redis ({done} jobs ended)")
                server.stop()  # SIGTERM: redis flushes its AOF and exits
                server.start()
                redis_restarted_at = round(time.monotonic() - began, 1)
            ready = [slot for slot in (0, 1) if client_exists(client, cluster.names[slot])]
            if time.monotonic() >= next_kill and time.monotonic() < chaos_until and ready:
                slot = rng.choice(ready)
                sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                proc = cluster.workers[slot]
                proc.send_signal(sig)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                kills[sig.name] += 1
                cluster.start_worker(slot)
                next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        submitter.join(5)
        accepted = list(submitter_out)
        stop_sampling.set()
        result = {
            "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
            "jobs_requested": args.jobs,
            "accepted": len(accepted),
            **report(client, accepted),
            "worker_kills": dict(kills),
            "redis_restarted_at_s": redis_restarted_at,
            "peak_redis_used_memory_bytes": peak["used_memory"],
            "peak_redis_used_memory_peak_bytes": peak["used_memory_peak"],
            "wall_s": round(time.monotonic() - began, 1),
            "cpu_cores": len(os.sched_getaffinity(0)),
        }
    finally:
        stop_sampling.set()
        cluster.stop()
        client.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ok = (
        result["lost"] == 0
        and result["completed_twice"] == 0
        and set(result["terminal_events_per_job"]) == {"1"}
        and result["accepted"] == args.jobs
    )
    result["invariants_hold"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
