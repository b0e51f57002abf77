"""model/network/transforms.py against BAGEL.md 5.6 and the official run in tests/fixtures/golden."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from testkit.paths import GOLDEN

from strokes.model.network.transforms import (
    VAE_TRANSFORM,
    VIT_TRANSFORM,
    ImageTransform,
    latent_position_ids,
    pack_latent,
    patchify_vit,
    to_uint8,
    unpack_latent,
    vit_position_ids,
)
from strokes.model.spec.sizing import DEFAULT_MAX_PIXELS, resize_size, to_rgb

INFO = json.loads((GOLDEN / "tiny_ckpt" / "tiny_bagel_info.json").read_text())
TINY_VAE = ImageTransform(*INFO["vae_transform"])  # (128, 64, 16)
TINY_VIT = ImageTransform(*INFO["vit_transform"])  # (112, 56, 14)
VIT_MAX_PER_SIDE = INFO["bagel_config"]["vit_max_num_patch_per_side"]
MAX_LATENT = INFO["bagel_config"]["max_latent_size"]


@cache
def case(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "cases" / f"{name}.safetensors")


def test_real_transforms():
    assert (VAE_TRANSFORM.max_size, VAE_TRANSFORM.min_size, VAE_TRANSFORM.stride) == (1024, 512, 16)
    assert (VIT_TRANSFORM.max_size, VIT_TRANSFORM.min_size, VIT_TRANSFORM.stride) == (980, 224, 14)
    # The official ImageTransform defaults max_pixels to 14*14*9*1024 and neither call site overrides it.
    assert VAE_TRANSFORM.max_pixels == VIT_TRANSFORM.max_pixels == DEFAULT_MAX_PIXELS == 1_806_336
    assert ImageTransform(980, 224, 14) == VIT_TRANSFORM


# BAGEL.md 5.6: input -> VAE size -> ViT size (the ViT transform sees the VAE-resized image).
@pytest.mark.parametrize(
    ("size", "vae_size", "vit_size"),
    [
        ((1024, 1024), (1024, 1024), (980, 980)),
        ((1024, 768), (1024, 768), (980, 728)),  # 735/14 = 52.5 rounds half to even: 52
        ((640, 480), (688, 512), (686, 518)),
        ((1920, 1080), (1024, 576), (980, 546)),
        ((300, 200), (768, 512), (770, 518)),
    ],
)
def test_resize_size_example_table(size, vae_size, vit_size):
    assert VAE_TRANSFORM.size(*size) == vae_size
    assert VIT_TRANSFORM.size(*vae_size) == vit_size
    assert resize_size(*size, 1024, 512, 16, 14 * 14 * 9 * 1024) == vae_size
    assert resize_size(*vae_size, 980, 224, 14) == vit_size


def test_resize_size_max_pixels_uses_the_area_ratio_as_a_linear_scale():
    # 1024x1024 over a 512*512 budget: the reference scales each side by 1/4 (not 1/2).
    assert resize_size(1024, 1024, 1024, 16, 16, max_pixels=512 * 512) == (256, 256)
    assert resize_size(1024, 1024, 1024, 16, 16, max_pixels=None) == (1024, 1024)


def test_resize_size_long_edge_clamp_may_break_the_min_side():
    # Upscaled to a 512 short side, clamped by max_pixels, then by the long edge: the short side ends at 32.
    assert VAE_TRANSFORM.size(4000, 100) == (1024, 32)


def test_resize_size_never_below_stride():
    assert resize_size(5000, 10, 1024, 16, 16) == (1024, 16)


@pytest.mark.parametrize(
    ("name", "prefix", "vae_step", "vit_step", "vit_shape"),
    [
        ("t4_edit", "", 0, 1, (70, 98)),
        ("loop_reuse", "s4_append_draft.", 0, 1, (70, 70)),
        ("t2_understanding", "", None, 0, (70, 70)),
    ],
)
def test_image_inputs_match_the_recorded_packing(name, prefix, vae_step, vit_step, vit_shape):
    t = case(name)
    img = TINY_VAE.resize(to_rgb(Image.fromarray(t[f"{prefix}input.image_uint8"].numpy())))
    if vae_step is not None:
        k = f"{prefix}prep.{vae_step}.prepare_vae_images."
        x = TINY_VAE(img)
        torch.testing.assert_close(x, t[f"{k}padded_images"][0], rtol=0, atol=1e-6)
        H, W = x.shape[1:]
        assert torch.equal(
            latent_position_ids(H // 16, W // 16, MAX_LATENT), t[f"{k}packed_vae_position_ids"]
        )
    # The ViT transform resizes the VAE-sized image again (64 -> 70 here, bicubic).
    k = f"{prefix}prep.{vit_step}.prepare_vit_images."
    y = TINY_VIT(img)
    assert y.shape == (3, *vit_shape) and y.dtype == torch.float32
    tokens = patchify_vit(y, 14)
    torch.testing.assert_close(tokens, t[f"{k}packed_vit_tokens"], rtol=0, atol=1e-6)
    h, w = vit_shape[0] // 14, vit_shape[1] // 14
    assert torch.equal(vit_position_ids(h, w, VIT_MAX_PER_SIDE), t[f"{k}packed_vit_position_ids"])


def test_to_tensor_range_and_order():
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[0, 1] = (255, 0, 128)
    x = ImageTransform.to_tensor(Image.fromarray(a))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[:, 0, 1].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
    assert x[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]


def test_patchify_vit_order():
    x = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    tokens = patchify_vit(x, 2)  # grid 2 x 3
    assert tokens.shape == (6, 12)
    row, col = 1, 2
    for py in range(2):
        for px in range(2):
            for c in range(3):
                assert tokens[row * 3 + col, (py * 2 + px) * 3 + c] == x[c, row * 2 + py, col * 2 + px]
    assert vit_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]


@pytest.mark.parametrize(
    ("name", "prefix", "key", "h", "w"),
    [
        ("t3_t2i", "", "vae.0", 4, 4),
        ("t6_t2i_nonsquare", "", "vae.0", 3, 5),
        ("t4_edit", "", "vae.1", 4, 6),
        ("loop_reuse", "s6_refine.", "s6_refine.vae.0", 4, 4),
    ],
)
def test_latent_unpack_and_pack_match_the_reference(name, prefix, key, h, w):
    t = case(name)
    packed = t[f"{prefix}gen.final_latent_packed.0"]
    z = unpack_latent(packed, h, w)
    assert torch.equal(z, t[f"{key}.decode_in"])
    assert torch.equal(pack_latent(z[0]), packed)


def test_latent_positions_of_a_nonsquare_generation():
    t = case("t6_t2i_nonsquare")
    assert torch.equal(
        latent_position_ids(3, 5, MAX_LATENT), t["prep.2.prepare_vae_latent.packed_vae_position_ids"]
    )
    assert latent_position_ids(3, 5, 64).dtype == torch.long


def test_pack_latent_index_layout():
    z = torch.randn(16, 6, 10)
    tokens = pack_latent(z)
    assert tokens.shape == (15, 64)
    row, col, py, px, c = 2, 3, 1, 0, 5
    assert tokens[row * 5 + col, (py * 2 + px) * 16 + c] == z[c, row * 2 + py, col * 2 + px]


@pytest.mark.parametrize(
    ("name", "key", "out"),
    [("t3_t2i", "vae.0", "output"), ("t6_t2i_nonsquare", "vae.0", "output"), ("t4_edit", "vae.1", "output")],
)
def test_to_uint8_reproduces_the_recorded_images(name, key, out):
    t = case(name)
    assert np.array_equal(to_uint8(t[f"{key}.decode_out"]), t[f"{out}.image_uint8"].numpy())


def test_to_uint8_truncates():
    x = torch.tensor([0.999, -1.5, 1.5, 2 * (100.9 / 255) - 1]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    img = to_uint8(x)
    assert img.shape == (1, 4, 3) and img.dtype == np.uint8
    assert img[0, :, 0].tolist() == [254, 0, 255, 100]


def test_to_rgb_composites_transparency_on_white():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[..., 0] = 200
    a[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = to_rgb(Image.fromarray(a, mode="RGBA"))
    assert out.mode == "RGB"
    px = np.asarray(out)
    assert (px[:2] == (200, 0, 0)).all()
    assert (px[2:] == 255).all()


def test_to_rgb_palette_transparency_and_plain_images():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    grey = Image.new("L", (2, 2), 77)
    assert np.asarray(to_rgb(grey)).tolist() == [[[77] * 3] * 2] * 2
