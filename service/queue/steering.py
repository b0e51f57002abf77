"""Steering on the service side: forks, pause points, continue, cancel while paused, pause expiry.

The model does the exactness (model/generation/fork.py: a context rebuilt from a trajectory equals the
parent's). This module stores what a worker needs to rebuild one, and moves jobs in and out of
the `paused` status with its own fenced Lua scripts (the same discipline as store.py).
Trajectories live in the blob store, never in Redis: a job's is the blob its hash names
(`trajectory_key`: {job_id}/{attempt}/trajectory.json, written by the attempt before the fenced
write that names it), and a steer record names blobs too.

    fork      POST /v1/generations with `fork`: the parent (same owner, else 404) must have a
              trajectory (succeeded, or its stages so far); the fork point is checked against it
              (422 naming fork.stage / fork.text / fork.instruction). The new job's request is the
              parent's (seed made explicit); it goes through the same admission as any job. The
              parent's trajectory is copied to the fork's own blob ({fork}/0/parent_trajectory.json,
              kept like outputs), so the fork does not depend on its parent's; its steer record
              (keys.steer) names that copy, the fork point and the image keys.
    pause     a job with `pause_after` stops after such a stage: the worker writes the trajectory
              so far (its attempt's blob) and runs PAUSE: running -> paused and the steer record
              naming that blob (fenced on the attempt), queue entry acknowledged (no worker, no GPU
              holds it), job.paused with iteration, stage, text and expires_at, and an entry in the
              expiry zset.
    continue  paused -> queued with a new queue entry and job.resumed; the next attempt (any
              worker) forks the steer record at the paused stage, with the caller's text if any.
    warm      a worker that paused or finished a job keeps its KV caches (model/generation/warm.py) and names
              itself in the job hash (`warm_worker`; a fork inherits its parent's). The worker that
              polls a resume or fork of another live, idle worker's job hands the queue entry to
              that worker (XCLAIM: it reads its own pending entries first), once; if that worker
              dies meanwhile the ordinary reclaim gives the entry to any other, which rebuilds.
    cancel    paused -> canceled at once (one terminal event).
    expiry    workers and the API sweep the zset: a pause unanswered for `pause_timeout_s` ends
              canceled with error type `pause_expired` (one terminal event).

Knows nothing of tensors: the worker side hands model objects through (prepare_run).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from strokes.model.spec.params import InvalidParams
from strokes.service.api.errors import NotFound, NotReady
from strokes.service.queue import keys
from strokes.service.queue.client import decode, load_script
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.wire import (
    IMAGE_FIELD_PREFIX,
    TRAJECTORY_FIELD,
    parent_trajectory_key,
    trajectory_key,
)

STEERING_SCRIPTS = ("pause", "continue", "end_paused", "route")  # service/lua/{name}.lua


@dataclass
class ForkJob:
    """What the API needs to enqueue a fork: its request record, job-hash fields, steer record
    (without its trajectory_key: put_fork adds it), the parent's trajectory (JSON, copied to the
    fork's blob by put_fork) and the parent's input image (copied to the fork, as an upload would
    be)."""

    record: dict[str, Any]
    fields: dict[str, Any]
    steer: dict[str, Any]
    trajectory: bytes
    upload: tuple[bytes, int, int] | None = None


def steering(store: Store) -> Steering:
    """The store's Steering (its scripts registered once per client)."""
    found = getattr(store, "_steering", None)
    if found is None:
        found = store._steering = Steering(store)
    return found


