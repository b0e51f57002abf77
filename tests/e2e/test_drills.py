"""Fault drills with real processes (API, workers, redis-server) and the tiny model: a job the
model ends without an image, a worker paused past its lease, Redis killed and restarted from its
AOF, hostile cursors, a trimmed log, budgets and quotas. Every wait is on a condition (an event,
a job state, a log line, a process exit); the only timed pause is the length of a Redis outage."""

from __future__ import annotations

import base64
import signal
import threading
import time

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook
from testkit.asgi import black_png
from testkit.jobs import QUICK, SLOW, TERMINAL, iter_events, payload, stream_events, submit
from testkit.processes import BLOB_DIR, Proc, env_with, start_api, start_worker, wait_for, wait_workers
from testkit.receiver import Receiver

from strokes.model.spec.events import NO_IMAGE_MESSAGE
from strokes.service.cli.serve import free_port
from strokes.service.queue import keys

pytestmark = pytest.mark.slow

# On the tiny checkpoint the interleaved model ends this prompt before it asks for an image. Its
# texts are bounded so that the context's worst case fits the tiny model's 4096 positions (the
# engine refuses a run that could pass them).
NO_IMAGE = {
    "prompt": "a red cube",
    "protocol": "interleaved",
    "width": 128,
    "height": 128,
    "plan": {"max_tokens": 128},
    "reflect": {"max_tokens": 128},
}
FAST_LEASE = {"lease_ttl_s": 2, "heartbeat_interval_s": 0.5, "reclaim_interval_s": 0.2, "cancel_poll_s": 0}


