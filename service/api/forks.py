"""Steering on the API side: forks (POST /v1/generations with `fork`) and continue.

The model does the exactness (model/spec/forks.py plans a fork on a trajectory's JSON; the worker
replays it bitwise). The API checks a fork point or an edit against the parent's trajectory and
writes the steer record the next attempt forks (service/queue/steering.py). Trajectories live in
the blob store, never in Redis: a job's is the blob its hash names (`trajectory_key`).

    fork      the parent (same owner, else 404) must have a trajectory (succeeded, or its stages so
              far); the fork point is checked against it (422 naming fork.stage / fork.text /
              fork.instruction). The fork's message is the parent's (seed made explicit); it goes
              through the same admission as any job. The parent's trajectory is copied to the fork's
              own blob ({fork}/0/parent_trajectory.json, kept like outputs), so the fork does not
              depend on its parent's; its steer record names that copy, the fork point and the image
              keys. A parent's input image is copied to the fork, as an upload would be.
    continue  paused -> queued through the same admission as a job (queue cap, key quota), with
              the paused stage's text replaced when the caller sends one (priced again from the
              paused context with the new text); the winner of two continues at once decides.

Knows nothing of tensors.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from strokes.model.spec.budget import Resumption, resumption
from strokes.model.spec.forks import ForkPoint, check_edit, plan_fork
from strokes.model.spec.params import GenerationParams, InvalidParams
from strokes.service.api import budget
from strokes.service.api.errors import NotFound, NotReady, QueueFull, QuotaExceeded
from strokes.service.api.errors import OverBudget as OverBudgetError
from strokes.service.blobs.health import BlobError
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.steering import Resume, Steering
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import ForkRequest, JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import IMAGE_FIELD_PREFIX, TRAJECTORY_FIELD, parent_trajectory_key


@dataclass
class ForkJob:
    """What the API needs to price and enqueue a fork: its message, the stages it replays (and a
    follow-up's instruction), job-hash fields, steer record (without its trajectory_key: put_fork
    adds it), the parent's trajectory (JSON, copied to the fork's blob by put_fork) and the
    parent's input image (copied to the fork, as an upload would be)."""

    message: JobMessage
    stages: list[dict[str, Any]]
    instruction: str | None
    fields: dict[str, Any]
    steer: dict[str, Any]
    trajectory: bytes
    upload: tuple[bytes, int, int] | None = None

    def resumption(self, params: GenerationParams) -> Resumption:
        """Where the fork starts, for its price (model/spec/budget.py): its real context."""
        return resumption(
            params, self.stages, instruction=self.instruction, input_image=self.message.input_image
        )


async def trajectory_of(job: dict[str, str], blobs: BlobStore) -> bytes:
    """The trajectory (JSON) of a job to fork, read through its hash's reference: the whole one
    when it succeeded, else its stages so far (paused, running, failed, canceled: what its last
    attempt completed; a takeover's new attempt names one at its first stage)."""
    status, key = job["status"], job.get(TRAJECTORY_FIELD)
    if not key and status not in (JobStatus.succeeded.value, JobStatus.paused.value):
        raise NotReady(f"the parent ({status}) has no completed stage yet", param="fork.job_id")
    raw = await blobs.get(key) if key else None  # BlobError: 503
    if raw is None:
        raise NotFound("the parent's trajectory has expired", param="fork.job_id")
    return raw


async def fork_job(parent: dict[str, str], fork: ForkRequest, blobs: BlobStore) -> ForkJob:
    """Check a fork request against its parent (found for the caller already)."""
    if fork.instruction is not None and parent["status"] != JobStatus.succeeded.value:
        raise InvalidParams(
            "fork.instruction", "a follow-up needs a finished parent; fork at a stage instead"
        )
    raw = await trajectory_of(parent, blobs)
    trajectory = json.loads(raw)
    point = ForkPoint(
        iteration=fork.iteration,
        stage=fork.stage,
        text=fork.text,
        instruction=fork.instruction,
        parent=parent["id"],
    )
    cut = plan_fork(trajectory, point)  # InvalidParams naming fork.* -> 422
    message = JobMessage.from_json(parent["request"]).model_copy(
        update={
            "seed": int(trajectory["seed"]),  # the parent's actual draws, even if it chose at random
            "fork": fork,
            "pause_after": [],
        }
    )
    images = {}
    for image_id in cut.needed_images():  # each where the attempt that drew it stored it
        ref = json.loads(parent.get(IMAGE_FIELD_PREFIX + image_id) or "{}")
        if "attempt" not in ref:
            raise NotFound(f"the parent's image {image_id} is gone", param="fork.job_id")
        images[image_id] = imagelib.storage_key(parent["id"], int(ref["attempt"]), image_id)
    steer = {"point": _point(point), "images": images, "lineage": cut.lineage}
    upload = None
    if trajectory["settings"].get("starting_image"):
        png = await blobs.get(imagelib.storage_key(parent["id"], 0, imagelib.INPUT_IMAGE_ID))
        if png is None:  # deleted when the parent ended, unless STROKES_BLOB_KEEP_INPUTS
            raise NotFound(
                "the parent's input image is gone (it is deleted when its job ends)", param="fork.job_id"
            )
        h, w = imagelib.decode_png(png).shape[:2]
        upload = (png, w, h)
    parent_ref = {"job_id": parent["id"], "iteration": point.iteration, "stage": point.stage}
    fields: dict[str, Any] = {"parent": parent_ref}
    if parent.get("warm_worker"):
        fields["warm_worker"] = parent["warm_worker"]  # the parent's caches are warm there
    return ForkJob(message, cut.stages, cut.instruction, fields, steer, raw, upload)


