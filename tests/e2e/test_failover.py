"""The failover drill (issue 22): one master, one replica and three Sentinels on loopback
(`redis-server --sentinel`), the API and two workers (the paced scripted pipeline), jobs streaming
to SSE clients (the project's Python client), a prober POSTing quick jobs; the master is killed
with -9 mid-run and comes back as the new master's replica once the Sentinels have named one.

Every accepted job ends exactly once with its one attempt (no worker loses its job), every SSE
client resumes across the failover and receives exactly the job's event log, and the window in
which POST is refused (503, never a 500) is measured and bounded. testkit/failover.py has the parts;
bench/failover_soak.py repeats the failover."""

from __future__ import annotations

import json

import pytest
from testkit.failover import SERVICE, Follower, Prober, fail_over, first_bad_run, job, start_topology, verify
from testkit.jobs import submit
from testkit.processes import launch_worker, start_api, wait_for, wait_workers

pytestmark = pytest.mark.slow

# kill -9 -> the Sentinels agree the master is down (down-after 1 s, quorum 2 of 3), vote, promote
# the replica; the old node comes back as its replica and writes are taken again (min-replicas-
# to-write 1). A few seconds on loopback; the bound leaves room for a loaded 2-core machine.
MAX_REFUSED_S = 20.0


def test_a_master_killed_mid_run_loses_no_accepted_job_robs_no_worker_and_every_stream_resumes(
    tiny_checkpoint, tmp_path, logdir, procs
):
    topology = start_topology(tmp_path / "redis")
    try:
        api, base = start_api(topology.url, logdir, **SERVICE)
        procs.append(api)
        workers = {
            name: launch_worker(
                topology.url,
                tiny_checkpoint,
                logdir,
                name,
                pipeline="testkit.pipelines:paced_pipeline",
                **SERVICE,
            )
            for name in ("a", "b")
        }
        procs += list(workers.values())
        wait_workers(topology.url, workers)

        long_jobs = [submit(base, job(60, seed))["id"] for seed in range(3)]  # ~6 s each: two run, one waits
        followers = [Follower(base, job_id) for job_id in long_jobs]
        wait_for(
            lambda: sum(any(e.name == "image.progress" for e in f.events) for f in followers) >= 2,
            60,
            what="two jobs drawing",
        )
        prober = Prober(base)
        wait_for(lambda: len(prober.accepted()) >= 2, 30, what="the prober's first jobs")

        failover = fail_over(topology)
        wait_for(
            lambda: sum(p.status == 202 for p in prober.probes if p.at > failover.rejoined_at) >= 4,
            60,
            what="POSTs accepted again",
        )
        prober.stop()

        refused = first_bad_run(prober.probes, failover.kill_at)
        statuses = sorted({p.status for p in prober.probes})
        verdict = verify(base, long_jobs + prober.accepted(), followers)
        figures = {
            "promotion_s": round(failover.promotion_s, 2),
            "rejoined_s": round(failover.rejoined_at - failover.kill_at, 2),
            "refused_s": None if refused is None else round(refused[1] - refused[0], 2),
            "probes": len(prober.probes),
            "statuses": statuses,
            "verdict": verdict.to_json(),
        }
        (logdir / "failover.json").write_text(json.dumps(figures, indent=2))
        print("failover drill:", json.dumps(figures))

        assert verdict.ok, figures
        assert verdict.terminal_events == {1: len(long_jobs) + len(prober.accepted())}
        assert all(f.reconnects >= 1 for f in followers), "a stream did not cross the failover"
        assert set(statuses) <= {202, 503}, "a refusal other than 503 (a 500, a dropped connection)"
        assert refused is not None, "no POST was refused: the failover was not seen"
        assert refused[1] - refused[0] < MAX_REFUSED_S, figures
        for name, worker in workers.items():
            assert worker.alive(), name
            assert "claimed a pending job" not in worker.output(), f"worker {name} took another's job"
    finally:
        topology.stop()
