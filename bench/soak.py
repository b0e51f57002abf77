"""Soak: small jobs, with pause, continue and fork traffic, through 2 workers while workers are killed,
Redis restarts and the blob store breaks for a minute.

Loopback only, bounded by --minutes. The driver starts a private redis-server (AOF on), the API
and two CPU workers on the tiny checkpoint (each worker's torch threads sized to its share of the
cores: STROKES_LOCAL_WORKERS=2), with three API keys holding a quota of STROKES_KEY_MAX_JOBS queued
and running jobs each, and submits --jobs jobs (bursts of 8 for one key, past its quota, and the
rest round robin over the keys, --rate a second on average so the traffic spans the faults; each
with its own Idempotency-Key, retried on 429/503/connection errors, so a POST whose reply was lost
is not a second job). Traffic besides plain jobs:

- pauses: one job in five asks `pause_after: ["plan"]`; a steering thread continues each paused
  job: unchanged, with an edited plan, or twice at once with two different plans (exactly one
  continue may win, and the finished job's plan must be the winner's text);
- forks: one plain job in seven is forked once it has finished, at their plan with an edited text or with a
  follow-up instruction (forks are jobs like any other, counted in every invariant).

While they run (the chaos phase, the first --chaos-share of the time) it kills a random ready
worker every --kill-every seconds on average with SIGKILL or SIGTERM at random, starting a new one
in its place; restarts Redis once (a clean shutdown) when a third of the jobs have ended; and when
half have ended makes the blob store read-only for --break-s seconds (a read-only bind mount of its
directory: every write fails with EROFS, a refusal, so jobs that need to store an image then fail
`storage_unavailable` at once, and uploads get 503). Then it lets the rest drain, without faults,
until every job has ended or --minutes is up. A quota sampler counts, atomically in Redis, every
key's queued and running jobs every 0.25 s. At the end it reads every accepted job's event log.

Reports: accepted (jobs and forks), completed, failed by cause, canceled, terminal events per job
(must be exactly one), lost (must be 0), completed twice (0), the most queued + running jobs a key
ever had (at most the quota), pauses and continues (double continues: never two winners; edited
plans: every finished one used the winner's text), worker exits the driver did not cause (must be
0: a storage error never restarts a worker), attempts and takeovers, kills by signal, peak Redis
memory. Exit status 1 if an invariant failed.

The broken store needs root (mount); --break-s 0 skips it.

Usage: .venv/bin/python bench/soak.py --jobs 300 --rate 0.5 --minutes 20 --json bench/results/soak.json
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # `python bench/soak.py` from anywhere
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from strokes.service.cli.serve import PrivateRedis, free_port  # noqa: E402
from strokes.service.queue import keys  # noqa: E402
from strokes.service.shared.owners import owner_of  # noqa: E402

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
API_KEYS = ("soak-key-a", "soak-key-b", "soak-key-c")
KEY_MAX_JOBS = 6
SETTINGS = {
    "STROKES_LEASE_TTL_S": "3",
    "STROKES_HEARTBEAT_INTERVAL_S": "0.5",
    "STROKES_RECLAIM_INTERVAL_S": "0.2",
    "STROKES_QUEUE_CAP": "2000",
    "STROKES_API_KEYS": ",".join(API_KEYS),
    "STROKES_KEY_MAX_JOBS": str(KEY_MAX_JOBS),
    "STROKES_LOCAL_WORKERS": "2",
    "STROKES_LOG_LEVEL": "WARNING",
    "STROKES_BLOB_RETRY_BASE_S": "0.1",
}
PAUSE_EVERY, FORK_EVERY = 5, 7  # one job in 5 pauses after its plan; one in 7 is forked
BLOCK, BURST = 20, 8  # in every 20 jobs, 8 back to back for one key: past its quota of 6
PLAN_EDIT = "<ins>draw a {color} cube</ins> <des>a {color} cube on a blue sphere</des>"
# Counts a key's queued and running jobs in one atomic step: its admission set's members, and (the
# truth the set must agree with) the statuses of every job the driver knows to be that key's.
COUNT_ACTIVE = """
local function active(key)
  local s = redis.call('HGET', key, 'status')
  return s == 'queued' or s == 'running'
