"""`strokes worker --devices cpu,cpu,cpu`: one worker process leads two follower processes (gloo on the
CPU; NCCL on GPUs) that run guidance branches; jobs complete through the whole service, and the
followers end with the worker."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import httpx
from testkit.jobs import QUICK, submit
from testkit.processes import Proc, env_with, start_api, wait_for, wait_workers


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_a_worker_on_three_devices_completes_jobs_and_takes_its_followers_down(
    redis_url, tiny_checkpoint, logdir, procs
):
    api, base = start_api(redis_url, logdir)
    procs.append(api)
    args = ["worker", "--checkpoint", str(tiny_checkpoint), "--devices", "cpu,cpu,cpu", "--name", "multi"]
    worker = Proc(args, env_with(redis_url), logdir / "worker-multi.log")
    procs.append(worker)
    wait_workers(redis_url, {"multi": worker}, timeout=120)
    followers = _children(worker.proc.pid)
    assert len(followers) >= 2, worker.output()  # the two followers (and a resource tracker, maybe)

    job = submit(base, {**QUICK, "refine": {"steps": 4, "cfg_img_scale": 2.0, "cfg_interval": [0.0, 1.0]}})
    done = wait_for(
        lambda: (
            (j := httpx.get(f"{base}/v1/generations/{job['id']}", timeout=5).json())["status"]
            in ("succeeded", "failed", "canceled")
            and j
        ),
        120,
        what="the job to end",
    )
    assert done["status"] == "succeeded", worker.output()

    assert worker.stop() == 0
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in followers),
        30,
        what="the followers to end with the worker",
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
