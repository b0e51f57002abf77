"""`strokes train`: a killed run resumes where it stopped and ends where an uninterrupted one ends;
bad data, a missing checkpoint and a resume that does not match fail at once with a clear message;
the schedule, the EMA and the log."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testkit.paths import ROOT

from strokes.model.generation.loading import load_engine
from strokes.model.testing.tiny_data import write_samples
from strokes.model.training.checkpoint import ResumeError
from strokes.model.training.config import TrainConfig
from strokes.model.training.optim import EMA, OptimConfig, lr_at
from strokes.model.training.trainer import train

TINY = ROOT / "tests" / "fixtures" / "golden" / "tiny_ckpt"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_samples(tmp_path_factory.mktemp("data"), think=False)


def config(data: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        data=str(data),
        checkpoint=str(TINY),
        out=str(out),
        mode="full",
        steps=30,
        lr=1e-3,
        warmup_steps=3,
        max_tokens=400,  # one sample per pack: an epoch is two steps
        text_dropout=0.2,
        vit_dropout=0.2,
        vae_dropout=0.2,
        precision="fp32",
        activation_checkpointing=False,
        save_every=3,
        log_every=1,
        num_workers=0,
        device="cpu",
    )
    return replace(base, **changes)


def flags(cfg: TrainConfig) -> list[str]:
    out = []
    for name in ("data", "checkpoint", "out", "mode", "steps", "lr", "warmup_steps", "max_tokens"):
        out += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    for name in ("text_dropout", "vit_dropout", "vae_dropout", "precision", "save_every", "log_every"):
        out += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    return [*out, "--num-workers", "0", "--device", "cpu", "--no-activation-checkpointing"]


def strokes(*args: str) -> list[str]:
    return [sys.executable, "-m", "strokes.service.cli", *args]


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(dataset: Path, tmp_path: Path):
    whole = train(config(dataset, tmp_path / "whole"))
    assert whole.steps == 30 and whole.export is not None
    assert load_engine(whole.export).cfg.llm.hidden_size == 64  # the official layout, as a worker loads it

    killed = config(dataset, tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen(
            strokes("train", *flags(killed)), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        latest = tmp_path / "killed" / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    output = (tmp_path / "killed.log").read_text()
    assert latest.is_file(), output
    saved = int(latest.read_text().strip().split("_")[1])
    logged = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert 3 <= saved <= max(logged) < 30, (saved, logged)  # killed mid-run, after a save

    resumed = train(killed)  # resume="auto": from the run folder's latest checkpoint
    assert resumed.steps == 30
    records = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    after = [r["step"] for r in records[len(logged) :]]
    assert after == list(range(saved + 1, 31))  # at most the steps since the last save were redone
    ours = load_file(str(resumed.export / "ema.safetensors"))
    ref = load_file(str(whole.export / "ema.safetensors"))
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, worst
    for r in records[len(logged) :]:
        same = next(
            x
            for x in (
                json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
            )
            if x["step"] == r["step"]
        )
        assert math.isclose(r["loss"], same["loss"], rel_tol=1e-5)


def test_bad_data_fails_at_once_naming_the_sample_and_the_field(dataset: Path, tmp_path: Path):
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    rows[1]["segments"][2]["image"] = "images/nope.png"
    bad = dataset.parent / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        strokes("train", *flags(config(bad, tmp_path / "run"))),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert f"bad.jsonl:2: sample '{rows[1]['id']}', segments[2].image: file not found" in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_missing_checkpoint_or_resume_point_fails_at_once(dataset: Path, tmp_path: Path):
    cfg = config(dataset, tmp_path / "run", checkpoint=str(tmp_path / "nowhere"))
    proc = subprocess.run(
        strokes("train", *flags(cfg)), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 2 and "nowhere: checkpoint folder not found" in proc.stderr, proc.stderr
    with pytest.raises(ResumeError, match="step_9: checkpoint folder not found"):
        train(config(dataset, tmp_path / "run", resume=str(tmp_path / "step_9")))


def test_a_resume_that_does_not_match_fails_naming_what_differs(dataset: Path, tmp_path: Path):
    train(config(dataset, tmp_path / "run", steps=3))
    with pytest.raises(ResumeError, match=r"seed: checkpoint 42, this run 7"):
        train(config(dataset, tmp_path / "run", steps=6, seed=7))
    with pytest.raises(ResumeError, match=r"mode: checkpoint 'full', this run 'lora'"):
        train(config(dataset, tmp_path / "run", steps=6, mode="lora"))


def test_the_log_has_a_record_per_step_with_the_metrics(dataset: Path, tmp_path: Path, capsys):
    result = train(config(dataset, tmp_path / "run", steps=4, accumulation=2, ema=0.9, num_workers=2))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for key in ("loss", "ce", "mse", "grad_norm", "lr", "tokens_per_s", "peak_memory_gb", "epoch"):
        assert last[key] is not None and last[key] == last[key], key
    assert set(last["loss_per_kind"]) == {"multi_turn", "conflict"}
    assert math.isclose(last["loss"], last["ce"] + last["mse"], rel_tol=1e-6)
    assert result.last == last
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "tok/s" in printed


def test_the_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    constant = OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert [lr_at(s, constant) for s in range(4)] == [0.0, 5e-4, 1e-3, 1e-3]


def test_the_ema_follows_the_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([("w", p)])
    ema.update([("w", p)])
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - 0.9**2))


def test_lora_in_bf16_with_float32_adapters_trains_and_exports_an_adapter(dataset: Path, tmp_path: Path):
    result = train(config(dataset, tmp_path / "run", mode="lora", precision="bf16", steps=2, lr=1e-2))
    assert result.export.name == "adapter"
    adapter = load_file(str(result.export / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())  # the trained weights: float32
    assert any(k.endswith("lora_B") and t.abs().max() > 0 for k, t in adapter.items())  # B moved from 0
    engine = load_engine(TINY, dtype="bfloat16", adapter=result.export)  # the base stays bf16, merged
    assert engine.dtype == torch.bfloat16


def test_train_export_turns_a_lora_run_into_an_official_checkpoint(dataset: Path, tmp_path: Path):
    result = train(config(dataset, tmp_path / "run", mode="lora", steps=2, lr=1e-2, export="none"))
    assert result.export is None
    for kind in ("adapter", "checkpoint"):
        proc = subprocess.run(
            strokes("train-export", str(tmp_path / "run"), "--as", kind, "--out", str(tmp_path / kind)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
    merged = load_engine(tmp_path / "checkpoint").model.state_dict()
    served = load_engine(TINY, adapter=tmp_path / "adapter").model.state_dict()
    assert max((merged[k] - served[k]).abs().max().item() for k in merged) < 1e-6
    proc = subprocess.run(
        strokes("train-export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "not a training run folder" in proc.stderr
