"""Steering on the worker side: what a run of a fork or a resume starts from, and what a pause leaves
for the next attempt (the records and scripts are service/queue/steering.py's).

A job with a steer record (a fork, or a resume after a pause) runs as a fork of the recorded
trajectory at its point (model/spec/forks.py), with the images it names, the parent's seed and the
caller's text, if any. A job that pauses writes its trajectory so far (the attempt's blob, before
this), and the pause's steer record names that blob, the stage it stopped after and the images the
attempt drew.
"""

from __future__ import annotations

import json

from strokes.model.spec.events import Paused as PausedEvent
from strokes.model.spec.forks import ForkPoint, plan_fork
from strokes.model.spec.params import GenerationParams, RunOptions
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.steering import Pause, Steering
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.wire import trajectory_key


class ContextExpired(LookupError):
    """The fork's or resume's recorded context (steer record, trajectory, an image) has expired."""


async def run_options(
    steering: Steering, blobs: BlobStore, job_id: str, message: JobMessage, params: GenerationParams
) -> tuple[GenerationParams, RunOptions]:
    """(params, options) of the job's run: a fork of its steer record when it has one, the pauses
    it asked for, and its id as the key its contexts are kept warm under."""
    pause_after = tuple(message.pause_after)
    steer = await steering.get_steer(job_id) if (message.fork or pause_after) else None
    if steer is None:
        if message.fork:
            raise ContextExpired("the fork's parent record has expired")
        return params, RunOptions(pause_after=pause_after, warm_key=job_id)
    raw = await blobs.get(steer["trajectory_key"])
    if raw is None:
        raise ContextExpired("the trajectory of the context has expired")
    trajectory = json.loads(raw)
    p = steer["point"]
    point = ForkPoint(p.get("iteration"), p.get("stage"), p.get("text"), p.get("instruction"))
    fork = plan_fork(trajectory, point)
    fork.lineage = steer.get("lineage") or trajectory.get("parent")
    for name, key in steer["images"].items():
        png = await blobs.get(key)
        if png is None:
            raise ContextExpired(f"the image {name} of the context has expired")
        fork.images[name] = imagelib.decode_png(png)
    options = RunOptions(fork=fork, pause_after=pause_after, warm_key=job_id)
    return params.replace(seed=int(trajectory["seed"])), options


async def pause_of(steering: Steering, job_id: str, attempt: int, paused: PausedEvent) -> Pause:
    """The pause to record for a run that stopped at a pause point (its trajectory so far is the
    attempt's blob, written before)."""
    trajectory = paused.trajectory
    old = await steering.get_steer(job_id)
    images = {
        stage["image"]: imagelib.storage_key(job_id, attempt, stage["image"])
        for stage in trajectory["stages"]
        if stage.get("image")
    }
    point = {"iteration": paused.iteration, "stage": paused.stage.value}
    lineage = (old or {}).get("lineage") or trajectory.get("parent")
    steer = {
        "trajectory_key": trajectory_key(job_id, attempt),
        "point": point,
        "images": images,
        "lineage": lineage,
    }
    return Pause(paused.iteration, paused.stage.value, paused.text, steer)