def _job(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/generations/{job_id}", timeout=5).json()


def _ended(base: str, job_id: str) -> dict | None:
    try:
        reply = httpx.get(f"{base}/v1/generations/{job_id}", timeout=5)
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None  # 503 while Redis is away
    job = reply.json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None


def test_interleaved_job_without_an_image_fails_clearly_and_the_worker_runs_the_next(
    redis_url, tiny_checkpoint, logdir, procs
):
    api, base = start_api(redis_url, logdir)
    worker = start_worker(redis_url, tiny_checkpoint, logdir, "solo")
    procs += [api, worker]
    job = submit(base, NO_IMAGE)
    events = stream_events(base, job["id"])
    assert [e.name for e in events if e.name in TERMINAL] == ["job.failed"]
    error = {"type": "no_image", "message": NO_IMAGE_MESSAGE}
    assert payload(events[-1])["error"] == error
    view = _job(base, job["id"])
    assert (view["status"], view["error"], view["final_image"]) == ("failed", {**error, "param": None}, None)
    assert worker.alive()
    after = submit(base, QUICK)
    assert stream_events(base, after["id"])[-1].name == "job.completed"
    assert worker.alive()


def test_a_worker_paused_past_its_lease_is_taken_over_and_writes_nothing_when_it_wakes(
    redis_url, tiny_checkpoint, logdir, procs
):
    api, base = start_api(redis_url, logdir)
    procs.append(api)
    workers = {
        name: start_worker(redis_url, tiny_checkpoint, logdir, name, **FAST_LEASE) for name in ("a", "b")
    }
    procs += list(workers.values())
    job = submit(base, SLOW)
    first = stream_events(base, job["id"], stop=lambda e: e.name == "image.progress")
    victim = next(payload(e)["worker"] for e in first if e.name == "job.started")
    workers[victim].signal(signal.SIGSTOP)
    try:
        events = stream_events(base, job["id"])  # taken over by the other worker, to its end
    finally:
        workers[victim].signal(signal.SIGCONT)
    started = [payload(e) for e in events if e.name == "job.started"]
    assert [(s["attempt"], s["takeover"]) for s in started] == [(1, False), (2, True)]
    assert events[-1].name == "job.completed" and sum(e.name in TERMINAL for e in events) == 1

    # The new attempt's worker ends its bookkeeping (e.g. naming itself the warm holder) first.
    (survivor,) = (proc for name, proc in workers.items() if name != victim)
    wait_for(lambda: "job ended: succeeded" in survivor.output(), 60, 0.1, "the new attempt to end")
    client = redis.Redis.from_url(redis_url)
    before = (client.xrange(keys.events(job["id"])), client.hgetall(keys.job(job["id"])))
    attempt_1 = BLOB_DIR / job["id"] / "1"  # the images the first attempt stored (the blob store)
    stale_images = sorted(attempt_1.iterdir()) if attempt_1.exists() else []
    # The woken worker finds its lease gone and drops the job; its log says so.
    wait_for(lambda: "job ended: lost" in workers[victim].output(), 60, 0.1, "the stale attempt to give up")
    after = (client.xrange(keys.events(job["id"])), client.hgetall(keys.job(job["id"])))
    assert after == before  # no event, no status, no field
    assert (sorted(attempt_1.iterdir()) if attempt_1.exists() else []) == stale_images  # no image
    client.close()
    assert workers[victim].alive()


@pytest.mark.parametrize("outage_s", [0.5, 6.0], ids=["shorter-than-lease", "longer-than-lease"])
def test_redis_kill_9_and_restart_from_the_aof_loses_no_job_and_robs_no_live_worker(
    private_redis, tiny_checkpoint, logdir, procs, outage_s
):
    settings = {**FAST_LEASE, "restart_grace_s": 3}  # the default: a lease and a heartbeat, rounded up
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("appendfsync", "always")  # every 202 is on disk before the kill
    api, base = start_api(private_redis.url, logdir)
    procs.append(api)
    for name in ("a", "b"):
        procs.append(start_worker(private_redis.url, tiny_checkpoint, logdir, name, **settings))
    jobs = [submit(base, {**SLOW, "max_iterations": 1, "seed": i}) for i in range(2)]
    jobs += [submit(base, {**QUICK, "seed": i}) for i in range(2)]
    wait_for(
        lambda: sum(_job(base, j["id"])["status"] == "running" for j in jobs) == 2,
        60,
        0.05,
        "two jobs running",
    )
    private_redis.proc.kill()  # kill -9
    private_redis.proc.wait()
    private_redis.proc = None
    time.sleep(outage_s)  # the outage's length (heartbeat keys expire during the longer one)
    private_redis.start()  # same port and folder: the AOF brings everything back
    admin.config_set("appendfsync", "always")
    for job in jobs:
        assert (
            wait_for(lambda j=job: _ended(base, j["id"]), 120, 0.2, f"{job['id']} to end")["status"]
            == "succeeded"
        )
    for job in jobs:
        events = stream_events(base, job["id"])
        names = [e.name for e in events]
        assert names.count("job.completed") == 1 and sum(n in TERMINAL for n in names) == 1
        started = [payload(e) for e in events if e.name == "job.started"]
        assert [s["takeover"] for s in started] == [False], (job["id"], started)  # one attempt each
    admin.close()


def test_oversize_and_ahead_of_stream_cursors(redis_url, tiny_checkpoint, logdir, procs):
    api, base = start_api(redis_url, logdir)
    procs.append(api)
    queued = submit(base, QUICK)  # no worker yet: it waits
    url = f"{base}/v1/generations/{queued['id']}/events"
    for headers, params, param in [
        ({"Last-Event-ID": "18446744073709551616-0"}, None, "Last-Event-ID"),
        (None, {"after": "0-18446744073709551616"}, "after"),
        (None, {"after": "18446744073709551616-0"}, "after"),
    ]:
        reply = httpx.get(url, headers=headers, params=params, timeout=5)
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["param"] == param
    biggest = {"Last-Event-ID": "18446744073709551615-18446744073709551615"}
    with httpx.stream("GET", url, headers=biggest, timeout=5) as reply:
        assert reply.status_code == 200  # the largest valid id is a cursor like any other

    procs.append(start_worker(redis_url, tiny_checkpoint, logdir, "solo", cancel_poll_s=0))
    running = submit(base, SLOW)
    reader = threading.Thread(target=stream_events, args=(base, running["id"]), daemon=True)
    reader.start()  # the shared reader of this job is busy
    stream_events(base, running["id"], stop=lambda e: e.name == "image.progress")
    ahead: list = []
    connected = threading.Event()

    def follow_from_ahead() -> None:
        url = f"{base}/v1/generations/{running['id']}/events"
        headers = {"Last-Event-ID": "99999999999999-0"}
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=60)) as reply:
            assert reply.status_code == 200
            connected.set()
            ahead.extend(iter_events(reply.iter_lines()))

    late = threading.Thread(target=follow_from_ahead, daemon=True)
    late.start()
    assert connected.wait(30), "the ahead-of-stream client did not connect"
    assert httpx.delete(f"{base}/v1/generations/{running['id']}", timeout=5).status_code == 202
    late.join(30)
    assert not late.is_alive(), "the ahead-of-stream stream stayed open after the terminal event"
    assert ahead == []  # nothing at or before its cursor is sent
    reader.join(30)
    assert not reader.is_alive()
    done = httpx.get(
        f"{base}/v1/generations/{running['id']}/events",
        headers={"Last-Event-ID": "99999999999999-0"},
        timeout=5,
    )
    assert done.status_code == 204