end
local by_set, by_jobs = 0, 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if active(member) then by_set = by_set + 1 end
end
for i = 2, #KEYS do
  if active(KEYS[i]) then by_jobs = by_jobs + 1 end
end
return {by_set, by_jobs}
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Accepted:
    """The jobs the service accepted, with what the driver must do or check for each."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict[str, dict] = field(default_factory=dict)  # job id -> {key, kind, ...}

    def add(self, job_id: str, **meta) -> None:
        with self.lock:
            self.jobs[job_id] = meta

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return {job_id: dict(meta) for job_id, meta in self.jobs.items()}

    def update(self, job_id: str, **meta) -> None:
        with self.lock:
            self.jobs[job_id].update(meta)


class Cluster:
    """The API and the workers as child processes, their logs in `folder`."""

    def __init__(self, folder: Path, redis_url: str, checkpoint: Path, blob_dir: Path):
        self.folder, self.checkpoint = folder, checkpoint
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("STROKES_", "OMP_"))}
        self.env.update(
            SETTINGS, STROKES_REDIS_URL=redis_url, STROKES_BLOB_DIR=str(blob_dir), PYTHONPATH=str(REPO)
        )
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


# ---- the traffic -----------------------------------------------------------------------------------


def post(client: httpx.Client, url: str, body: dict, headers: dict, deadline: float) -> httpx.Response | None:
    """POST until it is answered with something other than 429/503 (or a lost connection)."""
    while time.monotonic() < deadline:
        try:
            reply = client.post(url, json=body, headers=headers)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if reply.status_code not in (429, 503):
            return reply
        time.sleep(
            min(2.0, float(reply.headers.get("Retry-After", "0.5"))) if reply.status_code == 429 else 0.3
        )
    return None


def submit_all(
    base: str, count: int, rate: float, rng: random.Random, accepted: Accepted, deadline: float
) -> None:
    """POST `count` jobs over the keys: in each block of BLOCK jobs, a burst of BURST back to back
    for one key (more than its quota: some wait on 429), then the rest spread over the keys,
    `rate` a second on average (so the traffic spans the faults). Each is retried with its
    Idempotency-Key until accepted. Every PAUSE_EVERY-th pauses after its plan; every
    FORK_EVERY-th plain one is to be forked once it has finished."""
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            block, position = divmod(i, BLOCK)
            if position < BURST:
                key = API_KEYS[block % len(API_KEYS)]
            else:
                time.sleep(rng.expovariate(rate))
                key = API_KEYS[i % len(API_KEYS)]
            kind = "pause" if i % PAUSE_EVERY == 1 else "plain"
            body = {**JOB, "seed": i, **({"pause_after": ["plan"]} if kind == "pause" else {})}
            headers = {**auth(key), "Idempotency-Key": f"soak-{i}"}
            reply = post(client, f"{base}/v1/generations", body, headers, deadline)
            if reply is None:
                return
            if reply.status_code != 202:
                raise RuntimeError(f"POST answered {reply.status_code}: {reply.text}")
            fork = kind == "plain" and i % FORK_EVERY == 3
            accepted.add(reply.json()["id"], key=key, kind=kind, fork_me=fork, n=i)


def continue_job(client: httpx.Client, base: str, job_id: str, meta: dict, rng: random.Random) -> dict:
    """Continue one paused job: unchanged, with an edited plan, or twice at once (two plans)."""
    url = f"{base}/v1/generations/{job_id}/continue"
    how = rng.choice(["unchanged", "edited", "double"])
    texts = {"unchanged": [None], "edited": [PLAN_EDIT.format(color="green")]}.get(
        how, [PLAN_EDIT.format(color="yellow"), PLAN_EDIT.format(color="purple")]
    )
    replies: list[tuple[str | None, int]] = []

    def one(text: str | None) -> None:
        body = {"text": text} if text is not None else {}
        try:
            reply = client.post(url, json=body, headers=auth(meta["key"]))
            replies.append((text, reply.status_code))
        except httpx.HTTPError:
            replies.append((text, 0))

    threads = [threading.Thread(target=one, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [text for text, status in replies if status == 202]
    return {"how": how, "statuses": sorted(s for _, s in replies), "winners": winners}


def statuses(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    """Every job's status, in one round trip (RedisError while Redis is away)."""
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        replies = pipe.execute()
    return {job_id: (s.decode() if s else None) for job_id, s in zip(job_ids, replies, strict=True)}


