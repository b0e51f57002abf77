"""The GPU script's CPU modes (run with: .venv/bin/python -m pytest -q bench/test_gpu_dry_run.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu_bagel7b.py"


def test_dry_run_writes_one_json_object(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["dry_run"] and not result["skipped"]
    modes = {(r["size"], r["branches"], r["mode"]) for r in result["denoise"]}
    assert modes == {
        (s, b, m) for s in (64, 128) for b, m in ((3, "batched"), (3, "sequential"), (2, "batched"))
    }
    assert all(r["finite"] for r in result["denoise"])
    for key in (
        "prefill",
        "decode_short_context",
        "decode_long_context",
        "decode_overhead_probe",
        "estimates",
    ):
        assert result[key], key


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_exits_2_with_a_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
