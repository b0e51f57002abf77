"""`strokes conformance` replays every golden case of the official BAGEL code within tolerance."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from testkit.paths import GOLDEN

from strokes.model.testing.conformance import run_golden


@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_all_golden_cases_pass_in_float32(attn):
    lines, ok = run_golden(GOLDEN, attn_impl=attn)
    assert ok, "\n".join(lines)
    names = {line.split()[1] for line in lines}
    assert names == {
        "t1_text_gen",
        "t2_understanding",
        "t3_t2i",
        "t4_edit",
        "t5_think_t2i",
        "t6_t2i_nonsquare",
        "loop_reuse",
    }
    assert all(line.startswith("PASS") for line in lines)


@pytest.fixture
def golden_copy(tmp_path):
    folder = tmp_path / "golden"
    shutil.copytree(GOLDEN, folder)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def test_command_exits_1_when_a_recorded_velocity_is_off(golden_copy):
    path = golden_copy / "cases" / "t3_t2i.safetensors"
    tensors = load_file(str(path))
    tensors["flow.2.v_cond"][0, 0] += 0.01
    save_file(tensors, str(path))
    out = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "conformance", str(golden_copy)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL t3_t2i" in out.stdout and "flow.2.v_cond" in out.stdout
    assert "PASS t4_edit" in out.stdout


def test_command_works_on_a_folder_with_other_cases(golden_copy):
    for path in (golden_copy / "cases").iterdir():
        if not path.name.startswith(("t4_edit", "loop_reuse")):
            path.unlink()
    (golden_copy / "cases" / "t4_edit.json").rename(golden_copy / "cases" / "my_edit.json")
    (golden_copy / "cases" / "t4_edit.safetensors").rename(golden_copy / "cases" / "my_edit.safetensors")
    out = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "conformance", str(golden_copy)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS my_edit" in out.stdout and "PASS loop_reuse" in out.stdout


def test_a_folder_without_cases_is_a_clear_error(tmp_path):
    (tmp_path / "cases").mkdir()
    with pytest.raises(FileNotFoundError, match="no golden cases"):
        run_golden(tmp_path)
