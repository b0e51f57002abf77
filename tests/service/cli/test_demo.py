"""`make demo` end to end: `strokes demo` starts `strokes serve` (API, worker, a private
redis-server) on a tiny checkpoint, streams one generation and saves what it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def test_the_demo_streams_one_generation_and_saves_its_images_and_trajectory(tiny_checkpoint: Path, tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "OMP_NUM_THREADS": "1",
        "STROKES_CHECKPOINT": str(tiny_checkpoint),
        "STROKES_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "demo", "--out", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[job.completed]" in done.stdout and "saved" in done.stdout
    out = tmp_path / "out"
    job = json.loads((out / "job.json").read_text())
    trajectory = json.loads((out / "trajectory.json").read_text())
    assert job["status"] == "succeeded"
    assert [s["stage"] for s in trajectory["stages"]][:4] == ["plan", "draft", "reflect", "refine"]
    for image in job["images"]:
        assert _size(out / f"{image['id']}.png") == (image["width"], image["height"])
    assert (out / "final.png").read_bytes() == (out / f"{job['final_image']['id']}.png").read_bytes()


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size
