"""The service's core flow on a three-node Redis Cluster (redis+cluster://): the API and a worker
(the paced scripted pipeline) as real processes; a job runs to its end over SSE, a stream resumes
with Last-Event-ID, a running job and a queued one are canceled, the job list pages, and /readyz
names the node serving the service's one slot (the `{strokes}` hash tag)."""

from __future__ import annotations

import httpx
import pytest
from redis.crc import key_slot
from testkit.failover import job
from testkit.jobs import TERMINAL, stream_events, submit
from testkit.processes import launch_worker, start_api, wait_for, wait_workers
from testkit.redis_ha import ClusterRedis

pytestmark = pytest.mark.slow


def test_the_core_flow_runs_on_a_redis_cluster(cluster_redis: ClusterRedis, tiny_checkpoint, logdir, procs):
    for server in cluster_redis.servers:
        with server.client() as node:
            node.flushall()
    url = cluster_redis.url
    api, base = start_api(url, logdir)
    worker = launch_worker(url, tiny_checkpoint, logdir, "c1", pipeline="testkit.pipelines:paced_pipeline")
    procs += [api, worker]
    wait_workers(url, {"c1": worker})

    done = submit(base, job(4, 1))["id"]
    events = stream_events(base, done)
    names = [e.name for e in events]
    assert names[:2] == ["job.queued", "job.started"] and names[-1] == "job.completed"
    assert sum(n in TERMINAL for n in names) == 1 and "image.progress" in names
    middle = len(events) // 2
    rest = stream_events(base, done, last_event_id=events[middle].id)  # resumed after an event
    assert [e.id for e in rest] == [e.id for e in events[middle + 1 :]]

    running = submit(base, job(200, 2))["id"]  # ~20 s: canceled long before
    queued = submit(base, job(4, 3))["id"]  # behind it (one worker)
    stream_events(base, running, stop=lambda e: e.name == "image.progress")
    assert httpx.delete(f"{base}/v1/generations/{queued}", timeout=5).status_code in (200, 202)
    assert httpx.delete(f"{base}/v1/generations/{running}", timeout=5).status_code in (200, 202)
    assert stream_events(base, running)[-1].name == "job.canceled"
    queued_names = [e.name for e in stream_events(base, queued)]
    assert queued_names == ["job.queued", "job.canceled"]  # never started

    page = httpx.get(f"{base}/v1/generations", params={"limit": 1}, timeout=5).json()
    after = httpx.get(
        f"{base}/v1/generations", params={"limit": 5, "after": page["data"][0]["id"]}, timeout=5
    ).json()
    assert [j["id"] for j in page["data"] + after["data"]] == [queued, running, done]

    ready = wait_for(lambda: httpx.get(f"{base}/readyz", timeout=5), 10, what="/readyz")
    assert ready.status_code == 200, ready.text
    owner = ready.json()["redis_master"]
    with next(s for s in cluster_redis.servers if s.address == owner).client() as node:
        names = node.keys("*")
    assert names and {key_slot(n) for n in names} == {key_slot(b"strokes")}
