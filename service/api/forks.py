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
    continue  paused -> queued, with the paused stage's text replaced when the caller sends one.

Knows nothing of tensors.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from strokes.model.spec.forks import ForkPoint, check_edit, plan_fork
from strokes.model.spec.params import InvalidParams
from strokes.service.api.errors import NotFound, NotReady
from strokes.service.blobs.health import BlobError
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.steering import Steering
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import ForkRequest, JobMessage
from strokes.service.shared.wire import IMAGE_FIELD_PREFIX, TRAJECTORY_FIELD, parent_trajectory_key


@dataclass
class ForkJob:
    """What the API needs to enqueue a fork: its message, job-hash fields, steer record (without its
    trajectory_key: put_fork adds it), the parent's trajectory (JSON, copied to the fork's blob by
    put_fork) and the parent's input image (copied to the fork, as an upload would be)."""

    message: JobMessage
    fields: dict[str, Any]
    steer: dict[str, Any]
    trajectory: bytes
    upload: tuple[bytes, int, int] | None = None


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
    return ForkJob(message, fields, steer, raw, upload)


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


async def continue_job(steering: Steering, job: dict[str, str], text: str | None, blobs: BlobStore) -> None:
    """paused -> queued (with the paused stage's text replaced when `text`, checked against the
    paused trajectory); NotReady (409) when the job is not paused."""
    job_id = job["id"]
    if job["status"] != JobStatus.paused.value:
        raise NotReady(f"the job is {job['status']}, not paused", param="status")
    steer = await steering.get_steer(job_id)
    if steer is None:
        raise NotFound("the paused job's context has expired")
    point = steer["point"]
    if text is not None:
        check_edit(text, "text")
        raw = await blobs.get(steer["trajectory_key"])  # BlobError: 503
        if raw is None:
            raise NotFound("the paused job's context has expired")
        try:
            plan_fork(json.loads(raw), ForkPoint(point["iteration"], point["stage"], text=text))
        except InvalidParams as exc:
            raise InvalidParams("text", exc.message) from None
        steer["point"] = {**point, "text": text}
        await steering.put_steer(job_id, steer)
    data = {
        "job_id": job_id,
        "attempt": int(job.get("attempt") or 0),  # every event's data names its attempt
        "iteration": point["iteration"],
        "stage": point["stage"],
        "edited": text is not None,
    }
    resumed, status = await steering.resume(job_id, data)
    if not resumed:
        raise NotReady(f"the job is {status}, not paused", param="status")


def _point(point: ForkPoint) -> dict[str, Any]:
    out = {
        "iteration": point.iteration,
        "stage": point.stage,
        "text": point.text,
        "instruction": point.instruction,
    }
    return {k: v for k, v in out.items() if v is not None}
