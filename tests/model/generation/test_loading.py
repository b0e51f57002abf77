"""Loading checks every key and shape, and fails with messages naming the file, key and shape."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit.paths import TINY

from strokes.model.generation.loading import load_engine, resolve_checkpoint
from strokes.model.network.config import CheckpointError


@pytest.fixture
def ckpt_copy(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def _rewrite(folder, change):
    path = folder / "ema.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_loads_straight_into_the_requested_dtype(ckpt_copy):
    engine = load_engine(ckpt_copy, dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in engine.model.parameters()} == {"cpu"}
    assert {p.dtype for p in engine.vae.parameters()} == {torch.float32}


def test_missing_tensor_is_named_with_its_expected_shape(ckpt_copy):
    _rewrite(ckpt_copy, lambda s: s.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight"))
    with pytest.raises(CheckpointError) as err:
        load_engine(ckpt_copy)
    msg = str(err.value)
    assert (
        "ema.safetensors" in msg
        and "language_model.model.layers.1.mlp_moe_gen.up_proj.weight [128, 64]" in msg
    )


def test_extra_tensor_is_rejected(ckpt_copy):
    _rewrite(
        ckpt_copy, lambda s: s.__setitem__("language_model.model.layers.2.mlp.up_proj.weight", torch.zeros(1))
    )
    with pytest.raises(
        CheckpointError, match=r"ema.safetensors: unexpected tensor\(s\) language_model.model.layers.2"
    ):
        load_engine(ckpt_copy)


def test_wrong_shape_is_named(ckpt_copy):
    _rewrite(ckpt_copy, lambda s: s.__setitem__("vae2llm.weight", torch.zeros(64, 32)))
    with pytest.raises(
        CheckpointError, match=r"tensor vae2llm.weight has shape \[64, 32\], expected \[64, 64\]"
    ):
        load_engine(ckpt_copy)


def test_missing_folder_and_partial_folder_get_clear_messages(tmp_path, ckpt_copy):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        resolve_checkpoint(tmp_path / "nope")
    (ckpt_copy / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete BAGEL checkpoint, missing ae.safetensors"):
        load_engine(ckpt_copy)


def test_config_mismatch_with_the_weights_is_reported(ckpt_copy):
    cfg = (
        (ckpt_copy / "llm_config.json")
        .read_text()
        .replace('"num_hidden_layers": 2', '"num_hidden_layers": 1')
    )
    (ckpt_copy / "llm_config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="configuration files do not match the weights"):
        load_engine(ckpt_copy)


def test_broken_json_names_the_file(ckpt_copy):
    (ckpt_copy / "vit_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vit_config.json: not valid JSON"):
        load_engine(ckpt_copy)


def test_hub_id_without_hub_support_or_network_says_so(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(CheckpointError, match=r"install strokes\[hub\]"):
        resolve_checkpoint("ByteDance-Seed/BAGEL-7B-MoT")


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        load_engine(TINY, device="cuda:0")
