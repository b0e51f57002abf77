"""OpenAI-compatible Images API, for apps and SDKs that switch providers by base URL
(docs/openai.md):

    POST /v1/images/generations   JSON: prompt, n, size, quality, response_format, output_format,
                                  stream, partial_images, ...
    POST /v1/images/edits         multipart: image (or image[]), prompt, and the same fields

Each request becomes n ordinary generation jobs through jobs.submit, so authentication,
validation, the queue cap (429), idempotency (an Idempotency-Key header covers the n jobs) and
cancellation apply exactly as on POST /v1/generations; the jobs are visible and cancelable on the
native API too (their ids are in the X-Strokes-Jobs header).

Without `stream` the request waits until every job has ended, at most `openai_wait_s`; past that
it cancels them and answers 504. With `stream: true` (n = 1) the answer is SSE:
`image_generation.partial_image` (`image_edit.partial_image`) events carry the images the process
superseded (a draft that a refinement replaced, a refinement replaced by the next iteration's), up
to `partial_images` of them, plus denoising previews when the request asks for them with
`strokes.preview_every`; then `image_generation.completed` (`image_edit.completed`) carries the
final image. A job that fails ends the stream with an `error` event; a client that goes away
cancels its job. Errors on these routes have OpenAI's shape (errors.openai_error).

Extension: `strokes` (in the JSON body; a JSON string in a multipart form; `extra_body` in the
openai SDK) takes native request fields (steps, seed, max_iterations, templates, webhook_url, ...).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from strokes.service.api import errors, jobs
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import SettingsDep
from strokes.service.api.errors import GenerationFailed, GenerationTimedOut, InvalidRequest
from strokes.service.api.openai_schemas import (
    EDIT_FORM,
    ImageData,
    ImageEditFields,
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    OpenAIErrorResponse,
    check_stream,
    native_request,
    usage,
    validation_param,
)
from strokes.service.api.schemas import ErrorResponse, GenerationRequest
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import (
    IMAGE_FIELD_PREFIX,
    IMAGE_PROGRESS,
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    STAGE_COMPLETED,
    STAGE_STARTED,
    TERMINAL_EVENTS,
)

router = APIRouter(tags=["OpenAI-compatible"])

# ---- jobs: submit, wait, read results -----------------------------------------------------------


async def submit_all(
    request: Request,
    settings: Settings,
    owner: str,
    opts: ImageOptions,
    native: GenerationRequest,
    idempotency_key: str | None,
) -> list[str]:
    store: Store = request.app.state.store
    ids: list[str] = []
    try:
        for i in range((opts.n or 1) if not opts.stream else 1):
            key = None if idempotency_key is None else f"{idempotency_key[:240]}#{i}"
            job, replayed = await jobs.submit(
                store,
                request.app.state.steering,
                settings,
                owner,
                native,
                key,
                deadline_s=settings.redis_deadline_s,
                blobs=request.app.state.blobs,
            )
            if not replayed:
                request.app.state.metrics.submitted.inc()
            ids.append(job.id)
    except errors.ServiceError as exc:
        # all n or none: a partial batch would only burn GPU time
        await _cancel(store, ids, request.app.state.blobs)
        raise _in_openai_terms(exc) from None
    except BaseException:
        await _cancel(store, ids, request.app.state.blobs)
        raise
    return ids


def _in_openai_terms(exc: errors.ServiceError) -> errors.ServiceError:
    """An error of the native submit, naming the field as this request sent it: `image`, not
    `input_image`."""
    if exc.param == "input_image":
        exc.param, exc.message = "image", exc.message.replace("input_image", "image")
    return exc


async def _cancel(store: Store, job_ids: list[str], blobs: BlobStore) -> None:
    for job_id in job_ids:
        outcome, _ = await asyncio.shield(store.cancel(job_id))
        if outcome == "canceled":  # a queued job ended here: its input goes now
            await blobs.job_ended(job_id)


STATUS_EVENTS = {"succeeded": JOB_COMPLETED, "failed": JOB_FAILED, "canceled": JOB_CANCELED}


async def follow(store: Store, job_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The job's events as (name, data), from the first to the terminal one. A job that ended so
    long ago that its event log expired (an Idempotency-Key replay) still gets a terminal event,
    made from the job hash."""
    cursor = "0"
    while True:
        batch = await store.read_events(job_id, cursor, count=200, block_ms=store.settings.sse_block_ms)
        if not batch:
            job = await store.get_job(job_id)
            status = job.get("status") if job else "failed"
            if status in STATUS_EVENTS and not await store.read_events(job_id, cursor, count=1):
                job = job or {"error": json.dumps({"type": "expired", "message": "the job has expired"})}
                fields = ("final_image", "usage", "error")
                yield STATUS_EVENTS[status], {k: json.loads(job[k]) for k in fields if job.get(k)}
                return
        for event in batch:
            cursor = event.id
            yield event.name, json.loads(event.data)
            if event.name in TERMINAL_EVENTS:
                return