def steer(
    base: str, client_r: redis.Redis, rng: random.Random, accepted: Accepted, stop: threading.Event
) -> None:
    """Continue paused jobs; fork a share of the finished plain ones."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(0.2):
            jobs = accepted.snapshot()
            try:
                now = statuses(client_r, list(jobs))
            except redis.RedisError:
                continue
            for job_id, meta in jobs.items():
                status = now[job_id]
                if meta["kind"] == "pause" and status == "paused" and not meta.get("continued"):
                    result = continue_job(client, base, job_id, meta, rng)
                    if result["winners"]:
                        accepted.update(job_id, continued=result)
                    else:
                        accepted.update(job_id, attempts_refused=meta.get("attempts_refused", 0) + 1)
                if meta.get("fork_me") and status == "succeeded" and not meta.get("forked"):
                    follow_up = meta["n"] % 2 == 0
                    spec = (
                        {"job_id": job_id, "instruction": "now make the cube green"}
                        if follow_up
                        else {
                            "job_id": job_id,
                            "iteration": 1,
                            "stage": "plan",
                            "text": PLAN_EDIT.format(color="blue"),
                        }
                    )
                    headers = {**auth(meta["key"]), "Idempotency-Key": f"fork-{job_id}"}
                    try:
                        reply = client.post(f"{base}/v1/generations", json={"fork": spec}, headers=headers)
                    except httpx.HTTPError:
                        continue
                    if reply.status_code == 202:
                        accepted.update(job_id, forked=reply.json()["id"])
                        accepted.add(reply.json()["id"], key=meta["key"], kind="fork", of=job_id, n=-1)
                    elif reply.status_code not in (429, 503):
                        accepted.update(job_id, forked=f"refused {reply.status_code}: {reply.text[:200]}")


def sample_quota(client: redis.Redis, accepted: Accepted, peak: dict, stop: threading.Event) -> None:
    count = client.register_script(COUNT_ACTIVE)
    while not stop.wait(0.25):
        by_key: dict[str, list[str]] = collections.defaultdict(list)
        for job_id, meta in accepted.snapshot().items():
            by_key[meta["key"]].append(keys.job(job_id))
        for key in API_KEYS:
            try:
                by_set, by_jobs = count(keys=[keys.owner_active(owner_of(key)), *by_key[key]])
            except redis.RedisError:
                continue
            peak[key] = max(peak.get(key, 0), int(by_set), int(by_jobs))


def progress(client: redis.Redis, accepted: dict[str, dict]) -> tuple[int, int]:
    """(jobs ended, jobs the steering thread still has work for: a paused job not continued, a
    finished plain job chosen for a fork and not forked yet); (-1, -1) while Redis is away."""
    try:
        now = statuses(client, list(accepted))
    except redis.RedisError:
        return -1, -1
    done = sum(s in ("succeeded", "failed", "canceled") for s in now.values())
    pending = 0
    for job_id, meta in accepted.items():
        if (meta["kind"] == "pause" and now[job_id] == "paused" and not meta.get("continued")) or (
            meta.get("fork_me") and now[job_id] == "succeeded" and not meta.get("forked")
        ):
            pending += 1
    return done, pending


# ---- the broken store ------------------------------------------------------------------------------


def break_store(blob_dir: Path) -> None:
    """Every write below blob_dir fails with EROFS (a read-only bind mount); reads go on."""
    subprocess.run(["mount", "--bind", str(blob_dir), str(blob_dir)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(blob_dir)], check=True)


def mend_store(blob_dir: Path) -> None:
    subprocess.run(["umount", str(blob_dir)], check=True)


# ---- the report ------------------------------------------------------------------------------------


def plan_text(base: str, job_id: str, key: str) -> str | None:
    reply = httpx.get(f"{base}/v1/generations/{job_id}/trajectory", headers=auth(key), timeout=10)
    if reply.status_code != 200:
        return None
    stages = reply.json()["stages"]
    return next((s["text"] for s in stages if s["stage"] == "plan"), None)


def report(client: redis.Redis, base: str, accepted: dict[str, dict]) -> dict:
    outcome: collections.Counter = collections.Counter()
    causes: collections.Counter = collections.Counter()
    terminal_counts: collections.Counter = collections.Counter()
    attempts: collections.Counter = collections.Counter()
    completed_twice = takeovers = lost = 0
    for job_id in accepted:
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
            causes[f"{error.get('type')}: {error.get('message', '')[:100]}"] += 1
    continued = [m["continued"] for m in accepted.values() if m.get("continued")]
    edits_checked = edits_wrong = 0
    for job_id, meta in accepted.items():
        result = meta.get("continued")
        if not result or not result["winners"] or result["winners"][0] is None:
            continue
        if client.hget(keys.job(job_id), "status") != b"succeeded":
            continue  # failed (the broken store): nothing to compare
        edits_checked += 1
        edits_wrong += plan_text(base, job_id, meta["key"]) != result["winners"][0]
    kinds = collections.Counter(m["kind"] for m in accepted.values())
    return {
        "accepted_by_kind": dict(kinds),
        "completed": outcome["succeeded"],
        "failed": outcome["failed"],
        "failed_causes": dict(causes),
        "canceled": outcome["canceled"],
        "lost": lost,
        "terminal_events_per_job": {str(k): v for k, v in sorted(terminal_counts.items())},
        "completed_twice": completed_twice,
        "attempts_per_job": {str(k): v for k, v in sorted(attempts.items())},
        "takeovers": takeovers,
        "continues": dict(collections.Counter(c["how"] for c in continued)),
        "double_continues_with_two_winners": sum(len(c["winners"]) > 1 for c in continued),
        "edited_plans_checked": edits_checked,
        "edited_plans_not_the_winners": edits_wrong,
        "forks_refused": [
            m["forked"] for m in accepted.values() if str(m.get("forked", "")).startswith("refused")
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=0.5, help="jobs submitted per second, on average")
    parser.add_argument("--minutes", type=float, default=20.0, help="the whole run's bound")
    parser.add_argument("--kill-every", type=float, default=15.0, help="mean seconds between worker kills")
    parser.add_argument("--chaos-share", type=float, default=0.6, help="share of --minutes with faults")
    parser.add_argument(
        "--break-s", type=float, default=60.0, help="seconds the blob store is read-only (0: never)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    deadline = began + args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="strokes-soak-"))
    blob_dir = tmp / "blobs"
    blob_dir.mkdir()
    from strokes.model.testing.tiny import make_tiny

    checkpoint = make_tiny(tmp / "tiny", seed=0)
    server = PrivateRedis(tmp / "redis")
    server.start()
    cluster = Cluster(tmp, server.url, checkpoint, blob_dir)
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    peak = {"used_memory": 0, "used_memory_peak": 0}
    quota_peak: dict[str, int] = {}
    stop = threading.Event()
    accepted = Accepted()

    def sample() -> None:
        while not stop.wait(0.5):
            try:
                info = client.info("memory")
            except redis.RedisError:
                continue
            for key in peak:
                peak[key] = max(peak[key], int(info[key]))

    kills: collections.Counter = collections.Counter()
    exits: list[dict] = []  # worker exits the driver did not cause
    redis_restarted_at = broken_at = mended_at = None
    mounted = False
    try:
        for slot in (0, 1):
            cluster.start_worker(slot)
        while True:  # the API must answer before jobs go in
            try:
                if httpx.get(cluster.base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        submitter = threading.Thread(
            target=submit_all,
            args=(cluster.base, args.jobs, args.rate, random.Random(args.seed), accepted, deadline),
            daemon=True,
        )
        threads = [
            threading.Thread(target=sample, daemon=True),
            threading.Thread(target=sample_quota, args=(client, accepted, quota_peak, stop), daemon=True),
            threading.Thread(
                target=steer,
                args=(cluster.base, client, random.Random(args.seed + 1), accepted, stop),
                daemon=True,
            ),
        ]
        for thread in [submitter, *threads]:
            thread.start()
        log(f"submitting {args.jobs} jobs; workers killed every ~{args.kill_every} s")
        next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        chaos_until = began + args.minutes * 60 * args.chaos_share
        while time.monotonic() < deadline:
            time.sleep(0.25)
            jobs = accepted.snapshot()
            done, pending = progress(client, jobs)
            if not submitter.is_alive() and done == len(jobs) and pending == 0 and not mounted:
                break
            now = time.monotonic()
            if redis_restarted_at is None and done >= args.jobs // 3:
                log(f"restarting redis ({done} jobs ended)")
                server.stop()  # SIGTERM: redis flushes its AOF and exits
                server.start()
                redis_restarted_at = round(now - began, 1)
            if args.break_s and broken_at is None and done >= args.jobs // 2:
                log(f"the blob store turns read-only for {args.break_s:g} s ({done} jobs ended)")
                break_store(blob_dir)
                mounted, broken_at = True, round(now - began, 1)
            if mounted and now - began - broken_at >= args.break_s:
                mend_store(blob_dir)
                mounted, mended_at = False, round(now - began, 1)
                log("the blob store is writable again")
            for slot, proc in cluster.workers.items():
                if proc.poll() is not None:  # not one of our kills: those are replaced at once
                    exits.append(
                        {
                            "worker": cluster.names[slot],
                            "code": proc.returncode,
                            "at_s": round(now - began, 1),
                        }
                    )
                    log(f"worker {cluster.names[slot]} exited by itself with {proc.returncode}")
                    cluster.start_worker(slot)
            ready = [slot for slot in (0, 1) if client_exists(client, cluster.names[slot])]
            if now >= next_kill and now < chaos_until and ready:
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
        stop.set()
        submitter.join(5)
        jobs = accepted.snapshot()
        result = {
            "command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
            "jobs_requested": args.jobs,
            "accepted": len(jobs),
            **report(client, cluster.base, jobs),
            "key_max_jobs": KEY_MAX_JOBS,
            "most_active_jobs_per_key": quota_peak,
            "worker_kills": dict(kills),
            "worker_exits_not_caused_by_the_driver": exits,
            "redis_restarted_at_s": redis_restarted_at,
            "blob_store_read_only_s": [broken_at, mended_at],
            "peak_redis_used_memory_bytes": peak["used_memory"],
            "peak_redis_used_memory_peak_bytes": peak["used_memory_peak"],
            "wall_s": round(time.monotonic() - began, 1),
            "cpu_cores": len(os.sched_getaffinity(0)),
        }
    finally:
        stop.set()
        if mounted:
            mend_store(blob_dir)
        cluster.stop()
        client.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base_jobs = sum(1 for m in jobs.values() if m["kind"] != "fork")
    allowed_failures = all(cause.startswith("storage_unavailable") for cause in result["failed_causes"])
    ok = (
        result["lost"] == 0
        and result["completed_twice"] == 0
        and set(result["terminal_events_per_job"]) == {"1"}
        and base_jobs == args.jobs
        and all(count <= KEY_MAX_JOBS for count in quota_peak.values())
        and not exits
        and result["double_continues_with_two_winners"] == 0
        and result["edited_plans_not_the_winners"] == 0
        and not result["forks_refused"]
        and allowed_failures
    )
    result["invariants_hold"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


def client_exists(client: redis.Redis, worker: str) -> bool:
    """The worker heartbeats: its model is loaded and its loop runs."""
    try:
        return bool(client.exists(keys.heartbeat(worker)))
    except redis.RedisError:
        return False


if __name__ == "__main__":
    sys.exit(main())