def test_a_trimmed_log_resumed_from_0_says_so_with_a_gap_event(redis_url, tiny_checkpoint, logdir, procs):
    api, base = start_api(redis_url, logdir)
    procs += [api, start_worker(redis_url, tiny_checkpoint, logdir, "solo")]
    job = submit(base, QUICK)
    full = stream_events(base, job["id"])
    client = redis.Redis.from_url(redis_url)
    client.xtrim(keys.events(job["id"]), maxlen=3, approximate=False)  # as a smaller events_maxlen would have
    client.close()
    resumed = stream_events(base, job["id"])
    assert resumed[0].name == "gap" and resumed[0].id is None
    gap = payload(resumed[0])
    assert (gap["after"], gap["next"]) == ("0", full[-3].id)
    assert [(e.id, e.name) for e in resumed[1:]] == [(e.id, e.name) for e in full[-3:]]
    # a cursor inside what is kept resumes without a gap
    assert [e.id for e in stream_events(base, job["id"], last_event_id=full[-3].id)] == [
        e.id for e in full[-2:]
    ]


def test_budget_quota_impossible_parameters_and_redis_refusals_are_clear_answers(redis_url, logdir, procs):
    api, base = start_api(redis_url, logdir, key_max_jobs=2, max_job_cost=16_000_000, api_keys="k1,k2")
    procs.append(api)

    def post(body: dict, key: str = "k1") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{base}/v1/generations", json=body, headers=headers, timeout=10)

    bomb = {
        "prompt": "x",
        "max_iterations": 8,
        "draft": {"steps": 200},
        "refine": {"steps": 200},
        "preview_every": 1,
    }
    reply = post(bomb)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["type"] == "budget_exceeded" and error["param"] == "max_job_cost"
    assert "16,000,000" in error["message"] and "token-steps" in error["message"]

    long_texts = {**QUICK, "max_iterations": 8, "plan": {"max_tokens": 4096}, "reflect": {"max_tokens": 4096}}
    reply = post(long_texts)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "max_positions", reply.text
    assert "32,768" in reply.json()["error"]["message"]

    reply = post({**QUICK, "plan": {"do_sample": True, "temperature": 1e-300}})
    assert reply.status_code == 422 and "temperature" in reply.json()["error"]["param"]

    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory", 1)  # Redis out of memory: writes refused with OOM
    try:
        reply = post({**QUICK, "seed": 9})
    finally:
        client.config_set("maxmemory", 0)
        client.close()
    assert reply.status_code == 503 and reply.headers["Retry-After"], reply.text

    assert post(QUICK).status_code == 202 and post(QUICK).status_code == 202
    reply = post(QUICK)
    assert reply.status_code == 429 and reply.json()["error"]["type"] == "quota_exceeded"
    assert int(reply.headers["Retry-After"]) >= 1
    assert post(QUICK, key="k2").status_code == 202  # another key has its own quota


def _long_step_worker(redis_url, checkpoint, logdir, **settings) -> Proc:
    env = env_with(redis_url, **settings)  # with tests/ on PYTHONPATH, for testkit.pipelines
    args = ["worker", "--checkpoint", str(checkpoint), "--device", "cpu", "--name", "decoding"]
    worker = Proc(
        [*args, "--pipeline", "testkit.pipelines:long_step_pipeline"], env, logdir / "worker-decoding.log"
    )
    wait_workers(redis_url, {"decoding": worker})
    return worker


def test_sigterm_in_the_middle_of_a_long_step_hands_the_job_back_without_waiting_for_it(
    redis_url, tiny_checkpoint, logdir, procs
):
    api, base = start_api(redis_url, logdir)
    procs.append(api)
    worker = _long_step_worker(redis_url, tiny_checkpoint, logdir)
    procs.append(worker)
    job = submit(base, QUICK)
    stream_events(base, job["id"], stop=lambda e: e.name == "image.progress")  # inside the long step
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0, "the worker waited for the step to end"  # the step sleeps 60 s
    view = _job(base, job["id"])
    assert (view["status"], view["attempt"]) == ("queued", 1)
    events = stream_events(
        base, job["id"], stop=lambda e: e.name == "job.queued" and payload(e).get("reason")
    )
    assert payload(events[-1])["reason"] == "handback"
    assert [e.name for e in events].count("image.progress") == 1  # the step's result is dropped