async def _terminal(store: Store, job_id: str) -> str:
    async for name, _ in follow(store, job_id):
        if name in TERMINAL_EVENTS:
            return name
    raise AssertionError("follow() ends with a terminal event")


async def _image_b64(blobs: BlobStore, store: Store, job_id: str, ref: dict[str, Any], fmt: str) -> str:
    job = await store.get_job(job_id) or {}
    raw = job.get(IMAGE_FIELD_PREFIX + ref["id"])
    attempt = int(json.loads(raw).get("attempt", 0)) if raw else 0
    png = await blobs.get(imagelib.storage_key(job_id, attempt, ref["id"]))
    if png is None:
        raise GenerationFailed(f"the image {ref['id']} of {job_id} has expired")
    data = await run_in_threadpool(imagelib.transcode, png, fmt)
    return base64.b64encode(data).decode()


async def respond(request: Request, settings: Settings, opts: ImageOptions, ids: list[str]) -> ImagesResponse:
    """Wait (bounded) for the jobs, then the images as OpenAI answers them."""
    store: Store = request.app.state.store
    try:
        ends = await asyncio.wait_for(
            asyncio.gather(*(_terminal(store, job_id) for job_id in ids)), settings.openai_wait_s
        )
    except TimeoutError as exc:
        await _cancel(store, ids, request.app.state.blobs)
        raise GenerationTimedOut(
            f"the images were not ready within {settings.openai_wait_s:g} s; their jobs "
            f"({', '.join(ids)}) were canceled. Use POST /v1/generations for long jobs",
            headers={"X-Strokes-Jobs": ",".join(ids)},
        ) from exc
    fmt = opts.output_format or "png"
    data, used, sizes = [], [], []
    for job_id, end in zip(ids, ends, strict=True):
        job = await store.get_job(job_id) or {}
        if end != JOB_COMPLETED:
            await _cancel(store, ids, request.app.state.blobs)
            error = json.loads(job.get("error") or "null") or {"type": end, "message": "canceled"}
            raise GenerationFailed(
                f"generation {job_id} ended with {end}: {error.get('message')}",
                headers={"X-Strokes-Jobs": ",".join(ids)},
            )
        final = json.loads(job["final_image"])
        sizes.append(_size(final))
        used.append(json.loads(job.get("usage") or "{}"))
        plans = [s.get("text") for s in json.loads(job.get("stages") or "[]") if s.get("stage") == "plan"]
        revised = plans[0] if plans and plans[0] else None
        if (opts.response_format or "b64_json") == "url":
            query = "" if fmt == "png" else f"?format={fmt}"
            url = str(request.base_url).rstrip("/") + final["url"] + query
            data.append(ImageData(url=url, revised_prompt=revised))
        else:
            b64 = await _image_b64(request.app.state.blobs, store, job_id, final, fmt)
            data.append(ImageData(b64_json=b64, revised_prompt=revised))
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=fmt,
        quality=opts.quality or "auto",
        size=sizes[0],
        usage=usage(used),
    )


async def stream_events(
    request: Request, opts: ImageOptions, job_id: str, kind: str
) -> AsyncIterator[ServerSentEvent]:
    """The job's events as OpenAI's streaming image events; `kind` is image_generation or image_edit."""
    store: Store = request.app.state.store
    fmt, budget = opts.output_format or "png", opts.partial_images or 0
    common = {"background": "opaque", "output_format": fmt, "quality": opts.quality or "auto"}
    sent = 0
    held: dict[str, Any] | None = None  # the latest image; partial once a later one supersedes it
    ended = False

    async def partial(ref: dict[str, Any]) -> ServerSentEvent:
        nonlocal sent
        body = {
            "type": f"{kind}.partial_image",
            "b64_json": await _image_b64(request.app.state.blobs, store, job_id, ref, fmt),
        }
        body.update(common, size=_size(ref), created_at=int(time.time()), partial_image_index=sent)
        sent += 1
        return ServerSentEvent(data=json.dumps(body), event=body["type"])

    try:
        async for name, data in follow(store, job_id):
            if name == STAGE_STARTED and data.get("stage") in ("draft", "refine") and held:
                if sent < budget:  # a new image begins: the held one is superseded
                    yield await partial(held)
                held = None
            elif name == STAGE_COMPLETED and data.get("image"):
                held = data["image"]
            elif name == IMAGE_PROGRESS and data.get("preview") and sent < budget:
                yield await partial(data["preview"])
            elif name == JOB_COMPLETED:
                final = data["final_image"]
                if held and held["id"] != final["id"] and sent < budget:
                    yield await partial(held)
                body = {
                    "type": f"{kind}.completed",
                    "b64_json": await _image_b64(request.app.state.blobs, store, job_id, final, fmt),
                }
                body.update(common, size=_size(final), created_at=int(time.time()))
                body["usage"] = usage([data.get("usage") or {}]).model_dump()
                ended = True
                yield ServerSentEvent(data=json.dumps(body), event=body["type"])
            elif name in TERMINAL_EVENTS:
                ended = True
                error = data.get("error") or {"type": "canceled", "message": "the generation was canceled"}
                message = f"generation {job_id}: {error['message']}"
                _, body = errors.openai_error(500, error["type"], message)
                yield ServerSentEvent(data=json.dumps(body), event="error")
    finally:
        if not ended:  # the client left (or Redis failed): its job is of no use to anyone now
            await _cancel(store, [job_id], request.app.state.blobs)


