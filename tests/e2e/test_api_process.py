"""The API process never loads torch: a real `strokes api` (with a real tiny-model worker and a real
redis-server) serves one request of every kind, steering and the OpenAI routes included, and
afterwards no libtorch is mapped into its memory (/proc/<pid>/maps), while the worker's holds it.
The rules that keep it so are read from the source in tests/service/test_layout.py; this is the
process itself."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx
import pytest
from testkit.asgi import black_png
from testkit.jobs import QUICK, TERMINAL, payload, stream_events, submit
from testkit.processes import start_api, start_worker

pytestmark = pytest.mark.slow

# Native fields of a quick tiny-model job for the OpenAI routes (their size comes from `size`).
FAST = {k: v for k, v in QUICK.items() if k not in ("prompt", "width", "height")}
PLAN = "<ins>draw a green cube</ins> <des>a green cube on a blue sphere</des>"


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _torch_libraries(pid: int) -> set[str]:
    """The torch shared libraries mapped into the process (libtorch_cpu.so, libtorch_python.so, ...)."""
    return {line.split()[-1] for line in _maps(pid).splitlines() if "/libtorch" in line}


def _completed(base: str, job_id: str, **kwargs) -> list:
    events = stream_events(base, job_id, **kwargs)
    assert events[-1].name == "job.completed", events[-1]
    return events


def _ok(reply: httpx.Response, status: int = 200) -> httpx.Response:
    assert reply.status_code == status, (reply.request.url, reply.status_code, reply.text[:300])
    return reply


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/maps").exists(), reason="no /proc/<pid>/maps here")
def test_serving_every_kind_of_request_never_loads_torch_into_the_api(
    private_redis, tiny_checkpoint, tmp_path, procs
):
    api, base = start_api(private_redis.url, tmp_path)
    procs.append(api)
    worker = start_worker(private_redis.url, tiny_checkpoint, tmp_path, "boundary")
    procs.append(worker)
    upload = "data:image/png;base64," + base64.b64encode(black_png(48, 32)).decode()

    # POST: plain, with an input image, pausing after its plan; one canceled with DELETE.
    plain = submit(base, QUICK)
    edit = submit(base, {**QUICK, "input_image": upload})
    paused = submit(base, {**QUICK, "pause_after": ["plan"]})
    dropped = submit(base, QUICK)
    canceled = httpx.delete(f"{base}/v1/generations/{dropped['id']}", timeout=10)
    assert canceled.status_code in (200, 202), canceled.text  # queued: canceled; running: requested
    # Events (SSE to the terminal event), the job, the list, an image, the trajectory.
    done = payload(_completed(base, plain["id"])[-1])
    view = _ok(httpx.get(f"{base}/v1/generations/{plain['id']}", timeout=10)).json()
    assert view["status"] == "succeeded"
    listed = _ok(httpx.get(f"{base}/v1/generations", timeout=10)).json()
    assert plain["id"] in json.dumps(listed)
    image = _ok(httpx.get(base + done["final_image"]["url"], timeout=10))
    assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert _ok(httpx.get(base + view["links"]["trajectory"], timeout=10)).json()["stages"]
    _completed(base, edit["id"])
    # Continue the paused job with its plan edited.
    stream_events(base, paused["id"], stop=lambda e: e.name in ("job.paused", *TERMINAL))
    path = f"{base}/v1/generations/{paused['id']}/continue"
    _ok(httpx.post(path, json={"text": PLAN}, timeout=10), status=202)
    _completed(base, paused["id"])
    # A fork at a stage, and a follow-up fork (a new instruction after the parent's end).
    at_stage = submit(base, {"fork": {"job_id": plain["id"], "iteration": 1, "stage": "reflect"}})
    _completed(base, at_stage["id"])
    follow_up = submit(base, {"fork": {"job_id": plain["id"], "instruction": "make the cube green"}})
    _completed(base, follow_up["id"])
    # The OpenAI-compatible routes: a generation (JSON) and an edit (multipart).
    body = {"prompt": "a red cube", "size": "64x64", "strokes": FAST}
    generated = _ok(httpx.post(f"{base}/v1/images/generations", json=body, timeout=120)).json()
    assert generated["data"][0]["b64_json"]
    edited = _ok(
        httpx.post(
            f"{base}/v1/images/edits",
            files={"image": ("start.png", black_png(64, 64), "image/png")},
            data={"prompt": "make it red", "size": "64x64", "strokes": json.dumps(FAST)},
            timeout=120,
        )
    ).json()
    assert edited["data"][0]["b64_json"]
    # The rest of the surface: info, probes, metrics, the studio and the API's documentation.
    for path in ("/v1/info", "/healthz", "/readyz", "/metrics", "/studio/", "/docs"):
        _ok(httpx.get(base + path, timeout=10))

    assert api.alive() and worker.alive()
    assert "pydantic_core" in _maps(api.pid)  # the map read is the API's, with its native modules
    assert _torch_libraries(worker.pid)  # the same reading finds torch where it is loaded
    assert _torch_libraries(api.pid) == set(), "the API process has loaded torch"
