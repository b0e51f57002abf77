"""What the API does with jobs, apart from HTTP: submit, look up (with ownership), view, cancel.

Routes in api.py call these and only translate to responses; the Redis work is in store.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from service import budget
from service import images as imagelib
from service.errors import (
    IdempotencyKeyReused,
    InvalidImage,
    InvalidRequest,
    NotFound,
    OverBudget,
    PayloadTooLarge,
    QueueFull,
    QuotaExceeded,
)
from service.keys import JobStatus
from service.schemas import GenerationRequest, Job, params_from_record
from service.settings import Settings
from service.store import Store
from service.wire import IMAGE_FIELD_PREFIX, image_ref

JOB_ID = re.compile(r"^gen_[A-Za-z0-9_-]{22}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
INPUT_IMAGE_ID = "input"


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


def _json(job: dict[str, str], field: str) -> Any:
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
    timings = _json(job, "timings") or {}
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
        request=_json(job, "request") or {},
        stages=_json(job, "stages") or [],
        images=image_refs(job),
        final_image=_json(job, "final_image"),
        iterations=int(job["iterations"]) if job.get("iterations") else None,
        timings=timings or None,
        usage=_json(job, "usage"),
        error=_json(job, "error"),
        links=links(job["id"]),
    )


async def current_view(store: Store, job_id: str) -> Job:
    job = await store.get_job(job_id)
    if job is None:
        raise NotFound("no such generation")
    position = None
    if job["status"] == JobStatus.queued.value and job.get("entry_id"):
        position = await store.queue_position(job["entry_id"])
    return view(job, position)


async def submit(
    store: Store,
    settings: Settings,
    owner: str,
    request: GenerationRequest,
    idempotency_key: str | None,
    deadline_s: float,
) -> tuple[Job, bool]:
    """Admit and enqueue one generation. Returns (job, replayed). The Redis part is bounded by
    `deadline_s` (TimeoutError); decoding an input image is not."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters", param="Idempotency-Key"
        )
    record = request.job_record()
    params_from_record(record, None, settings.max_side)  # GenerationParams.validate() has the last word
    try:
        estimate = budget.check(
            record,
            max_cost=settings.max_job_cost,
            max_positions=settings.max_positions,
            max_events=settings.events_maxlen // settings.max_attempts,
        )
    except budget.OverBudget as exc:
        raise OverBudget(str(exc), param=exc.limit) from exc
    upload = None
    if request.input_image is not None:
        try:
            upload = await run_in_threadpool(
                imagelib.decode_upload, request.input_image, settings.max_input_pixels
            )
        except imagelib.UploadTooLarge as exc:
            raise PayloadTooLarge(str(exc), param="input_image") from exc
        except imagelib.InvalidUpload as exc:
            raise InvalidImage(str(exc), param="input_image") from exc
    return await asyncio.wait_for(
        _enqueue(store, settings, owner, request, record, idempotency_key, upload, estimate), deadline_s
    )


async def _enqueue(
    store: Store,
    settings: Settings,
    owner: str,
    request: GenerationRequest,
    record: dict[str, Any],
    idempotency_key: str | None,
    upload: tuple[bytes, int, int] | None,
    estimate: budget.Estimate,
) -> tuple[Job, bool]:
    job_id = new_job_id()
    fields: dict[str, Any] = {}
    stored_input = None
    images = imagelib.RedisImageStore(store.r)
    if upload is not None:
        png, width, height = upload
        stored_input = imagelib.storage_key(job_id, 0, INPUT_IMAGE_ID)
        # Kept for twice the result TTL: a queued job may wait a long time before it runs.
        await images.put(stored_input, png, settings.result_ttl_s * 2)
        ref = image_ref(job_id, INPUT_IMAGE_ID, width, height, stage="input")
        fields[IMAGE_FIELD_PREFIX + INPUT_IMAGE_ID] = {**ref, "attempt": 0}
    result = await store.enqueue(
        job_id,
        owner=owner,
        request=record,
        body_hash=request.fingerprint(),
        idempotency_key=idempotency_key,
        fields=fields,
        # every attempt's events fit: a job within budget never loses events to trimming
        events_maxlen=estimate.events * settings.max_attempts,
    )
    if result.outcome != "ok" and stored_input is not None:
        await images.delete(stored_input)
    if result.outcome == "full":
        raise QueueFull(await store.retry_after())
    if result.outcome == "quota":
        raise QuotaExceeded(settings.key_max_jobs, await store.retry_after())
    if result.outcome == "conflict":
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different request body", param="Idempotency-Key"
        )
    return await current_view(store, result.job_id), result.outcome == "duplicate"
