"""LoRA: the adapters start from the base model, sit on the chosen expert's projections, and the
adapter the worker merges at load serves exactly what the adapted model computed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit.paths import TINY

from strokes.model.generation.adapters import CONFIG_FILE, merge_adapter
from strokes.model.generation.loading import load_engine
from strokes.model.network.config import CheckpointError
from strokes.model.testing.tiny_data import write_samples
from strokes.model.training.base import load_base
from strokes.model.training.data import TrainData, pack_config_of
from strokes.model.training.distributed import Dist
from strokes.model.training.export import export_adapter, gather_weights
from strokes.model.training.forward import ForwardOptions
from strokes.model.training.lora import LoRAConfig, LoRALinear, apply_lora
from strokes.model.training.plan import compile_sample
from strokes.model.training.samples import load_samples

CPU = Dist(0, 1, 0, torch.device("cpu"))
STROKES = [sys.executable, "-m", "strokes.service.cli"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    data = write_samples(tmp_path_factory.mktemp("data"), think=False)
    base = load_base(TINY)
    plans = [compile_sample(s, base.tokenizer.encode, base.special_tokens) for s in load_samples(data)]
    loader = TrainData(
        plans, base.cfg, pack_config_of(base.cfg, base.special_tokens, 0, 0, 0), max_tokens=2000, seed=0
    )
    return loader.load_pack(0, [0, 1])


def losses(model, vae, batch):
    with torch.no_grad():
        out = model(batch, vae, ForwardOptions())
    return out.ce, out.mse


def test_adapters_start_from_the_base_model_on_the_chosen_expert(batch):
    base = load_base(TINY)
    before = losses(base.model, base.vae, batch)
    names = apply_lora(base.model, LoRAConfig(rank=4, experts=("gen",), targets=("q_proj", "down_proj")))
    assert names == [
        f"language_model.model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj_moe_gen", "mlp_moe_gen.down_proj")
    ]
    attn = base.model.language_model.model.layers[0].self_attn
    assert isinstance(attn.q_proj_moe_gen, LoRALinear) and not isinstance(attn.q_proj, LoRALinear)
    trainable = {n for n, p in base.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    after = losses(base.model, base.vae, batch)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_the_merged_adapter_serves_what_the_adapted_model_computed(batch, tmp_path: Path):
    base = load_base(TINY)
    lora = LoRAConfig(rank=4, alpha=8.0, full=("llm2vae",))
    modules = apply_lora(base.model, lora, seed=1)
    with torch.no_grad():  # as if trained: every B and the velocity head away from their start
        for name, p in base.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    adapted = losses(base.model, base.vae, batch)
    out = export_adapter(
        tmp_path / "adapter", gather_weights(base.model, None, CPU), modules, lora, base.cfg, TINY
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["full_tensors"] == ["llm2vae.bias", "llm2vae.weight"] and len(config["modules"]) == 28

    served = load_base(TINY)  # a plain model: the adapter merged into its weights
    merge_adapter(served.model, served.cfg, out)
    merged = losses(served.model, served.vae, batch)
    assert torch.allclose(adapted[0], merged[0], atol=1e-5) and torch.allclose(
        adapted[1], merged[1], atol=1e-5
    )
    assert not torch.allclose(adapted[1], losses(load_base(TINY).model, served.vae, batch)[1])

    engine = load_engine(TINY, adapter=out)  # what `strokes worker --adapter` and `generate --adapter` do
    w = engine.model.language_model.model.layers[1].self_attn.v_proj.weight
    assert torch.equal(w, served.model.language_model.model.layers[1].self_attn.v_proj.weight)

    run = subprocess.run(
        [
            *STROKES,
            "generate",
            "a red square",
            "--checkpoint",
            str(TINY),
            "--adapter",
            str(out),
            "--device",
            "cpu",
        ]
        + [
            "--out",
            str(tmp_path / "gen"),
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--max-iterations",
            "1",
        ]
        + ["--max-text-tokens", "4", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "gen" / "trajectory.json").is_file()


def test_an_adapter_for_another_base_or_with_missing_tensors_is_refused(tmp_path: Path):
    base = load_base(TINY)
    lora = LoRAConfig(rank=2)
    modules = apply_lora(base.model, lora)
    out = export_adapter(tmp_path / "a", gather_weights(base.model, None, CPU), modules, lora, base.cfg, TINY)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["base"]["hidden_size"] = 3584
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"adapter_config.json: trained on another base model \(hidden_size 3584 vs 64\)",
    ):
        merge_adapter(load_base(TINY).model, base.cfg, out)
    config["base"]["hidden_size"] = 64
    config["modules"].append("language_model.model.layers.9.self_attn.q_proj")
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="adapter.safetensors: tensors do not match adapter_config.json"
    ):
        merge_adapter(load_base(TINY).model, base.cfg, out)
    with pytest.raises(CheckpointError, match="not a strokes adapter"):
        load_engine(TINY, adapter=tmp_path)
