"""Webhooks: the address check, Standard Webhooks signatures checked by the independent
`standardwebhooks` package, the outbox written by the emit path (real redis-server), and the
dispatcher as a real process delivering to a real HTTP receiver on loopback that fails the first
deliveries, is killed mid-retry, and gives up when told to."""

from __future__ import annotations

import base64
import json
import signal
import time

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook
from testkit.jobs import QUICK, submit
from testkit.processes import Proc, env_with, start_api, start_worker, wait_for
from testkit.receiver import Receiver

from strokes.service.cli.serve import free_port
from strokes.service.queue import keys
from strokes.service.queue.client import connect
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.store import Store
from strokes.service.shared import webhooks
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.owners import owner_of
from strokes.service.shared.settings import Settings
from strokes.service.webhooks.dispatcher import Dispatcher, Message
from strokes.service.webhooks.metrics import WebhookMetrics

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
LOOPBACK = "127.0.0.0/8"
# Retries come fast in tests: each waits max(backoff, resolve + timeout + 1 s) = 2.5 s.
FAST = {
    "webhook_secret": SECRET,
    "webhook_allow_networks": LOOPBACK,
    "webhook_timeout_s": 1,
    "webhook_resolve_timeout_s": 0.5,
    "webhook_backoff_base_s": 0.1,
    "webhook_poll_ms": 100,
}


# ---- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("8.8.8.8", None),
    ],
)
def test_address_check_refuses_internal_addresses(address: str, why: str | None):
    reason = webhooks.refused(address, [])
    assert (reason is None) if why is None else (reason is not None and reason.startswith(why)), reason


def test_allowed_networks_are_exempt():
    assert webhooks.refused("127.0.0.1", webhooks.networks([LOOPBACK])) is None
    assert webhooks.refused("10.0.0.1", webhooks.networks([LOOPBACK])) is not None


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "http:///x", "http://user:pw@example.com/", "http://example.com:99999/"]
)
def test_malformed_urls_are_refused(url: str):
    with pytest.raises(webhooks.UnsafeURL):
        webhooks.parse_url(url)


def test_signature_verifies_with_the_standardwebhooks_package():
    keys = webhooks.secret_keys(SECRET)
    body = webhooks.body("job.completed", "1700000000000-0", json.dumps({"job_id": "gen_x"}))
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": webhooks.sign(keys, "msg_1", stamp, body),
    }
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "job.completed" and payload["data"] == {"job_id": "gen_x"}
    assert payload["timestamp"] == "2023-11-14T22:13:20.000Z"
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body + b" ", headers)


def test_rotation_signs_with_every_secret_so_old_and_new_receivers_verify():
    new = "whsec_" + base64.b64encode(b"the-new-key-of-at-least-16").decode()
    body = webhooks.body("job.failed", "1700000000000-0", json.dumps({"job_id": "gen_y"}))
    stamp = int(time.time())
    signature = webhooks.sign(webhooks.secret_keys(f"{new} {SECRET}"), "msg_2", stamp, body)
    assert len(signature.split(" ")) == 2 and all(s.startswith("v1,") for s in signature.split(" "))
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(stamp), "webhook-signature": signature}
    for secret in (new, SECRET):
        assert Webhook(secret).verify(body, headers)["data"] == {"job_id": "gen_y"}
    other = "whsec_" + base64.b64encode(b"a-key-nobody-signed-with").decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other).verify(body, headers)
    with pytest.raises(ValueError, match="secret 2 of 2"):
        webhooks.secret_keys(f"{new} whsec_!!")


