"""The job list (GET /v1/generations), `Prefer: wait=N`, and content-type errors, in-process
(ASGI) against a real redis-server without workers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from testkit.asgi import SMALL, AppClient, error_of

from strokes.service.queue import keys
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings


@pytest.fixture
async def client(settings: Settings):
    async with AppClient(settings) as c:
        yield c


async def _submit(client: httpx.AsyncClient, n: int, headers: dict | None = None) -> list[str]:
    ids = []
    for i in range(n):
        reply = await client.post("/v1/generations", json={**SMALL, "seed": i}, headers=headers)
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["id"])
    return ids


async def test_list_is_newest_first_and_pages_with_a_cursor(client: httpx.AsyncClient):
    ids = await _submit(client, 5)
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        reply = await client.get("/v1/generations", params=params)
        assert reply.status_code == 200, reply.text
        page = reply.json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
        assert after == page["data"][-1]["id"]
    assert seen == ids[::-1]
    assert page["data"][-1]["queue_position"] == 1  # the oldest is first in the queue


async def test_list_filters_by_status(client: httpx.AsyncClient):
    ids = await _submit(client, 3)
    assert (await client.delete(f"/v1/generations/{ids[1]}")).status_code == 200
    canceled = (await client.get("/v1/generations", params={"status": "canceled"})).json()
    assert [job["id"] for job in canceled["data"]] == [ids[1]] and canceled["has_more"] is False
    queued = (await client.get("/v1/generations", params={"status": "queued"})).json()
    assert [job["id"] for job in queued["data"]] == [ids[2], ids[0]]
    bad = await client.get("/v1/generations", params={"status": "done"})
    assert bad.status_code == 422 and error_of(bad)["param"] == "query.status"


async def test_list_shows_only_the_callers_jobs(settings: Settings):
    keyed = settings.model_copy(update={"api_keys": ["key-a", "key-b"]})
    async with AppClient(keyed) as client:
        mine = await _submit(client, 2, {"Authorization": "Bearer key-a"})
        theirs = await _submit(client, 1, {"Authorization": "Bearer key-b"})
        a = (await client.get("/v1/generations", headers={"Authorization": "Bearer key-a"})).json()
        b = (await client.get("/v1/generations", headers={"Authorization": "Bearer key-b"})).json()
        assert [j["id"] for j in a["data"]] == mine[::-1]
        assert [j["id"] for j in b["data"]] == theirs
        assert (await client.get("/v1/generations")).status_code == 401


async def test_expired_jobs_are_skipped_and_dropped_from_the_index(client: httpx.AsyncClient, store: Store):
    ids = await _submit(client, 4)
    await store.r.delete(keys.job(ids[1]), keys.job(ids[2]))  # as if their TTL had run out
    page = (await client.get("/v1/generations", params={"limit": 10})).json()
    assert [job["id"] for job in page["data"]] == [ids[3], ids[0]]
    members = {m.decode() for m in await store.r.zrange(keys.owner_jobs(""), 0, -1)}
    assert members == {ids[0], ids[3]}


async def test_unknown_cursor_and_bad_limit_are_422(client: httpx.AsyncClient):
    await _submit(client, 1)
    reply = await client.get("/v1/generations", params={"after": "gen_" + "x" * 22})
    assert reply.status_code == 422 and error_of(reply)["param"] == "after"
    reply = await client.get("/v1/generations", params={"limit": 0})
    assert reply.status_code == 422 and error_of(reply)["param"] == "query.limit"


async def test_index_is_capped_and_expires(settings: Settings, store: Store):
    capped = settings.model_copy(update={"jobs_index_max": 3, "jobs_index_ttl_s": 1000})
    async with AppClient(capped) as client:
        ids = await _submit(client, 5)
        page = (await client.get("/v1/generations")).json()
    assert [job["id"] for job in page["data"]] == ids[:1:-1]
    assert 0 < await store.r.ttl(keys.owner_jobs("")) <= 1000


async def test_prefer_wait_times_out_with_202(client: httpx.AsyncClient):
    reply = await client.post("/v1/generations", json=SMALL, headers={"Prefer": "wait=1"})
    assert reply.status_code == 202 and reply.json()["status"] == "queued"
    assert reply.headers["preference-applied"] == "wait=1"


async def test_prefer_wait_returns_the_job_when_it_ends_in_time(client: httpx.AsyncClient, store: Store):
    async def cancel_when_queued() -> None:
        index = keys.owner_jobs("")
        while not (members := await store.r.zrange(index, 0, -1)):
            await asyncio.sleep(0.01)  # polling for the condition: the job exists
        await store.cancel(members[0].decode())

    canceler = asyncio.create_task(cancel_when_queued())
    reply = await client.post("/v1/generations", json=SMALL, headers={"Prefer": "respond-async, wait=30"})
    await canceler
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "canceled" and reply.json()["finished_at"] is not None
    assert reply.headers["preference-applied"] == "wait=30"


async def test_prefer_wait_is_capped_by_settings(settings: Settings):
    short = settings.model_copy(update={"prefer_wait_max_s": 0.2})
    async with AppClient(short) as client:
        reply = await client.post("/v1/generations", json=SMALL, headers={"Prefer": "wait=600"})
    assert reply.status_code == 202 and reply.headers["preference-applied"] == "wait=0.2"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_a_wrong_content_type_is_a_415_that_says_so(client: httpx.AsyncClient, content_type: str):
    reply = await client.post(
        "/v1/generations", content=b'{"prompt": "a red cube"}', headers={"Content-Type": content_type}
    )
    assert reply.status_code == 415, reply.text
    error = error_of(reply)
    assert error["type"] == "unsupported_media_type"
    assert "application/json" in error["message"] and content_type in error["message"]


async def test_json_content_types_are_accepted(client: httpx.AsyncClient):
    for content_type in ("application/json", "application/json; charset=utf-8", "application/merge+json"):
        reply = await client.post(
            "/v1/generations", content=b'{"prompt": "a red cube"}', headers={"Content-Type": content_type}
        )
        assert reply.status_code == 202, (content_type, reply.text)
    bad = await client.post(
        "/v1/generations", content=b'{"prompt": 3}', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 422  # a bad JSON body stays a 422 naming the field


async def test_docs_pages_load_their_assets_from_the_app_itself(client: httpx.AsyncClient):
    for page, assets in (
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
        ("/redoc", ["redoc.standalone.js"]),
    ):
        reply = await client.get(page)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
        assert "http://" not in reply.text and "https://" not in reply.text, page  # no CDN, no fonts
        for asset in assets:
            url = f"/docs/assets/{asset}"
            assert url in reply.text
            served = await client.get(url)
            assert served.status_code == 200 and len(served.content) > 100_000, url
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "strokes"


async def test_a_filtered_walk_over_a_bounded_scan_sees_every_match_once(
    client: httpx.AsyncClient, store: Store, monkeypatch
):
    from strokes.service.api import job_list as generations

    monkeypatch.setattr(generations, "SCAN_LIMIT", 3)
    monkeypatch.setattr(generations, "BATCH", 2)
    ids = await _submit(client, 9)
    for job_id in ids[::3]:  # every third job is canceled
        assert (await client.delete(f"/v1/generations/{job_id}")).status_code == 200
    await store.r.delete(keys.job(ids[4]))  # and one has expired
    seen, after, pages = [], None, 0
    while True:
        params = {"status": "canceled", "limit": 2, **({"after": after} if after else {})}
        page = (await client.get("/v1/generations", params=params)).json()
        pages += 1
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert seen == ids[::3][::-1] and pages >= 3
