"""The model-side `strokes` commands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from strokes.model.generation.loading import load_engine
from strokes.model.testing.tiny import make_tiny

STROKES = [sys.executable, "-m", "strokes.service.cli"]


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


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STROKES, "generate", *args], capture_output=True, text=True, timeout=300)


def test_generate_forks_a_saved_trajectory_with_an_edit(own_tiny, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "start.png")
    parent, child, same = tmp_path / "parent", tmp_path / "child", tmp_path / "same"
    common = ["--checkpoint", str(own_tiny), "--width", "64", "--height", "64", "--steps", "3"]
    out = _generate(*common, "--out", str(parent), "--max-iterations", "1", "--max-text-tokens", "5")
    assert out.returncode == 2 and "prompt" in out.stderr  # neither a prompt nor --fork
    out = _generate(
        *common, "--out", str(parent), "--max-iterations", "1", "--max-text-tokens", "5", "--seed", "4",
        "--image", str(tmp_path / "start.png"), "make it blue",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (parent / "input.png").is_file()
    fork = ["--checkpoint", str(own_tiny), "--fork", str(parent / "trajectory.json")]

    out = _generate(*fork, "--out", str(same), "--at", "1/plan")
    assert out.returncode == 0, out.stderr
    before = json.loads((parent / "trajectory.json").read_text())
    after = json.loads((same / "trajectory.json").read_text())
    keys = ("iteration", "stage", "text", "image", "rng", "rng_vae")
    assert [{k: s.get(k) for k in keys} for s in after["stages"]] == [
        {k: s.get(k) for k in keys} for s in before["stages"]
    ]
    for stage in before["stages"]:
        if "image" in stage:
            with (
                Image.open(parent / f"{stage['image']}.png") as a,
                Image.open(same / f"{stage['image']}.png") as b,
            ):
                assert a.tobytes() == b.tobytes()

    edit = "The intermediate step is correct. It is blue."
    out = _generate(*fork, "--out", str(child), "--at", "1/reflect", "--text", edit)
    assert out.returncode == 0, out.stderr
    assert "(from the parent)" in out.stdout
    edited = json.loads((child / "trajectory.json").read_text())
    assert [s["stage"] for s in edited["stages"]] == ["plan", "draft", "reflect"]
    assert edited["stages"][-1]["text"] == edit and edited["parent"]["stage"] == "reflect"
    assert edited["parent"]["replaced_text"] == before["stages"][2]["text"]

    for args, expected in [
        (["--at", "1/plan", "--text", "<|im_end|>"], "fork.text"),
        (["--at", "1/draft", "--text", "green"], "fork.text"),
        (["--at", "4/plan"], "fork.stage"),
        (["--at", "plan"], "--at"),
    ]:
        out = _generate(*fork, "--out", str(tmp_path / "bad"), *args)
        assert out.returncode == 2 and expected in out.stderr, (args, out.stderr)