def test_secrets_must_be_whsec_base64():
    for bad in ("abc", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            webhooks.secret_bytes(bad)


async def test_delivery_retries_an_unresolvable_host_and_refuses_an_internal_one(redis_url: str):
    settings = Settings(redis_url=redis_url, webhook_secret=SECRET)
    redis = connect(settings.redis_url, timeout_s=5, connect_timeout_s=1)
    http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
    dispatcher = Dispatcher(settings, "d-unit", WebhookMetrics(), redis, http)
    try:
        gone = Message("1-0", "gen_x", "job.completed", "1-0", "http://no-such-host.invalid/h", "{}")
        assert await dispatcher._post(gone, 1) == "host 'no-such-host.invalid' does not resolve"
        inside = Message("1-0", "gen_x", "job.completed", "1-0", "http://127.0.0.1:9/h", "{}")
        assert (await dispatcher._post(inside, 1)).startswith(
            "refused: host '127.0.0.1' resolves to a loopback"
        )
    finally:
        await dispatcher.http.aclose()
        await dispatcher.r.aclose()


# ---- the emit path writes the outbox -------------------------------------------------------------


async def _enqueue_running(store: Store, job_id: str, url: str, events: list[str] | None) -> int:
    result = await store.enqueue(
        job_id,
        owner="",
        message=JobMessage(prompt="x"),
        body_hash="h",
        idempotency_key=None,
        fields=webhooks.hash_fields(url, events),
    )
    assert result.outcome == "ok"
    entry = await store.poll("w1", 100)
    assert entry is not None and entry[1] == job_id
    started = await store.start(job_id, entry[0], "w1")
    assert started.outcome == "run"
    return started.attempt


async def _outbox(store: Store) -> list[dict[str, str]]:
    entries = await store.r.xrange(keys.WEBHOOK_OUTBOX)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in entries]


async def test_emit_path_copies_subscribed_events_into_the_outbox(store: Store):
    await store.r.delete(keys.WEBHOOK_OUTBOX)
    job_id = "gen_" + "a" * 22
    subscribed = ["job.started", "stage.completed"]
    attempt = await _enqueue_running(store, job_id, "https://hooks.example/x", subscribed)
    await store.emit(job_id, attempt, 1, "text.delta", {"job_id": job_id, "delta": "a"})
    await store.emit(job_id, attempt, 2, "stage.completed", {"job_id": job_id, "stage": "plan"})
    await store.finish(job_id, attempt, JobStatus.succeeded, "job.completed", {"job_id": job_id})
    outbox = await _outbox(store)
    assert [e["event"] for e in outbox] == subscribed  # job.completed was not asked for
    events = await store.read_events(job_id)
    started = next(e for e in events if e.name == "job.started")
    assert (outbox[0]["event_id"], outbox[0]["data"]) == (started.id, started.data)
    stage = next(e for e in events if e.name == "stage.completed")
    assert outbox[1] == {
        "job_id": job_id,
        "event": "stage.completed",
        "event_id": stage.id,
        "url": "https://hooks.example/x",
        "data": stage.data,
        "signer": "",  # the owner whose secrets sign it ("": the server's, without API keys)
    }


async def test_terminal_events_by_default_and_none_without_a_url(store: Store):
    await store.r.delete(keys.WEBHOOK_OUTBOX)
    job_id = "gen_" + "b" * 22
    attempt = await _enqueue_running(store, job_id, "https://hooks.example/x", None)
    await store.emit(job_id, attempt, 1, "stage.completed", {"job_id": job_id})
    assert (await store.cancel(job_id))[0] == "canceling"
    await store.finish(job_id, attempt, JobStatus.canceled, "job.canceled", {"job_id": job_id})
    assert [e["event"] for e in await _outbox(store)] == ["job.canceled"]
    # A job without a webhook writes nothing there.
    plain = "gen_" + "c" * 22
    await store.enqueue(plain, owner="", message=JobMessage(prompt="x"), body_hash="h", idempotency_key=None)
    assert (await store.cancel(plain))[0] == "canceled"
    assert len(await _outbox(store)) == 1


# ---- per-key secrets, the outbox's bound, pause events, ids of terminal events -------------------

SECRET_A = "whsec_" + base64.b64encode(b"key-A-secret-0123456789abcdef").decode()
SECRET_B = "whsec_" + base64.b64encode(b"key-B-secret-0123456789abcdef").decode()
SECRET_B_OLD = "whsec_" + base64.b64encode(b"key-B-old-secret-0123456789").decode()


def _per_key(redis_url: str, **changes) -> Settings:
    return Settings(
        redis_url=redis_url,
        api_keys=["key-a", "key-b"],
        webhook_secrets={"key-a": SECRET_A, "key-b": f"{SECRET_B} {SECRET_B_OLD}"},
        webhook_allow_networks=[LOOPBACK],
        **changes,
    )


