"""`make demo` / `strokes demo`: one generation end to end on this machine.

Makes a tiny random checkpoint when STROKES_CHECKPOINT is unset (the images are noise, the
plumbing is real), starts `strokes serve` (API + worker + a private redis-server), submits one
generation, prints its events as they stream, and saves every image and the trajectory to
./demo-out. With a real checkpoint set STROKES_CHECKPOINT and STROKES_DEVICE=cuda:0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from strokes_client import Client

from strokes.model import devices
from strokes.service.cli.serve import free_port
from strokes.service.shared.wire import (
    IMAGE_PROGRESS,
    ITERATION_COMPLETED,
    JOB_COMPLETED,
    STAGE_COMPLETED,
    TEXT_DELTA,
)

TINY_DIR = Path(".tiny")


def ensure_checkpoint() -> tuple[Path, bool]:
    configured = os.environ.get("STROKES_CHECKPOINT")
    if configured:  # a tiny checkpoint carries its sizes in a sidecar file
        return Path(configured), (Path(configured) / "tiny_bagel_info.json").exists()
    if not (TINY_DIR / "ema.safetensors").exists():
        print(f"STROKES_CHECKPOINT is not set: writing a tiny random checkpoint to {TINY_DIR}/")
        subprocess.run([sys.executable, "-m", "strokes.service.cli", "make-tiny", str(TINY_DIR)], check=True)
    return TINY_DIR, True


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"strokes serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready in time")


def demo_request(tiny: bool, prompt: str) -> dict:
    if tiny:  # small and quick on a CPU
        return {
            "prompt": prompt,
            "width": 128,
            "height": 128,
            "max_iterations": 2,
            "seed": 7,
            "draft": {"steps": 10},
            "refine": {"steps": 10},
            "plan": {"max_tokens": 24},
            "reflect": {"max_tokens": 24},
        }
    return {
        "prompt": prompt,
        "width": 512,
        "height": 512,
        "max_iterations": 2,
        "seed": 7,
        "draft": {"steps": 30},
        "refine": {"steps": 30},
    }


def show(event: str, data: dict) -> None:
    if event == TEXT_DELTA:
        print(data["delta"].replace("\n", " "), end="", flush=True)
        return
    if event == IMAGE_PROGRESS:
        print(".", end="", flush=True)
        return
    if event in (STAGE_COMPLETED, ITERATION_COMPLETED, JOB_COMPLETED):
        print()
    brief = {k: v for k, v in data.items() if k not in ("job_id", "ts", "text", "usage", "timings")}
    print(f"[{event}] {json.dumps(brief, ensure_ascii=False)}", flush=True)


def run_demo(args) -> int:
    checkpoint, tiny = ensure_checkpoint()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    device = devices.default()  # resolved (and reported) by the worker
    env = {**os.environ, "STROKES_LOG_LEVEL": os.environ.get("STROKES_LOG_LEVEL", "WARNING")}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "strokes.service.cli",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--device",
            device,
            "--port",
            str(port),
        ],
        env=env,
    )
    try:
        print(f"starting strokes serve on {base} (checkpoint {checkpoint}, device {device})")
        wait_ready(base, serve)
        with Client(base) as client:  # the Python client (clients/python), as an app would use it
            job = client.create(**demo_request(tiny, args.prompt))
            print(f"submitted {job.id} -> {base}/v1/generations/{job.id}")
            final = None
            for event in client.events(job.id):
                show(event.name, event.data)
                if event.terminal:
                    final = event.name
            if final != JOB_COMPLETED:
                print(f"the job ended with {final}")
                return 1
            status = client.get(job.id)
            for image in status.images:
                client.download_image(job.id, image, path=out / f"{image.id}.png")
            client.download_image(job.id, status.final_image, path=out / "final.png")
            trajectory = client.trajectory(job.id)
            (out / "trajectory.json").write_text(json.dumps(trajectory, indent=2))
            (out / "job.json").write_text(json.dumps(status.raw, indent=2))
            print(f"\nsaved {len(status.images)} images, final.png and trajectory.json to {out}/")
        return 0
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="one generation end to end (tiny model if none is set)")
    p.add_argument(
        "--prompt", default="a red cube on top of a blue sphere, studio light", help="what to draw"
    )
    p.add_argument("--out", default="demo-out", help="folder for the images and trajectory")
    p.set_defaults(func=run_demo)
