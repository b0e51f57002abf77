"""Tiny-model tests of the BAGEL modules: configuration, key layout, attention, KV cache, decoding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from testkit.paths import GOLDEN, TINY

from strokes.model.generation.loading import build_model, expected_tensors
from strokes.model.network.attention import attention_reference, attention_sdpa, causal_mask
from strokes.model.network.bagel import sincos_2d
from strokes.model.network.config import BagelConfig, LLMConfig, ViTConfig, load_config
from strokes.model.network.kv_cache import KVCache
from strokes.model.spec.budget import BAGEL_7B_MOT
from strokes.model.spec.params import ImageSettings

REAL = BagelConfig(
    llm=LLMConfig(
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        vocab_size=152064,
    ),
    vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16),
)


def test_config_applies_the_official_loader_overrides():
    cfg = load_config(TINY)
    assert json.loads((TINY / "vit_config.json").read_text())["num_hidden_layers"] == 3
    assert cfg.vit.num_layers == 2  # one ViT layer fewer than the JSON says
    assert (cfg.latent_patch_size, cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (2, 64, 70)
    assert cfg.llm.head_dim == 16 and cfg.vae.ch == 32 and cfg.vae.ch_mult == (1, 2, 2, 2)
    assert cfg.vae_transform.max_size == 128 and cfg.vit_transform.stride == 14
    assert cfg.latent_downsample == 16 and cfg.patch_latent_dim == 64


def test_full_size_model_has_exactly_the_official_keys_and_shapes():
    keys = json.loads((GOLDEN / "bagel7b_keys.json").read_text())
    model, vae = build_model(REAL)
    ours = expected_tensors(model)
    ref = {k: tuple(v) for k, v in keys["ema.safetensors"].items()}
    assert len(ref) == 1223
    assert set(ours) - set(ref) == set() and set(ref) - set(ours) == set()
    assert {k: s for k, s in ours.items() if s != ref[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == 14_607_260_128
    assert expected_tensors(vae) == {k: tuple(v) for k, v in keys["ae.safetensors"].items()}


def test_the_api_prices_requests_with_the_real_models_own_geometry():
    """The API holds no model: it prices for BAGEL-7B-MoT with a constant, which must be what the
    configuration derives (one formula, model/spec/budget.py, fed by BagelConfig.geometry)."""
    assert REAL.geometry == BAGEL_7B_MOT
    assert load_config(TINY).geometry == BAGEL_7B_MOT  # the golden tiny checkpoint keeps BAGEL's grid


def test_checkpoint_position_tables_are_the_sincos_formula():
    state = load_file(str(TINY / "ema.safetensors"))
    torch.testing.assert_close(state["latent_pos_embed.pos_embed"], sincos_2d(64, 64))
    torch.testing.assert_close(state["vit_pos_embed.pos_embed"], sincos_2d(64, 70))


@pytest.mark.parametrize(("tq", "tk", "causal"), [(5, 5, True), (3, 11, True), (1, 9, True), (4, 10, False)])
def test_sdpa_kernel_matches_the_reference_semantics(tq, tk, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, tq, 16, generator=g)
    k = torch.randn(2, 2, tk, 16, generator=g)
    v = torch.randn(2, 2, tk, 16, generator=g)
    torch.testing.assert_close(attention_sdpa(q, k, v, causal), attention_reference(q, k, v, causal))


def test_causal_mask_is_bottom_right_aligned():
    mask = causal_mask(2, 5, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_cache_appends_in_place_and_grows_by_doubling():
    cache = KVCache(2, 2, 4, capacity=8)
    storage = cache.k.data_ptr()
    for i in range(8):
        cache.reserve(1)
        cache.write(0, cache.length, torch.full((2, 1, 4), float(i)), torch.full((2, 1, 4), -float(i)))
        cache.advance(1, 1)
    assert cache.k.data_ptr() == storage  # no reallocation while capacity lasts
    cache.reserve(1)
    assert cache.capacity == 16
    assert cache.keys(0, 8)[0, :, 0].tolist() == [float(i) for i in range(8)]  # contents survive growth


def test_prefix_is_unchanged_by_later_appends_and_fork_is_independent():
    cache = KVCache(1, 1, 2, capacity=2)
    cache.reserve(2)
    cache.write(0, 0, torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    cache.advance(2, 2)
    prefix = cache.snapshot()
    copy = cache.fork()
    cache.reserve(3)
    cache.write(0, 2, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    cache.advance(3, 1)
    assert (prefix.length, prefix.rope) == (2, 2) and (cache.length, cache.rope) == (5, 3)
    copy.k.zero_()
    assert cache.keys(0, 2).sum() == 4


def test_cached_decoding_matches_recomputing_the_whole_sequence(engine):
    prompt = "Once upon a time there was a little robot who"
    cache = engine.new_cache()
    engine.append_text(cache, prompt)
    dec = engine.decode_text(cache, max_tokens=12, commit=False)
    steps = [s for s in dec if s.token >= 0]
    # Without a cache: prefill prompt + <|im_start|> + the tokens so far from scratch at every step.
    prefix = engine.tokenizer.segment(prompt) + [engine.tokenizer.bos_id]
    for i, step in enumerate(steps):
        fresh = engine.new_cache()
        logits = engine.append_ids(fresh, prefix + dec.ids[:i])
        torch.testing.assert_close(logits, step.logits, rtol=1e-4, atol=1e-4)
        assert int(logits.argmax()) == dec.ids[i]


def test_decoding_leaves_the_cache_as_it_found_it_unless_committed(engine):
    cache = engine.new_cache()
    engine.append_text(cache, "a red cube")
    before = (cache.length, cache.rope)
    list(engine.decode_text(cache, max_tokens=5, commit=False))
    assert (cache.length, cache.rope) == before
    dec = engine.decode_text(cache, max_tokens=5)
    list(dec)
    assert cache.length == before[0] + dec.prefilled and dec.next_logits is not None


def test_batched_and_sequential_guidance_branches_agree(engine):
    cond, img_uncond = engine.new_cache(), engine.new_cache()
    text_uncond = cond.snapshot()
    engine.append_text(cond, "a blue sphere")
    engine.append_text(img_uncond, "a blue sphere")
    settings = ImageSettings(steps=4, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    images = []
    for batch in (True, False):
        engine.batch_branches = batch
        noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
        gen = engine.generate_image(
            cond, text_uncond, img_uncond, height=64, width=64, settings=settings, noise=noise
        )
        list(gen)
        images.append(gen.latent)
    engine.batch_branches = True
    torch.testing.assert_close(images[0], images[1], rtol=1e-5, atol=1e-5)


def test_a_seed_draws_the_reference_noise_on_the_cpu_generator(engine):
    """The reference draws randn(h*w, 64) from the default CPU generator after manual_seed(42)."""
    recorded = load_file(str(GOLDEN / "cases" / "t3_t2i.safetensors"))["noise.0"]
    cond = engine.new_cache()
    gen = engine.generate_image(
        cond,
        cond.snapshot(),
        cond,
        height=64,
        width=64,
        settings=ImageSettings(steps=2),
        generator=torch.Generator().manual_seed(42),
    )
    assert torch.equal(gen.noise, recorded)


def test_bfloat16_path_runs_on_cpu():
    from strokes.model.generation.loading import load_engine

    bf16 = load_engine(TINY, device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16 and bf16.new_cache().k.dtype == torch.bfloat16
    cond, img = bf16.new_cache(), bf16.new_cache()
    bf16.append_text(cond, "a red cube")
    dec = bf16.decode_text(cond, max_tokens=4)
    assert len([s for s in dec if s.token >= 0]) <= 4
    gen = bf16.generate_image(
        cond,
        cond.snapshot(),
        img,
        height=64,
        width=48,
        settings=ImageSettings(steps=3),
        generator=torch.Generator().manual_seed(0),
    )
    list(gen)
    assert gen.pixels.shape == (64, 48, 3) and torch.isfinite(gen.latent).all()


def test_generation_rejects_sizes_off_the_latent_grid(engine):
    cond = engine.new_cache()
    with pytest.raises(ValueError, match="multiples of 16"):
        engine.generate_image(
            cond, cond.snapshot(), cond, height=60, width=64, settings=ImageSettings(steps=2)
        )
    with pytest.raises(ValueError, match="at most 1024"):
        engine.generate_image(
            cond, cond.snapshot(), cond, height=1040, width=64, settings=ImageSettings(steps=2)
        )


def test_static_shape_decode_matches_the_eager_decode(engine):
    """The CUDA-graph decode path (here without the graph) attends over the whole capacity behind a
    mask; it must pick the same tokens with the same logits as the eager path."""
    results = []
    for static in (False, True):
        engine.static_decode = static
        cache = engine.new_cache(capacity=24)  # small: the decode must grow the cache first
        engine.append_text(cache, "Once upon a time there was a little robot who")
        dec = engine.decode_text(cache, max_tokens=16, commit=False)
        results.append((dec.ids, torch.stack([s.logits for s in dec if s.token >= 0])))
    engine.static_decode = False
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