# ---- routes -------------------------------------------------------------------------------------

IdempotencyKey = Annotated[
    str,
    Header(
        description="retrying with the same key returns the same jobs",
        json_schema_extra={"pattern": jobs.IDEMPOTENCY_KEY.pattern},  # checked in words by jobs.submit
    ),
]
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the images (JSON), or with stream: true, Server-Sent Events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **{code: {"model": OpenAIErrorResponse} for code in (400, 401, 429, 500, 503, 504)},
    413: {"model": ErrorResponse, "description": "the body is too large (checked before routing)"},
}


async def _answer(
    request: Request,
    response: Response,
    settings: Settings,
    owner: str,
    opts: ImageOptions,
    input_image: str | None,
    idempotency_key: str | None,
    kind: str,
):
    check_stream(opts)
    native = native_request(opts, input_image, settings)
    ids = await submit_all(request, settings, owner, opts, native, idempotency_key)
    headers = {"X-Strokes-Jobs": ",".join(ids)}
    if opts.stream:
        return EventSourceResponse(
            stream_events(request, opts, ids[0], kind), ping=settings.sse_ping_s, headers=headers
        )
    response.headers.update(headers)
    return await respond(request, settings, opts, ids)


def _size(ref: dict[str, Any]) -> str:
    """An image's size as OpenAI writes it: what was drawn (an edit's follows its input)."""
    return f"{ref['width']}x{ref['height']}"


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses=RESPONSES,
    summary="Create images (OpenAI-compatible)",
)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
):
    return await _answer(request, response, settings, owner, body, None, idempotency_key, "image_generation")


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses=RESPONSES,
    summary="Edit an image (OpenAI-compatible, multipart)",
    openapi_extra=EDIT_FORM,
)
async def create_image_edit(
    request: Request,
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
):
    opts, image = await _edit_form(request)
    return await _answer(request, response, settings, owner, opts, image, idempotency_key, "image_edit")


async def _edit_form(request: Request) -> tuple[ImageEditFields, str]:
    """(fields, the image as base64) of a multipart edit request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("the body must be multipart/form-data, as OpenAI's edits endpoint takes")
    try:
        form = await request.form(max_files=4, max_fields=64)
    except Exception as exc:  # python-multipart's parse errors, bad boundaries
        raise InvalidRequest(f"the multipart body could not be read: {exc}") from exc
    try:  # uploads are spooled to temporary files: closed whatever happens
        return await _read_edit_form(form)
    finally:
        await form.close()


async def _read_edit_form(form: FormData) -> tuple[ImageEditFields, str]:
    files = [v for key in ("image", "image[]") for v in form.getlist(key)]
    if "mask" in form:
        raise InvalidRequest("masks are not supported: describe the change in the prompt", param="mask")
    if len(files) != 1 or not isinstance(files[0], UploadFile):
        raise InvalidRequest("exactly one image file is required (one per request here)", param="image")
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"{key} must be a text field", param=key)
        fields[key] = value
    if isinstance(fields.get("strokes"), str):
        try:
            fields["strokes"] = json.loads(fields["strokes"])
        except ValueError as exc:
            raise InvalidRequest("strokes must be a JSON object", param="strokes") from exc
    try:
        opts = ImageEditFields.model_validate(fields)
    except ValidationError as exc:
        message, param = validation_param(exc)
        raise InvalidRequest(message, param=param) from exc
    raw = await files[0].read()
    return opts, base64.b64encode(raw).decode()