async def test_each_key_signs_with_its_own_secrets_so_no_tenant_can_verify_or_forge_anothers(redis_url: str):
    settings = _per_key(redis_url)
    sent: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204)

    redis_client = connect(settings.redis_url, timeout_s=5, connect_timeout_s=1)
    http = httpx.AsyncClient(transport=httpx.MockTransport(receive))
    dispatcher = Dispatcher(settings, "d-keys", WebhookMetrics(), redis_client, http)
    try:
        for n, key in enumerate(("key-a", "key-b")):
            data = json.dumps({"job_id": f"gen_{n}", "ts": 1.0})
            message = Message(
                "1-0", f"gen_{n}", "job.completed", f"1-{n}", "http://127.0.0.1:9/h", data, owner_of(key)
            )
            assert await dispatcher._post(message, 1) is None
        orphan = Message(
            "1-0", "gen_x", "job.completed", "1-9", "http://127.0.0.1:9/h", "{}", owner_of("gone")
        )
        assert "no signing secret" in await dispatcher._post(orphan, 1)  # nobody else's secret signs it
    finally:
        await http.aclose()
        await redis_client.aclose()
    to_a, to_b = ((dict(r.headers), r.content) for r in sent)
    assert Webhook(SECRET_A).verify(to_a[1], to_a[0])["data"]["job_id"] == "gen_0"
    assert Webhook(SECRET_B).verify(to_b[1], to_b[0])["data"]["job_id"] == "gen_1"
    assert Webhook(SECRET_B_OLD).verify(to_b[1], to_b[0])  # key B is rotating: both of its secrets sign
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET_A).verify(to_b[1], to_b[0])  # A's receiver cannot verify B's deliveries ...
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET_B).verify(to_a[1], to_a[0])  # ... nor B's A's: what A holds forges nothing of B's
    assert len(to_b[0]["webhook-signature"].split()) == 2 and len(to_a[0]["webhook-signature"].split()) == 1


def test_per_key_secrets_are_checked_at_start_without_echoing_them(redis_url: str):
    with pytest.raises(ValueError, match="entry 1 names a key that is not in STROKES_API_KEYS"):
        Settings(redis_url=redis_url, api_keys=["key-a"], webhook_secrets={"key-z": SECRET_A})
    with pytest.raises(ValueError, match="entry 2: secret 1 of 1") as caught:
        Settings(
            redis_url=redis_url,
            api_keys=["key-a", "key-b"],
            webhook_secrets={"key-a": SECRET_A, "key-b": "whsec_!!"},
        )
    assert "key-b" not in str(caught.value) and SECRET_A not in str(caught.value)


async def test_a_key_subscribes_only_with_its_own_secret_and_the_job_names_its_signer(
    redis_url: str, store: Store
):
    settings = Settings(
        redis_url=redis_url,
        api_keys=["key-a", "key-c"],
        webhook_secrets={"key-a": SECRET_A},
        webhook_secret=SECRET,  # the server-wide secret signs nothing once there are API keys
        webhook_allow_networks=[LOOPBACK],
    )
    body = {**QUICK, "webhook_url": "http://127.0.0.1:9/h", "webhook_events": ["job.paused", "job.resumed"]}
    reply = await _post(settings, body, key="key-c")
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "webhook_url"
    assert "no webhook signing secret" in reply.json()["error"]["message"]
    reply = await _post(settings, body, key="key-a")  # pause events may be subscribed to
    assert reply.status_code == 202, reply.text
    job = await store.get_job(reply.json()["id"])
    assert job["webhook_signer"] == owner_of("key-a") == job["owner"]
    assert not any(SECRET_A[6:] in value for value in job.values())  # the secret is never stored


async def test_pause_events_reach_the_outbox_and_every_event_carries_ts(store: Store):
    from strokes.model.spec.events import Paused, Stage
    from strokes.service.queue.steering import Steering
    from strokes.service.worker.steering import pause_of

    await store.r.delete(keys.WEBHOOK_OUTBOX)
    job_id = "gen_" + "p" * 22
    attempt = await _enqueue_running(
        store, job_id, "https://hooks.example/x", ["job.paused", "job.resumed", "job.canceled"]
    )
    steering = Steering(store.r, store.settings)
    paused = Paused(1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]})
    assert (
        await steering.pause(job_id, attempt, await pause_of(steering, job_id, attempt, paused)) == "paused"
    )
    await steering.resume(job_id, attempt, {"job_id": job_id, "attempt": attempt, "ts": 1.0})
    assert (await store.cancel(job_id))[0] == "canceled"
    assert [e["event"] for e in await _outbox(store)] == ["job.paused", "job.resumed", "job.canceled"]
    for event in await store.read_events(job_id):
        assert isinstance(json.loads(event.data).get("ts"), float), (event.name, event.data)


