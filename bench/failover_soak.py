"""Failover soak (issue 22): the failover drill of tests/e2e/test_failover.py, over and over.

One master, one replica and three Sentinels on loopback (down-after 1 s, `min-replicas-to-write 1`),
the API and two workers on the paced scripted pipeline (testkit.pipelines:paced_pipeline: no
model, so the 2 cores go to the service), every process on `STROKES_REDIS_MIN_REPLICAS=1`. While
a feeder keeps --in-flight long jobs queued or running (each POST retried with its own
Idempotency-Key until accepted, each accepted job followed by an SSE client, the Python client
resuming with Last-Event-ID) and a prober POSTs a quick job every 0.25 s, the driver kills the
current master with -9 every --every seconds, --failovers times; each time the killed node comes
back as the new master's replica once the Sentinels have named one (what compose's HA profile
does). Then the feeder stops, everything drains, and every accepted job is checked against its
event log (testkit.failover.verify).

Reports, per failover: the node killed, the one promoted, seconds until every Sentinel named it,
until the killed node was back in sync, and the window in which POST was refused (first 503 to
the next 202); and over the run: accepted jobs, terminal events per job (must be exactly 1), jobs
not ended, jobs started more than once or taken over (must be none: no worker loses its job),
followers whose events differ from the log (must be none), SSE reconnects, HTTP statuses seen.
Exit status 1 if an invariant failed.

Usage: .venv/bin/python bench/failover_soak.py --failovers 10 --json bench/results/failover_soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package and the tests' testkit

from testkit.failover import (  # noqa: E402
    SERVICE,
    Follower,
    Prober,
    fail_over,
    first_bad_run,
    job,
    start_topology,
    verify,
)
from testkit.processes import launch_worker, start_api, wait_workers  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Feeder(threading.Thread):
    """Keeps `in_flight` long jobs accepted and not yet ended; follows each with an SSE client."""

    def __init__(self, base: str, in_flight: int, steps: int):
        super().__init__(daemon=True, name="feeder")
        self.base, self.in_flight, self.steps = base, in_flight, steps
        self.followers: list[Follower] = []
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        seed = 0
        with httpx.Client(base_url=self.base, timeout=5) as http:
            while not self.stopping.is_set():
                if sum(f.is_alive() for f in self.followers) >= self.in_flight:
                    self.stopping.wait(0.2)
                    continue
                seed += 1
                key = uuid.uuid4().hex
                while not self.stopping.is_set():  # the same key until accepted: one job
                    try:
                        reply = http.post(
                            "/v1/generations", json=job(self.steps, seed), headers={"Idempotency-Key": key}
                        )
                        if reply.status_code == 202:
                            self.followers.append(Follower(self.base, reply.json()["id"]))
                            break
                    except httpx.HTTPError:
                        pass
                    self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failovers", type=int, default=10)
    parser.add_argument(
        "--every", type=float, default=8.0, help="seconds between a failover's end and the next kill"
    )
    parser.add_argument("--in-flight", type=int, default=4, help="long jobs kept accepted and not ended")
    parser.add_argument("--steps", type=int, default=40, help="steps per image of a long job (0.05 s each)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="strokes-failover-soak-"))
    logdir = folder / "logs"
    logdir.mkdir()
    settings = {**SERVICE, "log_level": "WARNING"}
    topology = start_topology(folder / "redis")
    procs = []
    try:
        api, base = start_api(topology.url, logdir, **settings)
        procs.append(api)
        workers = {
            name: launch_worker(
                topology.url, folder, logdir, name, pipeline="testkit.pipelines:paced_pipeline", **settings
            )
            for name in ("a", "b")
        }
        procs += list(workers.values())
        wait_workers(topology.url, workers)
        log(f"up: API {base}, workers a and b, Redis via {topology.url}")

        feeder = Feeder(base, args.in_flight, args.steps)
        prober = Prober(base)
        failovers = []
        for n in range(args.failovers):
            time.sleep(args.every)  # a soak, not a test: the pace between faults is the point
            failover = fail_over(topology)
            failovers.append(failover)
            log(
                f"failover {n + 1}: killed {failover.killed}, promoted {failover.promoted} "
                f"after {failover.promotion_s:.2f} s, rejoined after {failover.rejoined_at - failover.kill_at:.2f} s"
            )
        time.sleep(args.every)  # the last failover's window closes
        feeder.stop()
        prober.stop()
        accepted = [f.job_id for f in feeder.followers] + prober.accepted()
        log(f"draining {len(accepted)} accepted jobs")
        verdict = verify(base, accepted, feeder.followers, timeout=300)
        alive = {name: w.alive() for name, w in workers.items()}
        claimed = {name: "claimed a pending job" in w.output() for name, w in workers.items()}
    finally:
        for proc in procs:
            proc.stop()
        topology.stop()

    rows = []
    for i, failover in enumerate(failovers):
        until = failovers[i + 1].kill_at if i + 1 < len(failovers) else float("inf")
        refused = first_bad_run(prober.probes, failover.kill_at, until)
        rows.append(
            {
                "killed": failover.killed,
                "promoted": failover.promoted,
                "promotion_s": round(failover.promotion_s, 2),
                "rejoined_s": round(failover.rejoined_at - failover.kill_at, 2),
                "refused_s": None if refused is None else round(refused[1] - refused[0], 2),
            }
        )
    windows = [r["refused_s"] for r in rows if r["refused_s"] is not None]
    statuses: dict[str, int] = {}
    for probe in prober.probes:
        statuses[str(probe.status)] = statuses.get(str(probe.status), 0) + 1
    ok = verdict.ok and all(alive.values()) and not any(claimed.values()) and set(statuses) <= {"202", "503"}
    report = {
        "command": "python bench/failover_soak.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "loadavg_at_end": list(os.getloadavg()),
        "settings": {
            "service": settings,
            "failovers": args.failovers,
            "every_s": args.every,
            "in_flight": args.in_flight,
        },
        "failovers": rows,
        "refused_s": {
            "max": max(windows, default=None),
            "median": statistics.median(windows) if windows else None,
            "failovers_with_refusals": len(windows),
        },
        "probe_statuses": statuses,
        "long_jobs": len(feeder.followers),
        "verdict": verdict.to_json(),
        "workers_alive": alive,
        "workers_claimed_a_pending_job": claimed,
        "ok": ok,
        "wall_s": round(time.monotonic() - began, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
