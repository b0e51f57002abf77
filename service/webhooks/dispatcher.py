"""`strokes webhooks`: the webhook dispatcher, a process apart from the GPU workers.

The emit path (store.py) copies each event a job subscribed to into the outbox stream
keys.WEBHOOK_OUTBOX; dispatchers read it through one consumer group (keys.WEBHOOK_GROUP), so
several share the work. Delivery is at least once, and all retry state lives in the stream's
pending list, so a dispatcher can die at any moment and another (or its restart) carries on:

    new entry    XREADGROUP ">" -> attempt 1
    success      (2xx) XACK + XDEL
    failure      the entry stays pending; XCLAIM JUSTID to ourselves restarts its idle clock
    retry        an entry pending for at least delay(k) after its k-th attempt is XCLAIMed (which
                 counts attempt k+1) by whichever dispatcher sees it first; XCLAIM's min-idle makes
                 that claim exclusive. delay(k) = min(base * 2^(k-1), max), never less than the
                 delivery timeout, so an attempt still in flight is not taken from a live dispatcher
    give up      once the next attempt would come later than `webhook_retry_for_s` after the event
                 (the entry id's time), or at once for a URL whose host now resolves to a refused
                 address (one that does not resolve is retried): logged, counted,
                 copied to keys.WEBHOOK_DEAD, XACK + XDEL

Before each attempt the host is resolved again and checked (webhooks.resolve), and the request goes
to the address that was checked, with the URL's host in Host and TLS SNI, without following
redirects. Messages are signed per Standard Webhooks (webhooks.sign) with the secrets of the API key
that made the job (the entry's `signer`; webhooks.signers), never another key's.

`strokes webhooks` (service/cli/webhooks.py) runs one; so does `strokes serve`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from strokes.service.queue import keys
from strokes.service.queue.client import TRANSIENT, connect
from strokes.service.queue.durability import NotDurable, add_waits, check_waits, pipelined, replica_waits
from strokes.service.shared import logs, webhooks
from strokes.service.shared.settings import Settings
from strokes.service.webhooks.metrics import WebhookMetrics

log = logging.getLogger("strokes.webhooks")
USER_AGENT = "strokes-webhooks/1"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Message:
    entry_id: str
    job_id: str
    event: str
    event_id: str
    url: str
    data: str
    signer: str | None = None  # whose secrets sign it (an owner id); None: queued before signers existed

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict) -> Message:
        f = {_s(k): _s(v) for k, v in fields.items()}
        return cls(_s(entry_id), f["job_id"], f["event"], f["event_id"], f["url"], f["data"], f.get("signer"))

    @property
    def created_s(self) -> float:
        return int(self.entry_id.split("-")[0]) / 1000


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        name: str,
        metrics: WebhookMetrics,
        redis: aioredis.Redis,
        http: httpx.AsyncClient,
    ):
        # Each signer's keys (well-formed: Settings checks them; several while rotating: one
        # signature per key). A message names its signer; one queued before signers existed is
        # signed with the server-wide secret, as it would have been then.
        self.signers = webhooks.signers(settings)
        self.legacy = (
            webhooks.secret_keys(settings.webhook_secret.get_secret_value())
            if settings.webhook_secret
            else None
        )
        if not self.signers and self.legacy is None:  # the API accepts no webhook_url: idle
            log.warning(
                "no webhook signing secret (STROKES_WEBHOOK_SECRETS per API key, or STROKES_WEBHOOK_SECRET "
                "without API keys): webhooks are off, and this dispatcher will sign nothing"
            )
        self.settings, self.name, self.metrics = settings, name, metrics
        self.r, self.http = redis, http
        self.slots = asyncio.Semaphore(max(1, settings.webhook_concurrency))
        self.stopping = asyncio.Event()
        self.inflight: set[asyncio.Task] = set()

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt: never less than the longest an
        attempt can take, so one still in flight is not claimed again."""
        s = self.settings
        backoff = min(s.webhook_backoff_max_s, s.webhook_backoff_base_s * 2 ** max(0, attempts - 1))
        return max(backoff, s.webhook_resolve_timeout_s + s.webhook_timeout_s + 1.0)

    # -- the loop ---------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        log.info("webhook dispatcher %s started", self.name)
        while not self.stopping.is_set():
            try:
                await self.ensure_group()
                await self.retry_due()
                await self.read_new()
            except TRANSIENT as exc:
                log.warning("redis unreachable: %s", exc)
                await asyncio.sleep(0.5)
        if self.inflight:  # let attempts in flight end (each is bounded by the timeout)
            await asyncio.wait(self.inflight)
        await self.http.aclose()
        await self.r.aclose()
        log.info("webhook dispatcher %s stopped", self.name)

    def _spawn(self, message: Message, attempt: int) -> None:
        task = asyncio.get_running_loop().create_task(self.attempt(message, attempt))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def _free(self) -> int:
        return self.settings.webhook_concurrency - len(self.inflight)

    async def read_new(self) -> None:
        free = self._free()
        if free <= 0:  # all slots busy: take nothing more (a claimed entry's idle clock runs)
            await asyncio.wait(self.inflight, timeout=self.settings.webhook_poll_ms / 1000)
            return
        s = self.settings
        waits = replica_waits(s)

        async def read(pipe) -> None:
            pipe.xreadgroup(
                keys.WEBHOOK_GROUP, self.name, {keys.WEBHOOK_OUTBOX: ">"}, count=free, block=s.webhook_poll_ms
            )
            await add_waits(pipe, self.r, waits)

        replies = await pipelined(self.r, read)
        reply = replies[0]
        if reply:
            try:  # deliver only what the replicas hold: a failover could take the event back
                check_waits(replies, waits, "the webhook outbox's new entries")
            except NotDurable as exc:
                log.warning("%s; they are delivered by a later retry", exc)
                return  # pending with us: retry_due takes them
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._spawn(Message.from_entry(entry_id, fields), 1)

    async def retry_due(self, scan: int = 1000) -> None:
        """Claim and retry pending entries whose wait after their last attempt is over (looking at
        up to `scan` of those idle long enough, oldest first, page by page)."""
        floor_ms = int(self.delay(1) * 1000)
        start = "-"
        while scan > 0 and self._free() > 0:
            page = await self.r.xpending_range(
                keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, start, "+", 100, idle=floor_ms
            )
            for p in page:
                attempts = int(p["times_delivered"])
                wait_ms = int(self.delay(attempts) * 1000)
                if int(p["time_since_delivered"]) < wait_ms or self._free() <= 0:
                    continue
                # Exclusive: another dispatcher's claim resets the idle time below wait_ms.
                claimed = await self.r.xclaim(
                    keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, self.name, wait_ms, [p["message_id"]]
                )
                for entry_id, fields in claimed:
                    if fields:
                        self._spawn(Message.from_entry(entry_id, fields), attempts + 1)
            if len(page) < 100:
                return
            scan -= len(page)
            start = "(" + _s(page[-1]["message_id"])

    # -- one attempt ------------------------------------------------------------------------------

    async def attempt(self, message: Message, attempt: int) -> None:
        async with self.slots:
            with logs.job_context(message.job_id, attempt):
                await self._attempt(message, attempt)

    async def _attempt(self, message: Message, attempt: int) -> None:
        try:
            outcome = await self._post(message, attempt)
            await self._settle(message, attempt, outcome)
        except TRANSIENT as exc:  # the entry stays pending; a later retry_due takes it
            log.warning("webhook %s: redis failed while settling: %s", message.entry_id, exc)

    async def _post(self, message: Message, attempt: int) -> str | None:
        """None on success, else why the attempt failed; a refused URL raises UnsafeURL."""
        s = self.settings
        try:
            target = await webhooks.resolve(
                message.url, s.webhook_allow_networks, s.webhook_resolve_timeout_s
            )
        except webhooks.Unresolvable as exc:  # DNS may come back: an ordinary failed attempt
            return str(exc)
        except webhooks.UnsafeURL as exc:
            return f"refused: {exc}"
        keys_ = self.legacy if message.signer is None else self.signers.get(message.signer)
        if not keys_:  # the key's secrets were removed: retried, in case they come back
            return "no signing secret for the job's API key (STROKES_WEBHOOK_SECRETS)"
        msg_id = webhooks.message_id(message.job_id, message.event, message.event_id)
        stamp = int(time.time())
        body = webhooks.body(message.event, message.event_id, message.data)
        headers = {
            "Host": target.host_header(),
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": webhooks.sign(keys_, msg_id, stamp, body),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        begin = time.perf_counter()
        try:
            reply = await asyncio.wait_for(
                self.http.post(target.connect_url(), content=body, headers=headers, extensions=extensions),
                s.webhook_timeout_s,
            )
        except TimeoutError:
            return f"no answer within {s.webhook_timeout_s} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.metrics.seconds.observe(time.perf_counter() - begin)
        if 200 <= reply.status_code < 300:
            return None
        return f"HTTP {reply.status_code}"

    async def _settle(self, message: Message, attempt: int, failure: str | None) -> None:
        extra = {"event": message.event, "event_id": message.event_id}
        if failure is None:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.xack(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, message.entry_id)
                pipe.xdel(keys.WEBHOOK_OUTBOX, message.entry_id)
                await pipe.execute()
            self.metrics.deliveries.labels("delivered").inc()
            log.info("webhook delivered", extra=extra)
            return
        next_at = time.time() + self.delay(attempt)
        refused = failure.startswith("refused:")
        if refused or next_at > message.created_s + self.settings.webhook_retry_for_s:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    keys.WEBHOOK_DEAD,
                    {
                        "job_id": message.job_id,
                        "event": message.event,
                        "event_id": message.event_id,
                        "url": message.url,
                        "attempts": str(attempt),
                        "error": failure,
                    },
                    maxlen=100000,
                    approximate=True,
                )
                pipe.xack(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, message.entry_id)
                pipe.xdel(keys.WEBHOOK_OUTBOX, message.entry_id)
                await pipe.execute()
            self.metrics.deliveries.labels("refused" if refused else "given_up").inc()
            log.warning("webhook given up after %d attempts: %s", attempt, failure, extra=extra)
            return
        # Restart the idle clock: the wait for the next attempt counts from now.
        await self.r.xclaim(
            keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, self.name, 0, [message.entry_id], justid=True
        )
        self.metrics.deliveries.labels("failed").inc()
        log.info("webhook attempt failed (%s); next in %.1f s", failure, self.delay(attempt), extra=extra)


# ---- the process --------------------------------------------------------------------------------


async def serve(settings: Settings, name: str, metrics: WebhookMetrics) -> None:
    """Build the dispatcher and its clients, run it until SIGTERM."""
    redis = connect(
        settings.redis_address,
        timeout_s=settings.redis_timeout_s + settings.webhook_poll_ms / 1000,
        connect_timeout_s=settings.redis_connect_timeout_s,
    )
    http = httpx.AsyncClient(
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        trust_env=False,  # no proxy from the environment: it would bypass the address check
    )
    dispatcher = Dispatcher(settings, name, metrics, redis, http)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, dispatcher.stopping.set)
    await dispatcher.run()
