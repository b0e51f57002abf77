"""The benchmarks (bench/, run as `python bench/NAME.py`): each says what it measures, and the GPU
script's CPU modes run (its --dry-run proves the prepared BAGEL-7B-MoT script runs end to end on a
tiny model; without CUDA a real run refuses); the device check's dry run runs the GPU tests."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from testkit.paths import ROOT

GPU_BAGEL7B = [sys.executable, str(ROOT / "bench" / "gpu_bagel7b.py")]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_benchmark_script_opens_with_what_it_measures(script: str):
    docstring = ast.get_docstring(ast.parse((ROOT / "bench" / script).read_text()))
    assert docstring and docstring.strip(), f"bench/{script} has no module docstring"


def test_dry_run_writes_one_json_object(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [*GPU_BAGEL7B, "--dry-run", "--out", str(out)],
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
        [*GPU_BAGEL7B, "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def _gpu_check(tmp_path, tests: str):
    env = {
        **os.environ,
        "PY": sys.executable,
        "GPU_CHECK_TESTS": tests,
        "OUT": str(tmp_path),
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
    }
    return subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, timeout=420, env=env, cwd=ROOT
    )


def test_gpu_check_dry_run_runs_the_tests_the_attention_table_and_the_end_to_end_benchmark(tmp_path):
    """The device script's CPU form: its pytest call (GPU tests skip here), the attention table and
    the benchmark in every mode on a tiny model, with the JSON and the logs copied into $OUT as on
    the device machine."""
    proc = _gpu_check(
        tmp_path,
        "tests/model/generation/test_gpu.py"
        " tests/model/generation/test_gpu_path.py::test_length_buckets_sit_just_above_the_live_length",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check: PASSED" in proc.stdout
    table = json.loads((tmp_path / "attention_table.dry-run.json").read_text())
    assert {rule["kind"] for rule in table["rules"]} == {"image", "square", "prefill", "single"}
    result = json.loads((tmp_path / "gpu_e2e.dry-run.json").read_text())
    assert result["dry_run"] and not result["skipped"]
    rows = ("decode_1k", "decode_8k", "t2i_512_20", "t2i_1024", "iteration_1024")
    for mode in ("eager", "compiled", "fp8"):
        for row in rows:
            assert result["modes"][mode][row], (mode, row)
            assert result["summary"][row][mode] > 0
        assert result["modes"][mode]["iteration_1024"]["refined"]
    assert result["compiled_vs_eager"]["t2i_512_20_final_latent_relative_l2"] < 1e-3
    assert 0 < result["fp8_vs_eager"]["t2i_512_20_final_latent_relative_l2"] < 0.1
    assert (tmp_path / "gpu_tests.log").is_file() and (tmp_path / "attention_table.log").is_file()


def test_gpu_check_fails_loudly_when_a_test_fails(tmp_path):
    failing = tmp_path / "test_broken.py"
    failing.write_text("def test_broken():\n    assert 1 == 2\n")
    proc = _gpu_check(tmp_path, str(failing))
    assert proc.returncode != 0
    assert "GPU TESTS FAILED" in proc.stderr and "gpu_check: FAILED" in proc.stdout
