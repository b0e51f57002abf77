"""The Sentinel failover drill's parts, shared by tests/e2e/test_failover.py (one failover) and
bench/failover_soak.py (one after another): job bodies for the paced pipeline, SSE followers (the
project's Python client, which resumes a dropped stream with Last-Event-ID), a prober that POSTs
quick jobs to measure the window of 503s, the failover itself (kill -9 of the master, the Sentinels
naming the replica, the old node back as the new master's replica), and the check of every
accepted job against its event log. Every wait is on a condition."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
from strokes_client.sync import Client

from testkit.jobs import TERMINAL, stream_events
from testkit.redis_ha import SentinelRedis, wait_until


def job(steps: int, seed: int) -> dict:
    """A guided job of one iteration whose two images take `steps` steps each (paced_pipeline)."""
    return {
        "prompt": "a red cube on a blue sphere",
        "width": 64,
        "height": 64,
        "max_iterations": 1,
        "seed": seed,
        "draft": {"steps": steps},
        "refine": {"steps": steps},
        "plan": {"max_tokens": 8},
        "reflect": {"max_tokens": 8},
    }


# The service's side of the drill: a short lease (the grace after the failover is a lease and a
# heartbeat), and every acknowledged write waiting for the one replica.
SERVICE = {
    "lease_ttl_s": 2,
    "heartbeat_interval_s": 0.5,
    "reclaim_interval_s": 0.2,
    "redis_min_replicas": 1,
    "redis_replica_timeout_ms": 500,
    "queue_cap": 500,
    "log_level": "INFO",
}
# Redis' side: a master without its replica refuses writes (a 503) instead of taking what a
# failover would lose. With one replica, writes wait for the old node to come back as a replica.
SERVERS = {"min-replicas-to-write": "1", "min-replicas-max-lag": "10"}


class Follower(threading.Thread):
    """One SSE client of one job, through the Python client: its events, in the order received."""

    def __init__(self, base: str, job_id: str):
        super().__init__(daemon=True, name=f"follow-{job_id}")
        self.job_id = job_id
        self.client = Client(base, max_retries=100, backoff_s=0.1, max_backoff_s=1.0, timeout_s=10)
        self.events: list = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for event in self.client.events(self.job_id):
                self.events.append(event)
        except BaseException as exc:  # reported by the check, not lost in the thread
            self.error = exc
        finally:
            self.client.close()

    @property
    def reconnects(self) -> int:
        return self.client.reconnects


@dataclass
class Probe:
    at: float  # time.monotonic()
    status: int  # the HTTP status, 0 for a connection error
    job_id: str | None


class Prober(threading.Thread):
    """POSTs a quick job every `interval_s` (each with its own Idempotency-Key) until stopped."""

    def __init__(self, base: str, interval_s: float = 0.25):
        super().__init__(daemon=True, name="prober")
        self.base, self.interval_s = base, interval_s
        self.probes: list[Probe] = []
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=5) as http:
            seed = 0
            while not self.stopping.is_set():
                seed += 1
                began = time.monotonic()
                try:
                    reply = http.post(
                        "/v1/generations", json=job(2, seed), headers={"Idempotency-Key": uuid.uuid4().hex}
                    )
                    accepted = reply.status_code == 202
                    self.probes.append(
                        Probe(began, reply.status_code, reply.json()["id"] if accepted else None)
                    )
                except httpx.HTTPError:
                    self.probes.append(Probe(began, 0, None))
                self.stopping.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def accepted(self) -> list[str]:
        return [p.job_id for p in self.probes if p.job_id]

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


@dataclass
class Failover:
    """One failover: the master killed, the one named after it, and when each step was seen."""

    killed: str
    promoted: str
    kill_at: float
    named_at: float  # every Sentinel names the new master
    rejoined_at: float  # the killed node is the new master's replica again, in sync

    @property
    def promotion_s(self) -> float:
        return self.named_at - self.kill_at


def fail_over(topology: SentinelRedis) -> Failover:
    """kill -9 the master; once the Sentinels name another, start the killed node again as its
    replica (what a supervisor that asks the Sentinels does: deploy/compose.yaml's HA profile)."""
    old = topology.current_master()
    kill_at = time.monotonic()
    old.kill()
    new = topology.wait_new_master(old)
    named_at = time.monotonic()
    old.start(extra_args=["--replicaof", "127.0.0.1", str(new.port)])
    topology.wait_settled(new)
    return Failover(old.address, new.address, kill_at, named_at, time.monotonic())


def first_bad_run(
    probes: list[Probe], since: float, until: float = float("inf")
) -> tuple[float, float] | None:
    """(first refused probe, first accepted one after it) from `since` (up to `until`): the window
    in which POST was refused; None when every probe was accepted."""
    later = [p for p in probes if since <= p.at < until]
    bad = next((i for i, p in enumerate(later) if p.status != 202), None)
    if bad is None:
        return None
    good = next((p for p in later[bad:] if p.status == 202), None)
    return later[bad].at, (good.at if good else float("inf"))


@dataclass
class Verdict:
    """What the drill checks for every accepted job, counted."""

    accepted: int = 0
    succeeded: int = 0
    terminal_events: dict[int, int] = field(default_factory=dict)  # how many jobs had k terminal events
    not_ended: list[str] = field(default_factory=list)
    takeovers: list[str] = field(default_factory=list)  # jobs started more than once, or taken over
    streams_checked: int = 0
    streams_differing: list[str] = field(default_factory=list)  # a follower's events != the log
    stream_errors: list[str] = field(default_factory=list)
    reconnects: int = 0

    @property
    def ok(self) -> bool:
        exactly_once = set(self.terminal_events) <= {1}
        return (
            exactly_once
            and not self.not_ended
            and not self.takeovers
            and not self.streams_differing
            and not self.stream_errors
        )

    def to_json(self) -> dict:
        return {**self.__dict__, "terminal_events": {str(k): v for k, v in self.terminal_events.items()}}


def _ended(base: str, job_id: str) -> dict | None:
    try:
        reply = httpx.get(f"{base}/v1/generations/{job_id}", timeout=5)
    except httpx.HTTPError:
        return None
    view = reply.json() if reply.status_code == 200 else None
    return view if view and view["status"] in ("succeeded", "failed", "canceled") else None


def verify(base: str, accepted: list[str], followers: list[Follower], timeout: float = 120) -> Verdict:
    """Every accepted job ends exactly once with one attempt, and each follower received exactly
    the job's event log (ids, names, data), in order, nothing twice."""
    verdict = Verdict(accepted=len(accepted))
    deadline = time.monotonic() + timeout
    logs: dict[str, list] = {}
    for job_id in accepted:
        try:
            view = wait_until(lambda j=job_id: _ended(base, j), max(1.0, deadline - time.monotonic()), job_id)
        except AssertionError:
            verdict.not_ended.append(job_id)
            continue
        verdict.succeeded += view["status"] == "succeeded"
        events = stream_events(base, job_id)
        logs[job_id] = events
        terminal = sum(e.name in TERMINAL for e in events)
        verdict.terminal_events[terminal] = verdict.terminal_events.get(terminal, 0) + 1
        started = [json.loads(e.data) for e in events if e.name == "job.started"]
        if len(started) != 1 or started[0]["takeover"]:
            verdict.takeovers.append(job_id)
    for follower in followers:
        follower.join(max(1.0, deadline - time.monotonic()))
        verdict.streams_checked += 1
        verdict.reconnects += follower.reconnects
        if follower.error is not None or follower.is_alive():
            verdict.stream_errors.append(f"{follower.job_id}: {follower.error or 'still running'}")
            continue
        got = [(e.id, e.name, e.data) for e in follower.events]
        want = [(e.id, e.name, json.loads(e.data)) for e in logs.get(follower.job_id, [])]
        if got != want:
            verdict.streams_differing.append(follower.job_id)
    return verdict


def start_topology(folder) -> SentinelRedis:
    """One master, one replica, three Sentinels (down-after 1 s), servers as SERVERS says."""
    return SentinelRedis(folder, replicas=1, sentinels=3, options=SERVERS).start()