async def test_the_outbox_is_bounded_and_what_it_refuses_is_counted_and_kept(redis_url: str, store: Store):
    bounded = store.settings.model_copy(update={"webhook_outbox_max": 2})
    small = Store(store.r, bounded)
    await store.r.delete(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_DEAD, keys.WEBHOOK_DROPPED)
    job_id = "gen_" + "o" * 22
    attempt = await _enqueue_running(
        small, job_id, "https://hooks.example/x", ["job.started", "stage.completed"]
    )
    for seq in (1, 2, 3):
        await small.emit(job_id, attempt, seq, "stage.completed", {"job_id": job_id, "seq": seq})
    assert await small.outbox_stats() == (2, 2)  # job.started and the first stage; two refused
    dead = [
        {k.decode(): v.decode() for k, v in f.items()} for _, f in await store.r.xrange(keys.WEBHOOK_DEAD)
    ]
    assert [d["error"] for d in dead] == ["outbox full", "outbox full"] and dead[0]["job_id"] == job_id
    assert (
        len([e for e in await store.read_events(job_id) if e.name == "stage.completed"]) == 3
    )  # the log keeps all
    from testkit.asgi import AppClient

    async with AppClient(bounded) as client:
        text = (await client.get("/metrics")).text
    assert (
        "strokes_webhook_outbox_messages 2.0" in text and "strokes_webhook_outbox_dropped_total 2.0" in text
    )


def test_a_terminal_events_webhook_id_is_the_jobs_and_its_kind_so_a_replayed_end_is_not_new():
    first = webhooks.message_id("gen_x", "job.completed", "1700000000000-3")
    replayed = webhooks.message_id("gen_x", "job.completed", "1700000009999-0")  # the job ran again
    assert first == replayed == "msg_gen_x_job.completed"
    assert webhooks.message_id("gen_x", "job.failed", "1-0") != first  # another end is another message
    assert webhooks.message_id("gen_x", "stage.completed", "1-0") != webhooks.message_id(
        "gen_x", "stage.completed", "2-0"
    )


# ---- submit-time checks (in-process API) ---------------------------------------------------------


@pytest.fixture
def hook_settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, webhook_secret=SECRET)


async def _post(settings: Settings, body: dict, key: str | None = None) -> httpx.Response:
    from strokes.service.api.app import create_app

    app = create_app(settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post("/v1/generations", json=body, headers=headers)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://0x7f000001/hook",
        "http://no-such-host.invalid/hook",
        "file:///etc/passwd",
    ],
)
async def test_submit_refuses_internal_and_bad_webhook_urls(hook_settings: Settings, url: str):
    reply = await _post(hook_settings, {**QUICK, "webhook_url": url})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "webhook_url" and "webhook_url" in error["message"]


async def test_submit_accepts_an_allowed_network_and_refuses_without_a_secret(
    hook_settings: Settings, redis_url: str
):
    allowed = hook_settings.model_copy(update={"webhook_allow_networks": [LOOPBACK]})
    reply = await _post(allowed, {**QUICK, "webhook_url": "http://127.0.0.1:9/h"})
    assert reply.status_code == 202, reply.text
    assert reply.json()["request"]["webhook_events"] is None
    reply = await _post(Settings(redis_url=redis_url), {**QUICK, "webhook_url": "https://example.com/h"})
    assert reply.status_code == 422 and "not enabled" in reply.json()["error"]["message"]
    reply = await _post(
        allowed, {**QUICK, "webhook_url": "http://127.0.0.1:9/h", "webhook_events": ["text.delta"]}
    )
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "webhook_events.0"
    reply = await _post(allowed, {**QUICK, "webhook_events": ["job.completed"]})
    assert reply.status_code == 422 and "needs a webhook_url" in reply.json()["error"]["message"]


# ---- the dispatcher, end to end -----------------------------------------------------------------


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(fail_first: int = 0) -> Receiver:
        made.append(Receiver(fail_first))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _dispatcher(redis_url: str, logdir, name: str, metrics_port: int | None = None, **settings) -> Proc:
    args = ["webhooks", "--name", name]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    return Proc(args, env_with(redis_url, **{**FAST, **settings}), logdir / f"webhooks-{name}.log")