@dataclass
class Steering:
    store: Store
    scripts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.store.r
        self.scripts = {name: r.register_script(load_script(name)) for name in STEERING_SCRIPTS}

    @property
    def settings(self):
        return self.store.settings

    # -- API side ---------------------------------------------------------------------------------

    async def trajectory_of(self, job: dict[str, str], blobs) -> bytes:
        """The trajectory (JSON) of a job to fork, read through its hash's reference: the whole
        one when it succeeded, else its stages so far (paused, running, failed, canceled: what its
        last attempt completed; a takeover's new attempt names one at its first stage)."""
        status, key = job["status"], job.get(TRAJECTORY_FIELD)
        if not key and status not in (JobStatus.succeeded.value, JobStatus.paused.value):
            raise NotReady(f"the parent ({status}) has no completed stage yet", param="fork.job_id")
        raw = await blobs.get(key) if key else None  # BlobUnavailable: 503
        if raw is None:
            raise NotFound("the parent's trajectory has expired", param="fork.job_id")
        return raw

    async def fork_job(self, parent: dict[str, str], fork: dict[str, Any], blobs) -> ForkJob:
        """Check a fork request against its parent (found for the caller already)."""
        from strokes.model.spec.forks import ForkPoint, plan_fork

        if fork.get("instruction") is not None and parent["status"] != JobStatus.succeeded.value:
            raise InvalidParams(
                "fork.instruction", "a follow-up needs a finished parent; fork at a stage instead"
            )
        raw = await self.trajectory_of(parent, blobs)
        trajectory = json.loads(raw)
        point = ForkPoint(
            iteration=fork.get("iteration"),
            stage=fork.get("stage"),
            text=fork.get("text"),
            instruction=fork.get("instruction"),
            parent=parent["id"],
        )
        cut = plan_fork(trajectory, point)  # InvalidParams naming fork.* -> 422
        record = json.loads(parent["request"])
        record.pop("fork", None)
        record.pop("pause_after", None)
        record["seed"] = int(trajectory["seed"])  # the parent's actual draws, even if it chose at random
        record["fork"] = {k: v for k, v in fork.items() if v is not None}
        images = {}
        for name in cut.needed_images():  # each where the attempt that drew it stored it
            image_id = name
            ref = json.loads(parent.get(IMAGE_FIELD_PREFIX + image_id) or "{}")
            if "attempt" not in ref:
                raise NotFound(f"the parent's image {image_id} is gone", param="fork.job_id")
            images[name] = imagelib.storage_key(parent["id"], int(ref["attempt"]), image_id)
        steer = {"point": _point(point), "images": images, "lineage": cut.lineage}
        upload = None
        if trajectory["settings"].get("starting_image"):
            from strokes.service.api.jobs import INPUT_IMAGE_ID

            png = await blobs.get(imagelib.storage_key(parent["id"], 0, INPUT_IMAGE_ID))
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
        return ForkJob(record, fields, steer, raw, upload)

    async def put_fork(self, job_id: str, fork: ForkJob, blobs) -> None:
        """A fork's context, before its job is enqueued (a worker may take it at once): the
        parent's trajectory copied to the fork's own blob, then the steer record naming it."""
        key = parent_trajectory_key(job_id)
        await blobs.put(key, fork.trajectory)
        await self.put_steer(job_id, {**fork.steer, "trajectory_key": key})

    async def drop_fork(self, job_id: str, blobs) -> None:
        """Undo put_fork for a fork that was not enqueued (queue full, quota, idempotent replay)."""
        await self.store.r.delete(keys.steer(job_id))
        with contextlib.suppress(OSError):  # the sweep removes it later
            await blobs.delete(parent_trajectory_key(job_id))

    @property
    def steer_ttl_s(self) -> int:
        return self.settings.result_ttl_s + self.settings.pause_timeout_s

    async def put_steer(self, job_id: str, steer: dict[str, Any]) -> None:
        """steer: {trajectory_key: a blob key, point: {iteration, stage, text?, instruction?},
        images: {image id: blob key}, lineage}."""
        await self.store.r.set(keys.steer(job_id), _json(steer), ex=self.steer_ttl_s)

    async def get_steer(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.store.r.get(keys.steer(job_id))
        return None if raw is None else json.loads(raw)

    async def continue_job(self, job: dict[str, str], text: str | None, blobs) -> str:
        """paused -> queued (with the paused stage's text replaced when `text`, checked against
        the paused trajectory). Returns the outcome: queued | not_paused."""
        from strokes.model.spec.forks import ForkPoint, check_edit, plan_fork

        job_id = job["id"]
        if job["status"] != "paused":
            raise NotReady(f"the job is {job['status']}, not paused", param="status")
        steer = await self.get_steer(job_id)
        if steer is None:
            raise NotFound("the paused job's context has expired")
        point = steer["point"]
        if text is not None:
            check_edit(text, "text")
            raw = await blobs.get(steer["trajectory_key"])  # BlobUnavailable: 503
            if raw is None:
                raise NotFound("the paused job's context has expired")
            try:
                plan_fork(json.loads(raw), ForkPoint(point["iteration"], point["stage"], text=text))
            except InvalidParams as exc:
                raise InvalidParams("text", exc.message) from None
            steer["point"] = {**point, "text": text}
            await self.put_steer(job_id, steer)
        data = {
            "job_id": job_id,
            "attempt": int(job.get("attempt") or 0),  # every event's data names its attempt
            "iteration": point["iteration"],
            "stage": point["stage"],
            "edited": text is not None,
        }
        s = self.settings
        result = await self.scripts["continue"](
            keys=[keys.job(job_id), keys.events(job_id), keys.JOBS, keys.QUEUED, keys.PAUSED],
            args=[job_id, s.events_maxlen, json.dumps(data)],
        )
        if decode(result[0]) != "queued":
            raise NotReady(f"the job is {decode(result[1])}, not paused", param="status")
        return "queued"

    async def cancel_paused(self, job_id: str) -> bool:
        """Cancel a paused job at once; False when it is not paused (store.cancel handles it)."""
        data = {"job_id": job_id, "reason": "canceled while paused"}
        return await self._end(job_id, data, None, "") == "canceled"

    async def expire_pauses(self, limit: int = 20) -> int:
        """End pauses left unanswered past their time (workers call this on their reclaim beat, the
        API every pause_sweep_interval_s: a pool scaled to zero still ends them). Any number of
        callers at once: end_paused ends a pause once."""
        now_ms = int(time.time() * 1000)
        due = await self.store.r.zrangebyscore(keys.PAUSED, "-inf", now_ms, start=0, num=limit)
        ended = 0
        for raw in due:
            job_id = decode(raw)
            error = {
                "type": "pause_expired",
                "message": f"the pause was not answered within {self.settings.pause_timeout_s} s",
            }
            data = {"job_id": job_id, "reason": "pause_expired", "error": error}
            ended += await self._end(job_id, data, error, str(now_ms)) == "canceled"
        return ended

    async def _end(self, job_id: str, data: dict, error: dict | None, before_ms: str) -> str:
        s = self.settings
        job = await self.store.r.hget(keys.job(job_id), "attempt")
        data = {**data, "attempt": int(job or 0)}
        result = await self.scripts["end_paused"](
            keys=[keys.job(job_id), keys.events(job_id), keys.PAUSED],
            args=[
                job_id,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                json.dumps(data),
                json.dumps(error) if error else "",
                before_ms,
            ],
        )
        return decode(result[0])

    # -- worker side ------------------------------------------------------------------------------

    async def prepare_run(
        self, job_id: str, record: dict[str, Any], params, blobs, pipeline=None
    ) -> tuple[Any, dict[str, Any]]:
        """(params, extra keyword arguments of Pipeline.run) for a job: `fork` when it has a steer
        record (a fork, or a resume after a pause), `pause_after` when it asked for pauses, and
        `warm_key` when the pipeline keeps warm contexts (the model's does)."""
        from strokes.model.spec.forks import ForkPoint, plan_fork

        extra: dict[str, Any] = {}
        if pipeline is not None and hasattr(pipeline, "warm"):
            if pipeline.warm is None:
                from strokes.model.generation.warm import WarmContexts

                pipeline.warm = WarmContexts(self.settings.warm_device_bytes, self.settings.warm_host_bytes)
            extra["warm_key"] = job_id
        if record.get("pause_after"):
            extra["pause_after"] = tuple(record["pause_after"])
        steer = await self.get_steer(job_id) if (record.get("fork") or record.get("pause_after")) else None
        if steer is None:
            if record.get("fork"):
                raise LookupError("the fork's parent record has expired")
            return params, extra
        raw = await blobs.get(steer["trajectory_key"])
        if raw is None:
            raise LookupError("the trajectory of the context has expired")
        trajectory = json.loads(raw)
        p = steer["point"]
        point = ForkPoint(p.get("iteration"), p.get("stage"), p.get("text"), p.get("instruction"))
        fork = plan_fork(trajectory, point)
        fork.lineage = steer.get("lineage") or trajectory.get("parent")
        for name, key in steer["images"].items():
            png = await blobs.get(key)
            if png is None:
                raise LookupError(f"the image {name} of the context has expired")
            fork.images[name] = imagelib.decode_png(png)
        extra["fork"] = fork
        return params.replace(seed=int(trajectory["seed"])), extra

    async def route(self, worker: str, entry_id: str, job_id: str) -> bool:
        """True when the entry went to the worker holding the job's warm context (not ours)."""
        result = await self.scripts["route"](
            keys=[keys.job(job_id), keys.JOBS],
            args=[worker, entry_id, keys.GROUP, keys.HEARTBEAT_PREFIX, job_id, keys.job("")],
        )
        return int(result) == 1

    @staticmethod
    def warm_fields(job_id: str, worker: str, pipeline) -> dict[str, str]:
        """The job-hash field naming this worker when it keeps the job's caches: written with the
        job's end (fenced, before the terminal event), so a fork sent on that event finds it."""
        warm = getattr(pipeline, "warm", None)
        return {"warm_worker": worker} if warm is not None and warm.holds(job_id) else {}

    async def mark_warm(self, job_id: str, worker: str, pipeline) -> None:
        """Name this worker in the job hash when it keeps the job's caches (before a pause)."""
        fields = self.warm_fields(job_id, worker, pipeline)
        if fields:
            await self.store.r.hset(keys.job(job_id), mapping=fields)

    async def pause(self, job_id: str, attempt: int, paused) -> str:
        """The worker's end of an attempt that paused, once it has written the trajectory so far
        (its attempt's blob, trajectory_key): PAUSE, which writes the steer record naming that blob.
        Returns paused | cancel (cancel was requested: finish as canceled) | fenced."""
        s = self.settings
        trajectory = paused.trajectory
        key = trajectory_key(job_id, attempt)
        old = await self.get_steer(job_id)
        images = {
            st["image"]: imagelib.storage_key(job_id, attempt, st["image"])
            for st in trajectory["stages"]
            if st.get("image")
        }
        point = {"iteration": paused.iteration, "stage": paused.stage.value}
        lineage = (old or {}).get("lineage") or trajectory.get("parent")
        steer = {"trajectory_key": key, "point": point, "images": images, "lineage": lineage}
        expires_at = time.time() + s.pause_timeout_s
        info = {**point, "text": paused.text, "expires_at": round(expires_at, 3)}
        data = {"job_id": job_id, "attempt": attempt, **info, "waiting_for": "continue or cancel"}
        result = await self.scripts["pause"](
            keys=[
                keys.job(job_id),
                keys.events(job_id),
                keys.JOBS,
                keys.PAUSED,
                keys.QUEUED,
                keys.steer(job_id),
            ],
            args=[
                attempt,
                keys.GROUP,
                s.events_maxlen,
                int(expires_at * 1000),
                json.dumps(data),
                json.dumps(info),
                _json(steer),
                self.steer_ttl_s,
                key,
            ],
        )
        return decode(result[0])


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _point(point) -> dict[str, Any]:
    out = {
        "iteration": point.iteration,
        "stage": point.stage,
        "text": point.text,
        "instruction": point.instruction,
    }
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["ForkJob", "Steering", "steering"]
