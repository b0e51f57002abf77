"""A real Sentinel failover under the job store: a live worker keeps its job on the new master,
though its heartbeat key expired there during the failover, and a dead worker's job is still taken
over afterwards. One master, one replica, one Sentinel on loopback; the master is killed with -9."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from testkit.redis_ha import SentinelRedis

from strokes.service.queue import keys
from strokes.service.queue.client import TRANSIENT, connect
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings

pytestmark = pytest.mark.parametrize("sentinel_redis", [1], indirect=True)


async def _until(op, what: str, timeout: float = 30):
    """`op()` until it answers something true, through the failover's errors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await op()
            if value:
                return value
        except TRANSIENT:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_after_a_failover_a_live_worker_keeps_its_job_and_a_dead_ones_is_taken_over(
    sentinel_redis: SentinelRedis, tmp_path
):
    # A lease shorter than the failover (down-after 1 s + the vote): the busy worker's heartbeat key
    # has expired by the time the replica is master.
    settings = Settings(
        redis_url=sentinel_redis.url, lease_ttl_s=1.0, heartbeat_interval_s=0.25, blob_dir=tmp_path
    )
    grace_s = settings.lease_ttl_s + settings.heartbeat_interval_s  # the default restart_grace_s
    busy, idle = (
        Store(connect(settings.redis_address, timeout_s=2, connect_timeout_s=0.5), settings) for _ in "ab"
    )
    try:
        await busy.ensure_group()
        await busy.enqueue(
            "j1", owner="", message=JobMessage(prompt="x"), body_hash="h", idempotency_key=None
        )
        await busy.heartbeat("busy")
        entry_id, job_id = await busy.poll("busy", 100)
        assert (await busy.start(job_id, entry_id, "busy")).attempt == 1
        await idle.heartbeat("idle")
        sentinel_redis.wait_caught_up()

        old = sentinel_redis.master
        old.kill()
        new = sentinel_redis.wait_new_master(old)
        with new.client() as direct:
            assert direct.exists(keys.heartbeat("busy")) == 0  # expired during the failover

        async def idle_beats() -> bool:
            await idle.heartbeat("idle")
            return True

        async def idle_takes_over() -> tuple[str, str] | None:
            await idle.heartbeat("idle")
            return await idle.reclaim("idle")

        # The idle worker is first on the new master: it takes nothing (a new master's grace).
        await _until(idle_beats, "the idle worker on the new master")
        assert await idle.reclaim("idle") is None

        async def beat() -> None:
            while True:
                with contextlib.suppress(*TRANSIENT):
                    await busy.heartbeat("busy", "j1")
                await asyncio.sleep(settings.heartbeat_interval_s)

        beating = asyncio.create_task(beat())
        try:
            deadline = time.monotonic() + 2 * grace_s  # past the grace: the live worker's key is back
            while time.monotonic() < deadline:
                await idle.heartbeat("idle")
                assert await idle.reclaim("idle") is None, "a live worker's job was taken after the failover"
                await asyncio.sleep(0.05)
        finally:
            beating.cancel()
        # Now the busy worker dies: its job is taken over on the new master once its lease ends.
        claimed = await _until(idle_takes_over, "the takeover")
        assert claimed == (entry_id, "busy")
    finally:
        await busy.close()
        await idle.close()
