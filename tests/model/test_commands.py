"""The model-side `strokes` commands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from model.loading import load_engine
from model.tiny import make_tiny

STROKES = [sys.executable, "-m", "service.cli"]


def test_make_tiny_writes_the_official_layout_and_is_deterministic(tmp_path):
    out = subprocess.run(
        [*STROKES, "make-tiny", str(tmp_path / "a"), "--seed", "5"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {
        "ema.safetensors",
        "ae.safetensors",
        "llm_config.json",
        "vit_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    make_tiny(tmp_path / "b", seed=5)
    for name in ("ema.safetensors", "ae.safetensors", "vocab.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    engine = load_engine(tmp_path / "a")
    assert engine.cfg.vit.num_layers == 2 and len(engine.tokenizer) <= engine.cfg.llm.vocab_size


def test_make_tiny_accepts_sizes(tmp_path):
    out = subprocess.run(
        [
            *STROKES,
            "make-tiny",
            str(tmp_path),
            "--hidden",
            "96",
            "--layers",
            "3",
            "--heads",
            "6",
            "--kv-heads",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    cfg = load_engine(tmp_path).cfg.llm
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (96, 3, 6, 3)


def test_generate_writes_images_and_trajectory(own_tiny, tmp_path):
    out = subprocess.run(
        [
            *STROKES,
            "generate",
            "--checkpoint",
            str(own_tiny),
            "--out",
            str(tmp_path),
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "4",
            "--max-iterations",
            "1",
            "--max-text-tokens",
            "6",
            "--seed",
            "1",
            "a red cube",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "[iteration 1] plan:" in out.stdout and "final image:" in out.stdout
    trajectory = json.loads((tmp_path / "trajectory.json").read_text())
    assert [s["stage"] for s in trajectory["stages"]] == ["plan", "draft", "reflect", "refine"]
    for stage in trajectory["stages"]:
        if "image" in stage:
            with Image.open(tmp_path / f"{stage['image']}.png") as image:
                assert image.size == (64, 48)
    assert (tmp_path / f"{trajectory['final_image']}.png").is_file()  # files are the image id + .png


def test_generate_rejects_bad_parameters_with_a_clear_error(own_tiny, tmp_path):
    out = subprocess.run(
        [
            *STROKES,
            "generate",
            "--checkpoint",
            str(own_tiny),
            "--out",
            str(tmp_path),
            "--width",
            "70",
            "a red cube",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "width: must be a multiple of 16" in out.stderr


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nope"
    for args, expected in [
        (["generate", "--checkpoint", str(missing), "x"], "checkpoint folder not found"),
        (["generate", "--checkpoint", str(missing), "--width", "33", "x"], "width"),
        (["conformance", str(tmp_path)], "no golden cases"),
    ]:
        out = subprocess.run([*STROKES, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and expected in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith(f"strokes {args[0]}: error: ")
