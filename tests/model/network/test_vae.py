"""model/network/vae.py against the official BAGEL run recorded in tests/fixtures/golden (tiny FLUX
AE, float32)."""

from __future__ import annotations

import dataclasses
import json
from functools import cache

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testkit.paths import GOLDEN

from strokes.model.network.transforms import to_uint8, unpack_latent
from strokes.model.network.vae import AutoEncoder, VAEConfig

CKPT = GOLDEN / "tiny_ckpt"


@cache
def case(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "cases" / f"{name}.safetensors")


def tiny_config() -> VAEConfig:
    p = json.loads((CKPT / "tiny_bagel_info.json").read_text())["vae_params"]
    return dataclasses.replace(
        VAEConfig(), ch=p["ch"], ch_mult=tuple(p["ch_mult"]), num_res_blocks=p["num_res_blocks"]
    )


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    model = AutoEncoder(tiny_config()).eval()
    model.load_state_dict(load_file(CKPT / "ae.safetensors"), strict=True)
    return model


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    diff = (got - ref).abs().max().item()
    bound = 1e-4 * max(1.0, ref.abs().max().item())
    assert diff < bound, f"max abs diff {diff:.3g} over {bound:.3g}"


def test_config_defaults_are_flux():
    cfg = VAEConfig()
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert (cfg.scale_factor, cfg.shift_factor, cfg.downsample) == (0.3611, 0.1159, 8)


def test_tiny_checkpoint_keys_match_exactly():
    sd = load_file(CKPT / "ae.safetensors")
    model = AutoEncoder(tiny_config())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }


def test_real_size_model_has_the_real_keys_and_shapes():
    with torch.device("meta"):
        model = AutoEncoder(VAEConfig())
    expected = json.loads((GOLDEN / "bagel7b_keys.json").read_text())["ae.safetensors"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 83_819_683


@pytest.mark.parametrize(("name", "prefix"), [("t4_edit", ""), ("loop_reuse", "s4_append_draft.")])
def test_encode_samples_the_posterior_with_the_recorded_noise(ae, name, prefix):
    t = case(name)
    x = t[f"{prefix}vae.0.encode_in"]
    with torch.no_grad():
        mean, logvar = ae.encode_moments(x)
        assert_close(torch.cat([mean, logvar], dim=1), t[f"{prefix}vae.0.encoder_moments"])
        assert_close(ae.encode(x, t[f"{prefix}noise.0"]), t[f"{prefix}vae.0.encode_out"])
        # Without noise the posterior mean is taken, then the same scale and shift.
        z_mean = ae.encode(x, None)
    torch.testing.assert_close(z_mean, 0.3611 * (mean - 0.1159), rtol=0, atol=0)


def test_encode_rejects_noise_of_the_wrong_shape(ae):
    x = case("t4_edit")["vae.0.encode_in"]
    with pytest.raises(ValueError, match="posterior noise"), torch.no_grad():
        ae.encode(x, torch.zeros(1, 16, 12, 8))


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("t3_t2i", "vae.0"),
        ("t4_edit", "vae.1"),
        ("t6_t2i_nonsquare", "vae.0"),
        ("loop_reuse", "s3_draft.vae.0"),
        ("loop_reuse", "s6_refine.vae.0"),
    ],
)
def test_decode_matches(ae, name, key):
    t = case(name)
    with torch.no_grad():
        assert_close(ae.decode(t[f"{key}.decode_in"]), t[f"{key}.decode_out"])


@pytest.mark.parametrize(
    ("name", "prefix", "height", "width"),
    [
        ("t3_t2i", "", 64, 64),
        ("t6_t2i_nonsquare", "", 48, 80),
        ("t4_edit", "", 64, 96),
        ("loop_reuse", "s3_draft.", 64, 64),
        ("loop_reuse", "s6_refine.", 64, 64),
    ],
)
def test_final_latent_to_output_image(ae, name, prefix, height, width):
    t = case(name)
    z = unpack_latent(t[f"{prefix}gen.final_latent_packed.0"], height // 16, width // 16)
    with torch.no_grad():
        img = to_uint8(ae.decode(z))
    ref = t[f"{prefix}output.image_uint8"].numpy()
    assert img.shape == ref.shape == (height, width, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_bfloat16_decode_and_encode_run_on_cpu(ae):
    model = AutoEncoder(tiny_config()).eval()
    model.load_state_dict(ae.state_dict())
    model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 6, 10, generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        x = model.decode(z)
        assert x.shape == (1, 3, 48, 80) and x.dtype == torch.bfloat16
        assert torch.isfinite(x).all()
        z2 = model.encode(x.clamp(-1, 1), torch.randn(1, 16, 6, 10, generator=g))
    assert z2.shape == (1, 16, 6, 10) and z2.dtype == torch.bfloat16
    assert torch.isfinite(z2).all()
    assert to_uint8(x).shape == (48, 80, 3)
