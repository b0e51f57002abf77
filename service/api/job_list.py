"""The caller's job list (`GET /v1/generations`, routes/generations.py).

The enqueue script adds every job id to the owner's zset keys.owner_jobs(owner), scored by its
creation time in ms. A page walks that zset newest first from the cursor, reads the job
hashes in one round trip per batch, drops (and removes from the index) ids whose hash has expired,
and keeps the jobs whose status matches the filter. The cursor is the id of the last job of a page
(`after=`), as in OpenAI's and Stripe's lists; an id that has left the index is a 422. A filtered
page scans at most SCAN_LIMIT index entries, so a rare status costs a bounded amount per request:
such a page may come back short (even empty) with `has_more` true.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from strokes.service.api import jobs
from strokes.service.api.errors import InvalidRequest
from strokes.service.api.schemas import Job
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.store import Store

SCAN_LIMIT = 1000  # index entries one page may look at
BATCH = 100


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    next_cursor: str | None = None
    has_more: bool = False


# KEYS: index     ARGV: cursor id, count -> the `count` ids after the cursor (newest first), or
# nil when the cursor is not in the index. One script, so a job created meanwhile cannot shift the
# ranks between finding the cursor and reading after it.
_AFTER = """
local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
if not rank then return false end
return redis.call('ZREVRANGE', KEYS[1], rank + 1, rank + tonumber(ARGV[2]))
"""


async def _ids_after(store: Store, index: str, cursor: str | None, count: int) -> list[str] | None:
    if cursor is None:
        reply = await store.r.zrevrange(index, 0, count - 1)
    else:
        reply = await store.r.register_script(_AFTER)(keys=[index], args=[cursor, count])
    return None if reply is None else [i.decode() for i in reply]


async def list_jobs(
    store: Store, owner: str, *, status: str | None, limit: int, after: str | None
) -> JobList:
    index = keys.owner_jobs(owner)
    found: list[dict[str, str]] = []  # up to limit + 1: the one beyond says has_more
    gone: list[str] = []  # ids whose job hash has expired: removed from the index at the end
    cursor, scanned, last_scanned, exhausted = after, 0, after, False
    # Expired ids do not count against the scan budget: each is removed, so it is paid for once.
    while len(found) <= limit and scanned < SCAN_LIMIT and not exhausted:
        ids = await _ids_after(store, index, cursor, BATCH)
        if ids is None:  # only the caller's cursor can be missing: ours are removed at the end
            raise InvalidRequest(
                "after: unknown or expired cursor (a job id of an earlier page)", param="after"
            )
        exhausted = len(ids) < BATCH
        async with store.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            hashes = await pipe.execute() if ids else []
        for job_id, raw in zip(ids, hashes, strict=True):
            if not raw:
                gone.append(job_id)
                continue
            if len(found) > limit or scanned >= SCAN_LIMIT:
                exhausted = False  # stopped before the end of the batch
                break
            scanned += 1
            last_scanned = job_id
            job = {k.decode(): v.decode() for k, v in raw.items()}
            if status is None or job.get("status") == status:
                found.append(job)
        if ids:
            cursor = ids[-1]
    if gone:
        await store.r.zrem(index, *gone)
    page = found[:limit]
    if len(found) > limit:
        has_more, next_cursor = True, page[-1]["id"]
    elif exhausted:
        has_more, next_cursor = False, None
    else:  # the scan budget ran out before the page filled: go on from the last job looked at
        has_more, next_cursor = True, last_scanned
    views = []
    for job in page:
        position = None
        if job["status"] == JobStatus.queued.value and job.get("entry_id"):
            position = await store.queue_position(job["entry_id"])
        views.append(jobs.view(job, position))
    return JobList(data=views, next_cursor=next_cursor, has_more=has_more)
