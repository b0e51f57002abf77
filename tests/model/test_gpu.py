"""CUDA checks (skipped without a GPU): the bf16 fast path agrees with the float32 CPU reference."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from model.loading import load_engine
from model.params import ImageSettings

pytestmark = pytest.mark.gpu


def _run(engine, noise):
    cond, img = engine.new_cache(), engine.new_cache()
    text_uncond = cond.snapshot()
    engine.append_text(cond, "a red cube on top of a blue sphere")
    engine.append_text(img, "a red cube on top of a blue sphere")
    dec = engine.decode_text(cond, max_tokens=6, commit=False)
    logits = [s.logits.float().cpu() for s in dec if s.token >= 0]
    gen = engine.generate_image(
        cond,
        text_uncond,
        img,
        height=64,
        width=64,
        noise=noise,
        trace=True,
        settings=ImageSettings(steps=6, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
    )
    velocities = [s.v_cond.float().cpu() for s in gen]
    return logits, velocities, gen.pixels


def test_bf16_cuda_agrees_with_float32_cpu():
    noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    cpu = _run(load_engine(TINY, device="cpu", dtype="float32"), noise)
    gpu = _run(load_engine(TINY, device="cuda:0"), noise)
    for a, b in zip(cpu[1], gpu[1], strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    cos = torch.nn.functional.cosine_similarity(cpu[0][0], gpu[0][0], dim=0)
    assert cos > 0.99
    assert abs(cpu[2].astype(int) - gpu[2].astype(int)).mean() < 8


def test_float32_cuda_matches_the_golden_cases():
    from conftest import GOLDEN

    from model.conformance import run_golden

    lines, ok = run_golden(GOLDEN, device="cuda:0")
    assert ok, "\n".join(lines)


def test_cuda_graph_decode_matches_eager_decode():
    engine = load_engine(TINY, device="cuda:0", dtype="float32")
    results = []
    for static in (False, True):
        engine.static_decode = static
        cache = engine.new_cache()
        engine.append_text(cache, "Once upon a time there was a little robot who")
        dec = engine.decode_text(cache, max_tokens=16, commit=False)
        results.append((dec.ids, torch.stack([s.logits.float().cpu() for s in dec if s.token >= 0])))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-3)
