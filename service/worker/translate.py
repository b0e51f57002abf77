"""Pipeline events -> what the worker publishes: (SSE event name, JSON data, job-hash fields, image
pixels to store, the trajectory so far).

The pipeline's events (model/spec/events.py) carry pixels and know nothing of jobs or URLs; the
client's events carry a job id, the attempt that produced them, and image links instead of pixels
(service/shared/wire.py). `Translator` does that mapping for one attempt of one job and keeps the
per-attempt summary that the job hash shows (stages so far, image links).
"""

from __future__ import annotations

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
from strokes.service.shared.wire import (
    IMAGE_FIELD_PREFIX,
    IMAGE_PROGRESS,
    ITERATION_COMPLETED,
    STAGE_COMPLETED,
    STAGE_STARTED,
    TEXT_DELTA,
    TRAJECTORY_FIELD,
    encode_trajectory,
    image_ref,
    safe_image_id,
    trajectory_key,
)


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
