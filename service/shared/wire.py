"""What goes on the wire: SSE event names, and pipeline events -> (event name, JSON data).

The pipeline's events (model/generation/events.py) carry pixels and know nothing of jobs or URLs; the
client's events carry a job id, the attempt that produced them, and image links instead of
pixels. `Translator` does that mapping for one attempt of one job and keeps the per-attempt
summary that the job hash shows (stages so far, image links). Trajectories are not sent: they go
to the blob store as `{job_id}/{attempt}/trajectory.json` (written before the fenced write that
names it in the job hash, field `trajectory_key`), so Redis holds a reference, never the record.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strokes.model.spec.events import (
    Done,
    ImageCompleted,
    ImageProgress,
    IterationCompleted,
    StageCompleted,
    StageStarted,
    TextDelta,
)
from strokes.model.spec.events import Event as PipelineEvent

# The SSE event names: the one list (docs/events.md, the client, the studio and the Lua scripts are
# checked against it in tests/test_docs.py). A stage's events keep the pipeline's own names.
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
JOB_PAUSED = "job.paused"  # steering (service/steering.py): stopped at a pause point, no worker
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


@dataclass
class Wire:
    """One step of publishing: store `image` and `trajectory` (if any) in the blob store, then emit
    `name` with `data` and set `fields` on the job hash, all under the attempt's fence.
    `trajectory` is the record so far as JSON bytes (encoded on the pipeline's thread: the
    pipeline goes on appending to the lists it holds), stored at fields[TRAJECTORY_FIELD]."""

    name: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    image: tuple[str, np.ndarray] | None = None
    trajectory: bytes | None = None


@dataclass
class Translator:
    job_id: str
    attempt: int
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # image id -> ref
    stages: list[dict[str, Any]] = field(default_factory=list)

    def _data(self, **values: Any) -> dict[str, Any]:
        # ts: when the pipeline produced the event (worker clock), for latency measurements
        return {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "ts": round(time.time(), 6),
            **{k: v for k, v in values.items() if v is not None},
        }

    def _remember(self, image_id: str, width: int, height: int, iteration: int, stage: str) -> dict:
        ref = image_ref(self.job_id, image_id, width, height, iteration=iteration, stage=stage)
        self.images[image_id] = ref
        return ref

    def _image_field(self, ref: dict[str, Any]) -> dict[str, Any]:
        return {IMAGE_FIELD_PREFIX + ref["id"]: {**ref, "attempt": self.attempt}}

    def translate(self, event: PipelineEvent) -> Wire | None:
        if isinstance(event, StageStarted):
            return Wire(STAGE_STARTED, self._data(iteration=event.iteration, stage=event.stage.value))
        if isinstance(event, TextDelta):
            return Wire(
                TEXT_DELTA, self._data(iteration=event.iteration, stage=event.stage.value, delta=event.delta)
            )
        if isinstance(event, ImageProgress):
            data = self._data(
                iteration=event.iteration, stage=event.stage.value, step=event.step, steps=event.steps
            )
            if event.preview is None:
                return Wire(IMAGE_PROGRESS, data)
            preview_id = f"preview-{event.iteration}-{event.stage.value}-{event.step}"
            h, w = event.preview.shape[:2]
            ref = self._remember(preview_id, int(w), int(h), event.iteration, event.stage.value)
            data["preview"] = ref
            return Wire(IMAGE_PROGRESS, data, self._image_field(ref), (preview_id, event.preview))
        if isinstance(event, ImageCompleted):
            image_id = safe_image_id(event.image_id)
            ref = self._remember(image_id, event.width, event.height, event.iteration, event.stage.value)
            return Wire("", {}, self._image_field(ref), (image_id, event.pixels))
        if isinstance(event, StageCompleted):
            return self._stage_completed(event)
        if isinstance(event, IterationCompleted):
            image = self.images.get(safe_image_id(event.image_id))
            return Wire(
                ITERATION_COMPLETED,
                self._data(iteration=event.iteration, verdict=event.verdict.value, image=image),
            )
        return None  # Done is the worker's to finish with; unknown events are not ours to send

    def _stage_completed(self, event: StageCompleted) -> Wire:
        image = None
        if event.image_id is not None:
            image_id = safe_image_id(event.image_id)
            image = self.images.get(image_id) or image_ref(
                self.job_id,
                image_id,
                event.width or 0,
                event.height or 0,
                iteration=event.iteration,
                stage=event.stage.value,
            )
        verdict = event.verdict.value if event.verdict is not None else None
        data = self._data(
            iteration=event.iteration,
            stage=event.stage.value,
            seconds=round(event.seconds, 4),
            text=event.text,
            verdict=verdict,
            refine_instruction=event.refine_instruction,
            image=image,
            steps=event.steps,
            prefilled_tokens=event.prefilled_tokens,
            cached_tokens=event.cached_tokens,
            generated_tokens=event.generated_tokens,
            inherited=event.inherited or None,
        )
        summary = {
            "iteration": event.iteration,
            "stage": event.stage.value,
            "seconds": round(event.seconds, 4),
            "text": event.text,
            "verdict": verdict,
            "image": image,
        }
        self.stages.append({k: v for k, v in summary.items() if v is not None})
        fields: dict[str, Any] = {"stages": self.stages}
        if event.trajectory is None:
            return Wire(STAGE_COMPLETED, data, fields)
        # Forks of an unfinished job start from the record so far (steering.py).
        fields[TRAJECTORY_FIELD] = trajectory_key(self.job_id, self.attempt)
        return Wire(STAGE_COMPLETED, data, fields, trajectory=encode_trajectory(event.trajectory))

    def completed(self, done: Done, timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(job.completed data, job-hash fields) for the pipeline's Done event. The fields name
        the attempt's trajectory blob, which the worker writes (the whole record) before them."""
        final = self.images.get(safe_image_id(done.final_image_id))
        timings = {**timings, "pipeline_s": round(done.seconds, 4)}
        data = self._data(
            final_image=final, iterations=done.iterations, timings=timings, usage=dict(done.usage)
        )
        fields = {
            "final_image": final,
            "iterations": str(done.iterations),
            "usage": dict(done.usage),
            "timings": timings,
            "stages": self.stages,
            TRAJECTORY_FIELD: trajectory_key(self.job_id, self.attempt),
        }
        return data, fields
