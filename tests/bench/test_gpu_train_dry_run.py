"""bench/gpu_train.py (one LoRA training step of the BAGEL-7B-MoT shape on one GPU) runs end to end
in its --dry-run form (the same code, the tiny shape, the CPU), and refuses to run without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit.paths import ROOT

SCRIPT = ROOT / "bench" / "gpu_train.py"


def test_the_dry_run_takes_finite_lora_steps_on_a_packed_trajectory_batch(tmp_path: Path):
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--steps", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["dry_run"] and result["finite"]
    assert len(result["step_s_all"]) == 2 and result["tokens_per_s"] > 0
    assert (
        result["pack"]["samples"] == 2
        and result["pack"]["mse_tokens"] > 0
        and result["pack"]["ce_tokens"] > 0
    )
    assert result["lora_parameters"] > 0
    assert result["losses"][-1] < result["losses"][0]  # the adapters learn


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_exits_2_with_a_message(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