def test_a_job_without_progress_past_its_lease_fails_and_the_worker_exits_for_a_restart(
    redis_url, tiny_checkpoint, logdir, procs
):
    api, base = start_api(redis_url, logdir)
    procs.append(api)
    worker = _long_step_worker(
        redis_url, tiny_checkpoint, logdir, progress_timeout_s=2, heartbeat_interval_s=0.5
    )
    procs.append(worker)
    upload = "data:image/png;base64," + base64.b64encode(black_png(48, 32)).decode()
    job = submit(base, {**QUICK, "input_image": upload})
    assert (BLOB_DIR / job["id"] / "0" / "input").exists()
    events = stream_events(base, job["id"])  # the step hangs; the progress lease ends the job
    assert events[-1].name == "job.failed"
    assert payload(events[-1])["error"]["type"] == "no_progress"
    assert worker.wait(10) == 3  # a hung kernel cannot be interrupted: exit, to be restarted
    assert not (BLOB_DIR / job["id"] / "0" / "input").exists()  # the job ended: its input went first


def test_strokes_serve_outlives_a_job_that_breaks_its_worker(redis_url, tiny_checkpoint, tmp_path):
    port = free_port()
    env = env_with(redis_url, max_attempts=1)  # with tests/ on PYTHONPATH, for testkit.pipelines
    cmd = ["serve", "--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
    serve = Proc(
        [*cmd, "--redis-url", redis_url, "--pipeline", "testkit.pipelines:device_error_pipeline"],
        env,
        tmp_path / "serve.log",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(base), 60, 0.1, "strokes serve to answer")
        broken = submit(base, {**QUICK, "prompt": "device error"})
        events = stream_events(base, broken["id"])
        assert events[-1].name == "job.failed"
        assert "CUDA error: an illegal memory access" in payload(events[-1])["error"]["message"]
        after = submit(base, QUICK)  # taken by the worker `strokes serve` started in its place
        assert stream_events(base, after["id"])[-1].name == "job.completed"
        assert serve.alive()
        assert "the worker exited with 3; restarting it" in serve.output()
    finally:
        serve.stop()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_open_streams_cap_holds_under_a_burst_and_frees_its_slots(redis_url, logdir, procs):
    api, base = start_api(redis_url, logdir, sse_max_streams=3)
    procs.append(api)
    job = submit(base, QUICK)  # no worker: its stream stays open
    url = f"{base}/v1/generations/{job['id']}/events"
    statuses: list[int] = []
    opened = threading.Barrier(41)  # 40 clients and the test
    release = threading.Event()

    def client() -> None:
        with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=60)) as reply:
            statuses.append(reply.status_code)
            opened.wait()
            if reply.status_code == 200:
                release.wait(30)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(40)]
    for thread in threads:
        thread.start()
    opened.wait(30)
    assert sorted(statuses) == [200] * 3 + [503] * 37
    release.set()
    for thread in threads:
        thread.join(30)

    def a_slot_is_free() -> bool:
        with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=60)) as reply:
            return reply.status_code == 200

    wait_for(a_slot_is_free, 30, 0.1, "the slots of the closed streams to be given back")


# ---- the end as durable as the start ------------------------------------------------------------

HOOK_SECRET = "whsec_" + base64.b64encode(b"drill-secret-0123456789abcdef").decode()
HOOKS = {
    "webhook_secret": HOOK_SECRET,
    "webhook_allow_networks": "127.0.0.0/8",
    "webhook_timeout_s": 1,
    "webhook_resolve_timeout_s": 0.5,
    "webhook_backoff_base_s": 0.1,
    "webhook_poll_ms": 100,
}


