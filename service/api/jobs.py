"""What the API does with jobs, apart from HTTP: submit, look up (with ownership), view, wait.

The routes (service/api/routes/) call these and only translate to responses; the Redis work is in
service/queue/store.py, forks' checks in forks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from strokes.service.api import budget, defaults, forks
from strokes.service.api.errors import (
    IdempotencyKeyReused,
    InvalidImage,
    InvalidRequest,
    NotFound,
    OverBudget,
    PayloadTooLarge,
    QueueFull,
    QuotaExceeded,
)
from strokes.service.api.schemas import GenerationRequest, Job
from strokes.service.blobs.health import BlobError
from strokes.service.blobs.links import presign_refs
from strokes.service.blobs.store import BlobStore
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import Admission
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared import webhooks
from strokes.service.shared.messages import FORK_INHERITS, JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import IMAGE_FIELD_PREFIX, TERMINAL_EVENTS, image_ref

JOB_ID = re.compile(r"^gen_[A-Za-z0-9_-]{22}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def new_job_id() -> str:
    return "gen_" + secrets.token_urlsafe(16)  # 128 random bits


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/generations/{job_id}"
    return {"self": base, "events": base + "/events", "trajectory": base + "/trajectory"}


async def find(store: Store, job_id: str, owner: str) -> dict[str, str]:
    """The job hash, or NotFound for unknown ids and for other owners' jobs alike."""
    if not JOB_ID.match(job_id):
        raise NotFound("no such generation")
    job = await store.get_job(job_id)
    if job is None or not secrets.compare_digest(job.get("owner", ""), owner):
        raise NotFound("no such generation")
    return job


def json_field(job: dict[str, str], field: str) -> Any:
    """A job-hash field holding JSON, parsed (None when absent or unreadable)."""
    raw = job.get(field)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _float(job: dict[str, str], field: str) -> float | None:
    raw = job.get(field)
    return float(raw) if raw else None


def _request_view(job: dict[str, str]) -> dict[str, Any]:
    """The request as its job's view shows it (the queue's message, without its version)."""
    request = json_field(job, "request") or {}
    request.pop("version", None)
    return request


def image_refs(job: dict[str, str]) -> list[dict[str, Any]]:
    refs = []
    for field, raw in job.items():
        if field.startswith(IMAGE_FIELD_PREFIX) and not field.startswith(IMAGE_FIELD_PREFIX + "preview-"):
            ref = json.loads(raw)
            ref.pop("attempt", None)
            refs.append(ref)
    order = {"input": 0, "plan": 1, "draft": 2, "reflect": 3, "refine": 4}
    refs.sort(key=lambda r: (r.get("iteration") or 0, order.get(r.get("stage") or "", 9), r["id"]))
    return refs


def view(job: dict[str, str], position: int | None = None) -> Job:
    created = float(job["created_at"])
    started, finished = _float(job, "started_at"), _float(job, "finished_at")
    timings = json_field(job, "timings") or {}
    if started is not None:
        timings.setdefault("queued_s", round(started - created, 4))
        timings.setdefault("run_s", round((finished or time.time()) - started, 4))
    if finished is not None:
        timings.setdefault("total_s", round(finished - created, 4))
    status = job["status"]
    return Job(
        id=job["id"],
        status=status,
        created_at=created,
        started_at=started,
        finished_at=finished,
        attempt=int(job.get("attempt", 0)),
        queue_position=position if status == JobStatus.queued.value else None,
        cancel_requested=job.get("cancel") == "1",
        request=_request_view(job),
        stages=json_field(job, "stages") or [],
        images=image_refs(job),
        final_image=json_field(job, "final_image"),
        iterations=int(job["iterations"]) if job.get("iterations") else None,
        timings=timings or None,
        usage=json_field(job, "usage"),
        error=json_field(job, "error"),
        parent=json_field(job, "parent"),
        paused=json_field(job, "paused") if status == "paused" else None,
        links=links(job["id"]),
    )


def direct_links(job_view: Job, job: dict[str, str], blobs: BlobStore) -> Job:
    """The view with every image link pointing straight at the blob store (presigned), where the
    store hands out such links; only for views the owner can see."""
    attempts = {
        field[len(IMAGE_FIELD_PREFIX) :]: int(json.loads(raw).get("attempt", 0))
        for field, raw in job.items()
        if field.startswith(IMAGE_FIELD_PREFIX)
    }
    if blobs.url(imagelib.storage_key(job_view.id, 0, imagelib.INPUT_IMAGE_ID)) is None:
        return job_view  # no direct links: leave the API's
    return Job.model_validate(
        presign_refs(job_view.model_dump(mode="json"), job_view.id, attempts.get, blobs)
    )


