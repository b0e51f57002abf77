"""The OpenAI-compatible Images API, driven by the official `openai` package: in-process (ASGI,
real redis-server, no worker) for errors, the wait bound and auth; and against real API and worker
processes (tiny model) by base_url for generations and edits, b64_json and url, streamed and not."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image
from testkit.jobs import QUICK
from testkit.processes import Proc, env_with, start_api, start_worker, wait_workers

from strokes.service.api.app import create_app
from strokes.service.api.routes import openai_images
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings

# Native fields that make a tiny-model job quick (size comes from OpenAI's `size`).
FAST = {k: v for k, v in QUICK.items() if k not in ("prompt", "width", "height")}


def _png(width: int, height: int, value: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


class _App:
    """The app in-process with its lifespan, and an AsyncOpenAI client on it."""

    def __init__(self, settings: Settings, api_key: str = "unused"):
        self.app = create_app(settings)
        self.api_key = api_key

    async def __aenter__(self) -> tuple[openai.AsyncOpenAI, httpx.AsyncClient]:
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api")
        self.client = openai.AsyncOpenAI(
            base_url="http://api/v1", api_key=self.api_key, http_client=self.http, max_retries=0
        )
        return self.client, self.http

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.http.aclose()
        await self.lifespan.__aexit__(*exc)


# ---- in-process: errors in OpenAI's shape, the wait bound, auth ---------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "1000x1000"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"n": 11}, "n"),
        ({"stream": True, "n": 2}, "n"),
        ({"partial_images": 4, "stream": True}, "partial_images"),
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"extra_body": {"strokes": {"seed": -1}}}, "strokes.seed"),
        ({"extra_body": {"strokes": {"width": 64}}}, "strokes.width"),
        ({"extra_body": {"colour": "red"}}, "colour"),
        ({"prompt": "   "}, "prompt"),
    ],
)
async def test_bad_requests_are_400_in_openais_error_shape(settings: Settings, kwargs: dict, param: str):
    async with _App(settings) as (client, _):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(**{"prompt": "a red cube", **kwargs})
    error = caught.value.body
    assert caught.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


async def test_edit_errors_name_the_field(settings: Settings):
    async with _App(settings) as (client, http):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(image=("a.png", _png(64, 64)), prompt="x", mask=("m.png", _png(64, 64)))
        assert caught.value.body["param"] == "mask"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(image=[("a.png", _png(64, 64)), ("b.png", _png(64, 64))], prompt="x")
        assert caught.value.body["param"] == "image"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(image=("a.png", b"not an image"), prompt="x", size="64x64")
        assert caught.value.body["param"] == "image" and caught.value.body["code"] == "invalid_image"
        message = caught.value.body["message"]  # in the words of this request: its field is `image`
        assert message.startswith("image ") and "input_image" not in message
        reply = await http.post("/v1/images/edits", json={"prompt": "x"})
        assert reply.status_code == 400 and "multipart" in reply.json()["error"]["message"]


async def test_unfinished_jobs_are_canceled_after_the_wait_bound(settings: Settings):
    # No worker: the job never starts. The request gives up after openai_wait_s with a 504, and
    # its job is canceled rather than left to run for nobody.
    async with _App(settings.model_copy(update={"openai_wait_s": 0.3})) as (client, http):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.images.generate(prompt="a red cube", size="64x64", extra_body={"strokes": FAST})
        assert caught.value.status_code == 504 and caught.value.body["code"] == "generation_timeout"
        job_id = caught.value.response.headers["x-strokes-jobs"]
        assert job_id in caught.value.body["message"]
        job = (await http.get(f"/v1/generations/{job_id}")).json()
        assert job["status"] == "canceled" and job["request"]["width"] == 64


async def test_api_keys_apply(settings: Settings):
    keyed = settings.model_copy(update={"api_keys": ["k1"]})
    async with _App(keyed, api_key="wrong") as (client, _):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(prompt="a red cube")
        assert caught.value.body["type"] == "authentication_error"


# ---- real processes, the official client by base_url --------------------------------------------


@pytest.fixture(scope="module")
def service(redis_server, tiny_checkpoint, tmp_path_factory):
    # A database of its own: this module's in-process tests use database 0, where this worker
    # would otherwise take (and finish) the jobs they expect to stay queued.
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    logdir = tmp_path_factory.mktemp("openai-logs")
    api, base = start_api(url, logdir)
    worker = start_worker(url, tiny_checkpoint, logdir, "w-openai")
    yield base
    worker.stop()
    api.stop()


@pytest.fixture
def client(service: str):
    with openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.slow
def test_generate_n_images_as_b64_json(client: openai.OpenAI, service: str):
    raw = client.images.with_raw_response.generate(
        prompt="a red cube on a blue sphere",
        n=2,
        size="64x64",
        quality="low",
        response_format="b64_json",
        extra_body={"strokes": FAST},
    )
    result = raw.parse()
    assert len(result.data) == 2 and result.size == "64x64" and result.output_format == "png"
    for item in result.data:
        image = _image(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64) and item.url is None
    assert result.usage.input_tokens > 0 and result.usage.total_tokens >= result.usage.input_tokens
    ids = raw.headers["x-strokes-jobs"].split(",")
    for job_id in ids:  # ordinary jobs, visible on the native API
        job = httpx.get(f"{service}/v1/generations/{job_id}", timeout=5).json()
        assert job["status"] == "succeeded" and job["request"]["max_iterations"] == 1


@pytest.mark.slow
def test_generate_as_url_in_jpeg(client: openai.OpenAI):
    result = client.images.generate(
        prompt="a red cube",
        size="64x64",
        response_format="url",
        output_format="jpeg",
        extra_body={"strokes": FAST},
    )
    url = result.data[0].url
    assert url.startswith("http://127.0.0.1:") and "/v1/generations/gen_" in url
    reply = httpx.get(url, timeout=10)
    assert reply.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(reply.content)).size == (64, 64)


@pytest.mark.slow
def test_generate_streams_partial_images_then_the_final_one(client: openai.OpenAI):
    # Previews every denoising step (asked with strokes.preview_every): more candidates than the
    # budget of 2, so exactly 2 partial images come before the completed event.
    events = list(
        client.images.generate(
            prompt="a red cube",
            size="64x64",
            stream=True,
            partial_images=2,
            output_format="webp",
            extra_body={"strokes": {**FAST, "preview_every": 1}},
        )
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    assert _image(final.b64_json).format == "WEBP" and final.size == "64x64"
    assert final.usage.total_tokens > 0 and final.output_format == "webp"


@pytest.mark.slow
def test_edit_an_image_streamed_and_not(client: openai.OpenAI):
    strokes = json.dumps(FAST)  # a multipart form carries the extension as a JSON string
    result = client.images.edit(
        image=("start.png", _png(64, 64), "image/png"),
        prompt="make it red",
        size="64x64",
        extra_body={"strokes": strokes},
    )
    assert _image(result.data[0].b64_json).size == (64, 64)
    events = list(
        client.images.edit(
            image=("start.png", _png(64, 64), "image/png"),
            prompt="make it red",
            size="64x64",
            stream=True,
            partial_images=1,
            extra_body={"strokes": json.dumps({**FAST, "preview_every": 2})},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert _image(events[-1].b64_json).size == (64, 64)


@pytest.mark.slow
def test_partial_images_are_the_superseded_drafts_and_refinements(
    private_redis, tiny_checkpoint, tmp_path, procs
):
    # A scripted worker whose course is known: two iterations of plan, draft, reflect (wrong),
    # refine. Three images are superseded (it1-draft, it1-refine, it2-draft); the budget takes
    # the first two, and it2-refine comes as the completed image.
    api, base = start_api(private_redis.url, tmp_path)
    procs.append(api)
    env = env_with(private_redis.url)  # with tests/ on PYTHONPATH, for testkit.pipelines
    args = ["worker", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--name", "w-scripted"]
    args += ["--pipeline", "testkit.pipelines:two_refined_iterations"]
    worker = Proc(args, env, tmp_path / "worker-scripted.log")
    procs.append(worker)
    wait_workers(private_redis.url, {"w-scripted": worker})
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        events = list(
            client.images.generate(prompt="a red cube", size="32x32", stream=True, partial_images=2)
        )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    # ScriptedPipeline paints iteration k's images with the value 40 * k.
    values = [int(np.asarray(_image(e.b64_json))[0, 0, 0]) for e in events]
    assert values == [40, 40, 80]


async def test_follow_ends_with_a_terminal_event_even_when_the_log_expired(store):
    # An Idempotency-Key replay can come after the event log's TTL and before the job's: the
    # request must still end (from the job hash), not wait out its bound.
    store.settings = store.settings.model_copy(update={"sse_block_ms": 200})  # the client's timeout is 5 s
    job_id = "gen_" + "e" * 22
    await store.enqueue(job_id, owner="", message=JobMessage(prompt="x"), body_hash="h", idempotency_key=None)
    entry = await store.poll("w-follow", 100)
    started = await store.start(job_id, entry[0], "w-follow")
    final = {
        "id": "it1-draft",
        "url": f"/v1/generations/{job_id}/images/it1-draft",
        "width": 32,
        "height": 32,
    }
    fields = {"final_image": final, "usage": {"prefilled_tokens": 5}}
    await store.finish(job_id, started.attempt, JobStatus.succeeded, "job.completed", {}, fields=fields)
    live = [name async for name, _ in openai_images.follow(store, job_id)]
    assert live == ["job.queued", "job.started", "job.completed"]
    await store.r.delete(keys.events(job_id))
    expired = [item async for item in openai_images.follow(store, job_id)]
    assert expired == [("job.completed", {"final_image": final, "usage": {"prefilled_tokens": 5}})]
    await store.r.delete(keys.job(job_id))
    gone = [item async for item in openai_images.follow(store, job_id)]
    assert gone == [("job.failed", {"error": {"type": "expired", "message": "the job has expired"}})]


async def test_an_idempotency_key_covers_the_n_jobs(settings: Settings):
    async with _App(settings.model_copy(update={"openai_wait_s": 0.3})) as (client, _):
        headers = {"Idempotency-Key": "retry-me"}
        kwargs = {"prompt": "a red cube", "size": "64x64", "n": 2, "extra_headers": headers}
        with pytest.raises(openai.APIStatusError) as first:
            await client.images.generate(**kwargs, extra_body={"strokes": FAST})
        ids = first.value.response.headers["x-strokes-jobs"].split(",")
        assert first.value.status_code == 504 and len(set(ids)) == 2
        # The retry gets the same two jobs (canceled by the first request's bound), not new ones.
        with pytest.raises(openai.APIStatusError) as again:
            await client.images.generate(**kwargs, extra_body={"strokes": FAST})
        assert again.value.response.headers["x-strokes-jobs"].split(",") == ids
        assert again.value.status_code == 500 and again.value.body["code"] == "generation_failed"
        assert "job.canceled" in again.value.body["message"]