def _ready(client: redis.Redis) -> bool:
    """A dispatcher runs: it made the group (the test deleted the outbox, and its group, first)."""
    try:
        return any(g["name"] == keys.WEBHOOK_GROUP.encode() for g in client.xinfo_groups(keys.WEBHOOK_OUTBOX))
    except redis.ResponseError:  # no stream yet
        return False


def _verified(delivery: tuple[dict[str, str], bytes, int]) -> dict:
    headers, body, _ = delivery
    return Webhook(SECRET).verify(body, headers)


def _outbox_settled(client: redis.Redis) -> bool:
    pending = client.xpending(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP)["pending"]
    return pending == 0 and client.xlen(keys.WEBHOOK_OUTBOX) == 0


@pytest.mark.slow
def test_a_job_calls_back_signed_and_retried_until_delivered(
    redis_url, tiny_checkpoint, logdir, procs, receiver
):
    hook = receiver(fail_first=2)
    client = redis.Redis.from_url(redis_url)
    client.delete(keys.WEBHOOK_OUTBOX)
    api, base = start_api(redis_url, logdir, **FAST)
    procs.append(api)
    procs.append(start_worker(redis_url, tiny_checkpoint, logdir, "w-hooks"))
    procs.append(_dispatcher(redis_url, logdir, "d1"))
    events = ["stage.completed", "job.completed"]
    job = submit(base, {**QUICK, "webhook_url": hook.url, "webhook_events": events})
    wait_for(
        lambda: any(_verified(d)["type"] == "job.completed" for d in hook.ok()), 60, 0.1, "job.completed"
    )
    wait_for(lambda: _outbox_settled(client), 30, 0.1, "every message delivered")
    client.close()
    # Every message failed twice, then succeeded once, under one webhook-id; each attempt is
    # signed afresh (standardwebhooks verifies every one of them).
    by_id: dict[str, list[int]] = {}
    for delivery in hook.deliveries:
        _verified(delivery)
        by_id.setdefault(delivery[0]["webhook-id"], []).append(delivery[2])
    assert all(statuses == [500, 500, 204] for statuses in by_id.values()), by_id
    payloads = [_verified(d) for d in hook.ok()]
    assert {p["type"] for p in payloads} == set(events)
    stages = sorted((p["data"]["iteration"], p["data"]["stage"]) for p in payloads if p["type"] == events[0])
    final = next(p for p in payloads if p["type"] == "job.completed")
    assert final["data"]["job_id"] == job["id"] and final["data"]["final_image"]["url"].startswith("/v1/")
    done = httpx.get(f"{base}/v1/generations/{job['id']}", timeout=5).json()
    assert done["status"] == "succeeded" and (1, "plan") in stages
    assert stages == sorted((s["iteration"], s["stage"]) for s in done["stages"])


def _cancel_with_hook(base: str, url: str) -> str:
    """A job whose only event is job.canceled, through the real API and Lua (no worker)."""
    job = submit(base, {**QUICK, "webhook_url": url})
    assert httpx.delete(f"{base}/v1/generations/{job['id']}", timeout=5).status_code == 200
    return job["id"]


@pytest.mark.slow
def test_a_dispatcher_killed_mid_retry_loses_nothing(redis_url, logdir, procs, receiver):
    hook = receiver()
    hook.failing.set()
    client = redis.Redis.from_url(redis_url)
    client.delete(keys.WEBHOOK_OUTBOX)
    api, base = start_api(redis_url, logdir, **FAST)
    procs.append(api)
    first = _dispatcher(redis_url, logdir, "d-first")
    procs.append(first)
    job_id = _cancel_with_hook(base, hook.url)
    wait_for(lambda: hook.count() >= 2, 30, 0.05, "two failed attempts")  # in its retry loop
    first.signal(signal.SIGKILL)
    first.wait(10)
    failed = hook.count()
    hook.failing.clear()
    second = _dispatcher(redis_url, logdir, "d-second")
    procs.append(second)
    wait_for(lambda: hook.ok(), 30, 0.05, "delivery by the second dispatcher")
    wait_for(lambda: _outbox_settled(client), 10, 0.05, "the outbox to drain")
    client.close()
    payload = _verified(hook.ok()[0])
    assert payload["type"] == "job.canceled" and payload["data"]["job_id"] == job_id
    assert len({d[0]["webhook-id"] for d in hook.deliveries}) == 1
    assert len(hook.deliveries) == failed + 1 and len(hook.ok()) == 1