async def current_view(store: Store, job_id: str, blobs: BlobStore | None = None) -> Job:
    """The job as its owner sees it now; with `blobs`, image links may be the store's own."""
    job = await store.get_job(job_id)
    if job is None:
        raise NotFound("no such generation")
    position = None
    if job["status"] == JobStatus.queued.value and job.get("entry_id"):
        position = await store.queue_position(job["entry_id"])
    job_view = view(job, position)
    return direct_links(job_view, job, blobs) if blobs is not None else job_view


async def submit(
    store: Store,
    steering: Steering,
    settings: Settings,
    owner: str,
    request: GenerationRequest,
    idempotency_key: str | None,
    deadline_s: float,
    *,
    blobs: BlobStore,
) -> tuple[Job, bool]:
    """Admit and enqueue one generation. Returns (job, replayed). The Redis part is bounded by
    `deadline_s` (TimeoutError); decoding an input image is not, and storing it is bounded by
    the blob store's own timeout. The input is stored before the job exists (a worker must find
    it) and deleted again when the job is not created; one left by a crash in between is swept."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters", param="Idempotency-Key"
        )
    fingerprint = request.fingerprint()
    request = defaults.apply(request, settings.request_defaults)  # what it leaves out: this server's
    message, fork = request.job_message(), None
    if request.fork is not None:  # the parent's message and context (service/api/forks.py)
        fork = await asyncio.wait_for(_fork(store, owner, request, blobs), deadline_s)
        message = fork.message.model_copy(
            update={"pause_after": request.pause_after, "preview_every": request.preview_every}
        )
    elif request.prompt is None:
        raise InvalidRequest("prompt: required (or fork an earlier generation)", param="prompt")
    upload = fork.upload if fork is not None else None
    if request.input_image is not None:
        try:
            upload = await run_in_threadpool(
                imagelib.decode_upload, request.input_image, settings.max_input_pixels, settings.upload_resize
            )
        except imagelib.UploadTooLarge as exc:
            raise PayloadTooLarge(str(exc), param="input_image") from exc
        except imagelib.InvalidUpload as exc:
            raise InvalidImage(str(exc), param="input_image") from exc
        message = _edit_size(message, upload, settings)
    params = message.to_params(None, settings.max_side)  # GenerationParams.validate() has the last word
    try:
        estimate = budget.check(
            message,
            params,
            max_cost=settings.max_job_cost,
            max_positions=settings.max_positions,
            max_events=settings.events_maxlen // settings.max_attempts,
            resumed=fork.resumption(params) if fork is not None else None,  # its real context
        )
    except budget.OverBudget as exc:
        raise OverBudget(str(exc), param=exc.limit) from exc
    if request.webhook_url is not None:
        await _check_webhook(settings, owner, request.webhook_url)
    job_id = new_job_id()
    fields: dict[str, Any] = {}
    stored_input = None
    if upload is not None:
        png, width, height = upload
        stored_input = imagelib.storage_key(job_id, 0, imagelib.INPUT_IMAGE_ID)
        await blobs.put(stored_input, png)
        ref = image_ref(job_id, imagelib.INPUT_IMAGE_ID, width, height, stage="input")
        fields[IMAGE_FIELD_PREFIX + imagelib.INPUT_IMAGE_ID] = {**ref, "attempt": 0}
    if request.webhook_url is not None:
        fields.update(webhooks.hash_fields(request.webhook_url, request.webhook_events, signer=owner))
    submission = Submission(job_id, owner, message, fingerprint, idempotency_key, fields, estimate)
    try:
        job, replayed = await asyncio.wait_for(
            _enqueue(store, steering, settings, submission, blobs, fork), deadline_s
        )
    except (QueueFull, QuotaExceeded, IdempotencyKeyReused):  # surely no job: drop its input now
        await _drop(blobs, stored_input)
        raise
    # (On a Redis error or timeout we cannot tell whether the job exists: its input stays, and the
    # job's end or the sweep removes it.)
    if job.id != job_id:  # an idempotent replay: the first job has its own input
        await _drop(blobs, stored_input)
    return job, replayed


def _edit_size(message: JobMessage, upload: tuple[bytes, int, int], settings: Settings) -> JobMessage:
    """An edit's message records the size it draws at: its input's, as the model resizes it (the
    rule the upload was stored by, settings.upload_resize). A width and height sent with an edit
    never had a say (the model follows the starting image): the job records the truth instead."""
    _png, width, height = upload
    width, height = imagelib.model_size(width, height, settings.upload_resize)
    return message.model_copy(update={"width": width, "height": height})


@dataclass(frozen=True)
class Submission:
    """One job as it goes to the enqueue script."""

    job_id: str
    owner: str
    message: JobMessage
    body_hash: str  # the request's fingerprint: a retry with another body is a conflict
    idempotency_key: str | None
    fields: dict[str, Any]  # job-hash fields beside the message (input image, webhook, fork)
    estimate: budget.Estimate


async def _drop(blobs: BlobStore, key: str | None) -> None:
    if key is not None:
        with contextlib.suppress(BlobError):  # the sweep removes it later
            await blobs.delete(key)


async def _check_webhook(settings: Settings, owner: str, url: str) -> None:
    """422 unless the caller's key has signing secrets (its own: STROKES_WEBHOOK_SECRETS; without
    API keys the server's) and the URL's host resolves to allowed addresses only."""
    if owner not in webhooks.signers(settings):
        why = (
            "this API key has no webhook signing secret (STROKES_WEBHOOK_SECRETS)"
            if settings.api_keys
            else "webhooks are not enabled on this server (no STROKES_WEBHOOK_SECRET)"
        )
        raise InvalidRequest(why, param="webhook_url")
    try:
        await webhooks.resolve(url, settings.webhook_allow_networks, settings.webhook_resolve_timeout_s)
    except webhooks.UnsafeURL as exc:
        raise InvalidRequest(f"webhook_url {exc}", param="webhook_url") from exc


async def _fork(store: Store, owner: str, request: GenerationRequest, blobs: BlobStore) -> forks.ForkJob:
    inherited = sorted(request.model_fields_set & FORK_INHERITS)
    if inherited:
        raise InvalidRequest(
            f"{inherited[0]}: a fork runs with its parent's parameters; leave it out", param=inherited[0]
        )
    try:
        parent = await find(store, request.fork.job_id, owner)
    except NotFound:
        raise NotFound("no such generation to fork", param="fork.job_id") from None
    return await forks.fork_job(parent, request.fork, blobs)


async def _enqueue(
    store: Store,
    steering: Steering,
    settings: Settings,
    job: Submission,
    blobs: BlobStore,
    fork: forks.ForkJob | None,
) -> tuple[Job, bool]:
    fields = job.fields
    if fork is not None:  # the context record first: a worker may take the job as soon as it is queued
        await forks.put_fork(steering, job.job_id, fork, blobs)
        fields = {**fields, **fork.fields}
    result = await store.enqueue(
        job.job_id,
        owner=job.owner,
        message=job.message,
        body_hash=job.body_hash,
        idempotency_key=job.idempotency_key,
        fields=fields,
        # every attempt's events fit (and each deferral's job.queued and job.started): a job
        # within budget never loses events to trimming
        events_maxlen=job.estimate.events * settings.max_attempts + 2 * settings.storage_max_deferrals,
    )
    if result.outcome != Admission.ok and fork is not None:
        await forks.drop_fork(steering, job.job_id, blobs)
    if result.outcome == Admission.full:
        raise QueueFull(await store.retry_after())
    if result.outcome == Admission.quota:
        raise QuotaExceeded(settings.key_max_jobs, await store.retry_after())
    if result.outcome == Admission.conflict:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different request body", param="Idempotency-Key"
        )
    return await current_view(store, result.job_id, blobs), result.outcome == Admission.duplicate


async def wait_terminal(store: Store, job_id: str, seconds: float) -> bool:
    """Block until the job's terminal event or `seconds`; True when the job has ended."""
    deadline = time.monotonic() + seconds
    cursor = "0"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        block_ms = max(1, int(min(left, store.settings.sse_block_ms / 1000) * 1000))
        batch = await store.read_events(job_id, cursor, count=500, block_ms=block_ms)
        if any(event.name in TERMINAL_EVENTS for event in batch):
            return True
        if batch:
            cursor = batch[-1].id
        elif await store.r.exists(keys.job(job_id)) == 0:
            return True  # expired while we waited (a very short result TTL): nothing to wait for
