"""The training forward reproduces the golden training cases of the official BAGEL code
(tests/fixtures/golden/train: packing, draws, per-token losses, reduction, gradients, two AdamW
steps), and the replay notices when one of the official rules is broken."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit.paths import GOLDEN

from strokes.model.testing.train_conformance import run_train_case, run_train_golden
from strokes.model.training.base import load_base

TRAIN = GOLDEN / "train"
TINY = GOLDEN / "tiny_ckpt"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_golden_training_case_is_reproduced():
    lines, ok = run_train_golden(TRAIN, TINY)
    assert ok, "\n".join(lines)
    assert len(lines) == 4 and all(line.startswith("PASS") for line in lines)


def _replay_changed(tmp_path: Path, change) -> list[str]:
    case = json.loads((TRAIN / "tr2_interleaved.json").read_text())
    change(case)
    (tmp_path / "tr2.json").write_text(json.dumps(case))
    shutil.copy(TRAIN / "tr2_interleaved.safetensors", tmp_path / "tr2.safetensors")
    return run_train_case(load_base(TINY), tmp_path / "tr2.json").failures


def test_the_replay_fails_with_the_wrong_timestep_shift(tmp_path: Path):
    failures = _replay_changed(
        tmp_path, lambda case: case["config"].__setitem__("timestep_shift", 1.5)
    )  # recorded: 2
    assert any(f.startswith("out.loss") for f in failures), failures
    assert any(f.startswith("fwd.t_shifted") for f in failures), failures


def test_the_replay_fails_when_the_clean_draft_copy_is_taken_for_a_noisy_one(tmp_path: Path):
    def noisy_copy(case):  # plan item 3 is the clean copy of the draft; a noisy image draws a timestep
        case["samples"][0]["sequence_plan"][3]["loss"] = 1
        case["draws"].insert(3, {"rng": "numpy", "value": 0.0})

    failures = _replay_changed(tmp_path, noisy_copy)
    assert any(f.startswith("packed.packed_position_ids") for f in failures), failures
    assert any(f.startswith("packed.nested_attention_mask.0") for f in failures), failures


def test_strokes_conformance_replays_the_training_cases_too(tmp_path: Path):
    golden = tmp_path / "golden"
    shutil.copytree(GOLDEN, golden, ignore=shutil.ignore_patterns("cases"))
    (golden / "cases").mkdir()
    for name in ("t1_text_gen.json", "t1_text_gen.safetensors"):
        shutil.copy(GOLDEN / "cases" / name, golden / "cases" / name)
    out = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "conformance", str(golden)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in (
        "t1_text_gen",
        "train/tr1_t2i",
        "train/tr2_interleaved",
        "train/tr3_edit",
        "train/tr4_packed_two",
    ):
        assert f"PASS {name}" in out.stdout, out.stdout