@pytest.mark.slow
def test_refused_at_delivery_and_given_up_after_the_retry_window(redis_url, logdir, procs, receiver):
    hook = receiver()
    hook.failing.set()
    client = redis.Redis.from_url(redis_url)
    client.delete(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_DEAD)
    api, base = start_api(redis_url, logdir, **FAST)
    procs.append(api)
    port = free_port()
    # The dispatcher retries for 4 s: one attempt, one retry 2.5 s later, then it gives up.
    procs.append(_dispatcher(redis_url, logdir, "d-give-up", metrics_port=port, webhook_retry_for_s=4))
    wait_for(lambda: _ready(client), 30, 0.05, "the dispatcher")
    gave_up = _cancel_with_hook(base, hook.url)
    wait_for(lambda: client.xlen(keys.WEBHOOK_DEAD) == 1, 30, 0.05, "the give-up")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'strokes_webhook_deliveries_total{outcome="given_up"} 1.0' in metrics
    assert 'strokes_webhook_deliveries_total{outcome="failed"} 1.0' in metrics
    # Its own allow list empty, a dispatcher refuses the loopback URL that the API accepted (as
    # when DNS changes under a name after submit), without calling it.
    procs[-1].stop()
    procs.append(_dispatcher(redis_url, logdir, "d-strict", webhook_allow_networks=""))
    refused_id = _cancel_with_hook(base, hook.url)
    wait_for(lambda: client.xlen(keys.WEBHOOK_DEAD) == 2, 30, 0.05, "the refusal")
    dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(keys.WEBHOOK_DEAD)]
    client.close()
    assert dead[0]["job_id"] == gave_up and dead[0]["attempts"] == "2" and dead[0]["error"] == "HTTP 500"
    assert dead[1]["job_id"] == refused_id and "loopback" in dead[1]["error"]
    assert hook.count() == 2  # the refused one never reached the receiver


@pytest.mark.slow
def test_strokes_serve_runs_a_dispatcher_when_a_secret_is_set(
    redis_url, tiny_checkpoint, logdir, procs, receiver
):
    hook = receiver()
    client = redis.Redis.from_url(redis_url)
    client.delete(keys.WEBHOOK_OUTBOX)
    port = free_port()
    args = ["serve", "--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
    serve = Proc(args, env_with(redis_url, **FAST), logdir / "serve.log")
    procs.append(serve)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert serve.alive(), serve.output()
        try:
            return httpx.get(base + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, 0.1, "strokes serve to be ready")
    job = submit(base, {**QUICK, "webhook_url": hook.url})
    wait_for(hook.ok, 60, 0.1, "the terminal event's delivery")
    payload = _verified(hook.ok()[0])
    assert payload["type"] == "job.completed" and payload["data"]["job_id"] == job["id"]
    client.close()
    serve.signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    lines = [json.loads(line) for line in serve.output().splitlines() if line.startswith("{")]
    said = [line["msg"] for line in lines if line.get("process") == "webhooks"]
    assert said[0].endswith("started") and said[-1].endswith("stopped"), said  # stopped with serve


@pytest.mark.slow
def test_a_dead_dispatchers_backlog_is_taken_over_page_by_page(redis_url, logdir, procs, receiver):
    # 120 messages pending on a consumer that died after its first attempts (more than one page
    # of XPENDING); a dispatcher with 8 slots takes them all over, each delivered once.
    hook = receiver()
    client = redis.Redis.from_url(redis_url)
    client.delete(keys.WEBHOOK_OUTBOX)
    client.xgroup_create(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, id="0", mkstream=True)
    now_ms = int(time.time() * 1000)
    for i in range(120):
        job_id = f"gen_{i:022d}"
        data = json.dumps({"job_id": job_id})
        fields = {"job_id": job_id, "event": "job.completed", "event_id": f"{now_ms}-{i}", "url": hook.url}
        client.xadd(keys.WEBHOOK_OUTBOX, {**fields, "data": data})
    assert len(client.xreadgroup(keys.WEBHOOK_GROUP, "ghost", {keys.WEBHOOK_OUTBOX: ">"})[0][1]) == 120
    procs.append(_dispatcher(redis_url, logdir, "d-heir", webhook_concurrency=8))
    wait_for(lambda: _outbox_settled(client), 60, 0.1, "the backlog delivered")
    client.close()
    ids = [d[0]["webhook-id"] for d in hook.ok()]
    assert len(ids) == len(set(ids)) == 120