async def put_fork(steering: Steering, job_id: str, fork: ForkJob, blobs: BlobStore) -> None:
    """A fork's context, before its job is enqueued (a worker may take it at once): the parent's
    trajectory copied to the fork's own blob, then the steer record naming it."""
    key = parent_trajectory_key(job_id)
    await blobs.put(key, fork.trajectory)
    await steering.put_steer(job_id, {**fork.steer, "trajectory_key": key})


async def drop_fork(steering: Steering, job_id: str, blobs: BlobStore) -> None:
    """Undo put_fork for a fork that was not enqueued (queue full, quota, idempotent replay)."""
    await steering.drop_steer(job_id)
    with contextlib.suppress(BlobError):  # the sweep removes it later
        await blobs.delete(parent_trajectory_key(job_id))


async def continue_job(
    store: Store,
    steering: Steering,
    settings: Settings,
    job: dict[str, str],
    text: str | None,
    blobs: BlobStore,
) -> None:
    """paused -> queued, through admission like a new job (the queue cap, the key's quota; 429);
    with the paused stage's text replaced when `text` is given (checked against the paused
    trajectory, and the job priced again from its real context: 422 budget_exceeded). The edited
    steer record is written by the continue script itself, so of two continues at once the one
    that wins is the one whose text is used; the other gets 409. NotReady (409) when the job is
    not paused (or paused again since it was read)."""
    job_id = job["id"]
    if job["status"] != JobStatus.paused.value:
        raise NotReady(
            f"the job has {_ended(job['status'])}; only a paused job can be continued", param="status"
        )
    steer = await steering.get_steer(job_id)
    if steer is None:
        raise NotFound("the paused job's context has expired")
    point = steer["point"]
    edited = None
    if text is not None:
        check_edit(text, "text")
        raw = await blobs.get(steer["trajectory_key"])  # BlobError: 503
        if raw is None:
            raise NotFound("the paused job's context has expired")
        try:
            cut = plan_fork(json.loads(raw), ForkPoint(point["iteration"], point["stage"], text=text))
        except InvalidParams as exc:
            raise InvalidParams("text", exc.message) from None
        _check_budget(settings, JobMessage.from_json(job["request"]), cut.stages)
        edited = {**steer, "point": {**point, "text": text}}
    attempt = int(job.get("attempt") or 0)
    data = {
        "job_id": job_id,
        "attempt": attempt,  # every event's data names its attempt
        "iteration": point["iteration"],
        "stage": point["stage"],
        "edited": text is not None,
        "ts": round(time.time(), 6),
    }
    resumed = await steering.resume(job_id, attempt, data, edited)
    match resumed.outcome:
        case Resume.full:
            raise QueueFull(await store.retry_after())
        case Resume.quota:
            raise QuotaExceeded(settings.key_max_jobs, await store.retry_after())
        case Resume.not_paused:
            raise NotReady(
                f"the job has {_ended(resumed.detail)}; only a paused job can be continued", param="status"
            )
        case Resume.stale:
            raise NotReady(
                "the job ran on and paused again since it was read; read it again and continue that pause",
                param="status",
            )


def _ended(status: str) -> str:
    """A status in words after "the job has": "the job has succeeded", "the job has been queued"."""
    return {
        "queued": "been queued again",
        "running": "been continued and is running",
        "paused": "paused",
        "succeeded": "succeeded",
        "failed": "failed",
        "canceled": "been canceled",
    }.get(status, f"status {status}")


def _check_budget(settings: Settings, message: JobMessage, stages: list[dict[str, Any]]) -> None:
    """A continue with replaced text, priced from the paused context with the new text in it."""
    params = message.to_params(None, settings.max_side)
    resumed = resumption(params, stages, instruction=None, input_image=message.input_image)
    try:
        budget.check(
            message,
            params,
            max_cost=settings.max_job_cost,
            max_positions=settings.max_positions,
            max_events=settings.events_maxlen // settings.max_attempts,
            resumed=resumed,
        )
    except budget.OverBudget as exc:
        raise OverBudgetError(str(exc), param=exc.limit) from exc


def _point(point: ForkPoint) -> dict[str, Any]:
    out = {
        "iteration": point.iteration,
        "stage": point.stage,
        "text": point.text,
        "instruction": point.instruction,
    }
    return {k: v for k, v in out.items() if v is not None}
