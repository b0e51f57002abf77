"""The wire format every process shares: SSE event names, image links, the job-hash fields that
name images and trajectories, and the blob keys of trajectories.

The client's events carry a job id, the attempt that produced them, and image links instead of
pixels (the worker's translation: service/worker/translate.py). Trajectories are not sent: they go
to the blob store as `{job_id}/{attempt}/trajectory.json` (written before the fenced write that
names it in the job hash, field `trajectory_key`), so Redis holds a reference, never the record.
"""

from __future__ import annotations

import json
import re
from typing import Any

from strokes.model.spec.events import (
    ImageProgress,
    IterationCompleted,
    StageCompleted,
    StageStarted,
    TextDelta,
)

# The SSE event names: the one list (docs/events.md, the client, the studio and the Lua scripts are
# checked against it in tests/docs/test_docs.py). A stage's events keep the pipeline's own names.
JOB_QUEUED = "job.queued"
JOB_STARTED = "job.started"
STAGE_STARTED = StageStarted.name
TEXT_DELTA = TextDelta.name
IMAGE_PROGRESS = ImageProgress.name
STAGE_COMPLETED = StageCompleted.name
ITERATION_COMPLETED = IterationCompleted.name
JOB_COMPLETED = "job.completed"
JOB_FAILED = "job.failed"
JOB_CANCELED = "job.canceled"
JOB_PAUSED = "job.paused"  # steering (service/api/forks.py): stopped at a pause point, no worker
JOB_RESUMED = "job.resumed"  # continued: queued again
TERMINAL_EVENTS = frozenset({JOB_COMPLETED, JOB_FAILED, JOB_CANCELED})
EVENT_NAMES = (
    JOB_QUEUED,
    JOB_STARTED,
    STAGE_STARTED,
    TEXT_DELTA,
    IMAGE_PROGRESS,
    STAGE_COMPLETED,
    ITERATION_COMPLETED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELED,
    JOB_PAUSED,
    JOB_RESUMED,
)

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
IMAGE_FIELD_PREFIX = "img:"  # job-hash field per image id -> {attempt, width, height, ...}
TRAJECTORY_FIELD = "trajectory_key"  # job-hash field: the blob key of the job's trajectory (so far)
TRAJECTORY_BLOB = "trajectory.json"  # an attempt's trajectory: {job_id}/{attempt}/trajectory.json
PARENT_TRAJECTORY_BLOB = "parent_trajectory.json"  # a fork's copy of its parent's: {job_id}/0/...
BLOB_NAMES = frozenset({TRAJECTORY_BLOB, PARENT_TRAJECTORY_BLOB})  # no image may take these names


def trajectory_key(job_id: str, attempt: int) -> str:
    """The blob key of an attempt's trajectory (each attempt writes its own, like its images)."""
    return f"{job_id}/{attempt}/{TRAJECTORY_BLOB}"


def parent_trajectory_key(job_id: str) -> str:
    """The blob key of a fork's copy of its parent's trajectory (written by the API at fork time)."""
    return f"{job_id}/0/{PARENT_TRAJECTORY_BLOB}"


def encode_trajectory(trajectory: dict[str, Any]) -> bytes:
    return json.dumps(trajectory, separators=(",", ":"), default=str).encode()


def image_url(job_id: str, image_id: str) -> str:
    return f"/v1/generations/{job_id}/images/{image_id}"


def image_ref(job_id: str, image_id: str, width: int, height: int, **extra: Any) -> dict[str, Any]:
    ref = {"id": image_id, "url": image_url(job_id, image_id), "width": width, "height": height}
    ref.update({k: v for k, v in extra.items() if v is not None})
    return ref


def safe_image_id(raw: str) -> str:
    """Pipeline image ids become URL path segments and blob names: keep them to a safe alphabet,
    and off the names of the trajectory blobs beside them."""
    if not IMAGE_ID.match(raw):
        raw = re.sub(r"[^A-Za-z0-9_.-]", "-", raw).strip("-.")[:128] or "image"
    return f"image-{raw}" if raw in BLOB_NAMES else raw