def test_redis_kill_9_right_after_each_finish_under_everysec_delivers_one_end_per_job(
    private_redis, tiny_checkpoint, logdir, procs
):
    """The deploy files' `appendfsync everysec`: Redis is killed -9 the moment a job's terminal
    event is seen, so the finish may be lost and the job run again. Whatever happens, each job
    ends once in its log and its end reaches the receiver under one webhook-id (derived from the
    job and its terminal kind), so de-duplication by id catches a replayed end, and deliveries
    are counted per job. (A kill -9 on one host keeps what Redis wrote into the OS's page cache,
    so here a finish is rarely lost; losing the node (an OS crash, a failover) loses up to a
    second, which is what the waiting finish of issue 22 closes.)"""
    hook = Receiver()
    try:
        settings = {**FAST_LEASE, "restart_grace_s": 1}
        api, base = start_api(private_redis.url, logdir, **HOOKS)
        procs.append(api)
        procs.append(start_worker(private_redis.url, tiny_checkpoint, logdir, "fin", **settings))
        dispatcher_env = env_with(private_redis.url, **HOOKS)
        procs.append(Proc(["webhooks", "--name", "d-drill"], dispatcher_env, logdir / "webhooks.log"))
        jobs = []
        for seed in range(3):
            job = submit(base, {**QUICK, "seed": seed, "webhook_url": hook.url})
            jobs.append(job["id"])
            assert stream_events(base, job["id"])[-1].name == "job.completed"  # the finish just ran
            private_redis.proc.kill()  # kill -9, within milliseconds of the finish: not yet fsynced
            private_redis.proc.wait()
            private_redis.proc = None
            private_redis.start()  # the AOF as it was fsynced (everysec)
        for job_id in jobs:
            assert (
                wait_for(lambda j=job_id: _ended(base, j), 120, 0.2, f"{job_id} to end")["status"]
                == "succeeded"
            )
        client = redis.Redis.from_url(private_redis.url)
        wait_for(lambda: _outbox_drained(client), 60, 0.1, "every webhook delivered")
        client.close()
        delivered: dict[str, list[tuple[str, str]]] = {job_id: [] for job_id in jobs}
        for headers, body, _ in hook.ok():
            message = Webhook(HOOK_SECRET).verify(body, headers)
            delivered[message["data"]["job_id"]].append((headers["webhook-id"], message["type"]))
        reruns = {}
        for job_id in jobs:
            events = stream_events(base, job_id)
            assert sum(e.name in TERMINAL for e in events) == 1, job_id  # one end in the log
            assert len(delivered[job_id]) >= 1, job_id  # none lost
            # One end per job at the receiver: every delivery of it (a redelivery after the
            # rollback, or the rerun's own end) carries the same id and the same kind.
            assert set(delivered[job_id]) == {(f"msg_{job_id}_job.completed", "job.completed")}, delivered
            reruns[job_id] = sum(e.name == "job.started" for e in events) - 1
        # NEEDS issue 22's waiting finish (WAITAOF on the terminal write, the worker re-sending its
        # finish after the restart): then a seen finish is never rolled back into a second run.
        # Against store.finish without the wait, a finish lost in the kill runs the job again
        # (under the same webhook-id, as checked above).
        assert reruns == dict.fromkeys(jobs, 0), f"jobs ran again after a lost finish: {reruns}"
    finally:
        hook.close()


def _outbox_drained(client: redis.Redis) -> bool:
    try:
        pending = client.xpending(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP)["pending"]
    except redis.ResponseError:  # no group yet: the dispatcher has not started
        return False
    return pending == 0 and client.xlen(keys.WEBHOOK_OUTBOX) == 0


def test_a_stream_whose_job_vanishes_ends_with_an_explicit_event(private_redis, logdir, procs):
    """A Redis without persistence restarts (here: the database emptied under the API): the job's
    open stream ends with `error` of type job_gone, not in silence, and GET answers 404."""
    api, base = start_api(private_redis.url, logdir, sse_block_ms=300)
    procs.append(api)
    job = submit(base, QUICK)  # no worker: it stays queued, its stream open
    seen: list = []
    reader = threading.Thread(target=_read_into, args=(base, job["id"], seen))
    reader.start()
    wait_for(lambda: seen, 10, 0.05, "the stream's first event")
    client = redis.Redis.from_url(private_redis.url)
    client.flushall()
    client.close()
    reader.join(30)
    assert not reader.is_alive()
    assert [e.name for e in seen] == ["job.queued", "error"]
    assert payload(seen[-1])["error"]["type"] == "job_gone"
    assert httpx.get(f"{base}/v1/generations/{job['id']}", timeout=5).status_code == 404


def _read_into(base: str, job_id: str, seen: list) -> None:
    """The job's stream, each event appended to `seen` as it arrives, until the stream ends."""
    with httpx.stream(
        "GET", f"{base}/v1/generations/{job_id}/events", timeout=httpx.Timeout(10, read=30)
    ) as reply:
        for event in iter_events(reply.iter_lines()):
            seen.append(event)
