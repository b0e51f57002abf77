"""What makes a write the service acknowledges durable, and a read safe to pass on: the waits that
follow them on the same connection, and the check of their replies.

    WAITAOF 1 0      the write is fsynced to this server's AOF (Redis/Valkey >= 7.2 with appendonly;
                     detected at run time): a restart from the AOF keeps it
    WAIT n timeout   n replicas hold the write: a failover to one of them keeps it

WAIT counts everything the connection's server had when the connection's previous command ran, so
after a write it covers the write, and after a read it covers what the read returned (an event
read from the master before a replica has it could vanish in a failover after a client saw it).

Which operations wait (store.py applies them; service/README.md "Failover and durability"):

    acceptance, cancel, the end of an attempt (finish, requeue)   WAITAOF (local) + WAIT (replicas)
    start, events (emit), steering (pause, continue, end, route)  WAIT (replicas)
    what readers pass on: SSE events, webhook outbox entries      WAIT (replicas)

A wait that comes back short raises NotDurable (a TimeoutError: Redis counts as away): the API
answers 503, a worker retries the same idempotent script, a reader reads again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import NoScriptError

from strokes.service.queue.client import Client, slot_node
from strokes.service.shared.settings import Settings


class NotDurable(TimeoutError):
    """A write (or a read's data) did not reach the AOF or the replicas in time."""


@dataclass(frozen=True)
class Waits:
    """The waits after one operation: `aof` WAITAOF 1 0, `replicas` WAIT (0: none)."""

    aof: bool
    replicas: int
    aof_timeout_ms: int
    replica_timeout_ms: int

    @property
    def count(self) -> int:
        """How many replies the waits add to a pipeline."""
        return int(self.aof) + int(self.replicas > 0)


NONE = Waits(False, 0, 0, 0)


async def add_waits(pipe: Any, client: Client, waits: Waits) -> None:
    """Queue the waits at the end of `pipe` (on the connection of what came before: in a cluster,
    the node of the service's slot)."""
    if not waits.count:
        return
    target = {"target_nodes": await slot_node(client)} if isinstance(client, RedisCluster) else {}
    if waits.aof:
        pipe.execute_command("WAITAOF", 1, 0, waits.aof_timeout_ms, **target)
    if waits.replicas:
        pipe.execute_command("WAIT", waits.replicas, waits.replica_timeout_ms, **target)


def check_waits(replies: Sequence[Any], waits: Waits, what: str) -> None:
    """The waits' replies (the last `waits.count` of a pipeline): NotDurable when one came short."""
    tail = list(replies[len(replies) - waits.count :]) if waits.count else []
    if waits.aof:
        synced = tail.pop(0)
        if int(synced[0]) < 1:
            raise NotDurable(f"{what} was not fsynced to the AOF within {waits.aof_timeout_ms} ms")
    if waits.replicas:
        acked = int(tail.pop(0))
        if acked < waits.replicas:
            raise NotDurable(
                f"{what} reached {acked} of {waits.replicas} replicas within {waits.replica_timeout_ms} ms"
            )


def replica_waits(settings: Settings) -> Waits:
    """WAIT for `redis_min_replicas` replicas, no local fsync: events, starts, what readers pass on."""
    return Waits(
        False, settings.redis_min_replicas, settings.waitaof_timeout_ms, settings.redis_replica_timeout_ms
    )


async def run_script(
    client: Client,
    script: Any,
    script_keys: Sequence[str],
    args: Sequence[Any],
    waits: Waits,
    what: str,
    wrote: Callable[[Any], bool] | None = None,
) -> Any:
    """Run `script`, then its waits on the same connection: its reply, or NotDurable when the waits
    came short (unless `wrote`, given the reply, says the script wrote nothing to wait for)."""
    if not waits.count:
        return await script(keys=script_keys, args=args)

    async def build(pipe: Any) -> None:
        await script(keys=script_keys, args=args, client=pipe)
        await add_waits(pipe, client, waits)

    replies = await pipelined(client, build, [script])
    if wrote is None or wrote(replies[0]):
        check_waits(replies, waits, what)
    return replies[0]


class DurableScript:
    """A registered script called as before (keys, args, client) whose every run on its own is
    followed by `waits` (inside a caller's pipeline the caller adds them)."""

    def __init__(self, client: Client, script: Any, waits: Waits, what: str):
        self.client, self.script, self.waits, self.what = client, script, waits, what

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        if client is not None:
            return await self.script(keys=keys, args=args, client=client)
        return await run_script(self.client, self.script, keys, args, self.waits, self.what)


async def pipelined(
    client: Client, build: Callable[[Any], Awaitable[None]], scripts: Sequence[Any] = ()
) -> list:
    """Run the commands `build` queues as one non-transactional pipeline. A cluster's pipeline does
    not load scripts by itself (and a promoted replica has none): on NOSCRIPT they are loaded and
    the pipeline runs again, which the scripts allow (each is safe to run twice)."""
    for last_try in (False, True):
        try:
            async with client.pipeline(transaction=False) as pipe:
                await build(pipe)
                return await pipe.execute()
        except NoScriptError:
            if last_try or not isinstance(pipe, ClusterPipeline):
                raise
            for script in scripts:
                script.sha = await client.script_load(script.script)
    raise AssertionError("unreachable")
