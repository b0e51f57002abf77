"""CUDA checks (skipped without a GPU): the bf16 fast path agrees with the float32 CPU reference."""

from __future__ import annotations

import pytest
import torch
from testkit.decoding import STEPS, greedy
from testkit.paths import GOLDEN, TINY

from strokes.model.generation.loading import load_engine
from strokes.model.spec.params import ImageSettings

# The skip is stated here too (not only by tests/conftest.py's `gpu` hook): bench/gpu_check.sh runs
# this file without that conftest.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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
    from strokes.model.testing.conformance import run_golden

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


@pytest.mark.parametrize("kernel", ["mask", "flex"])
def test_bf16_graph_decode_keeps_eagers_tokens_but_at_near_ties(kernel, tmp_path):
    """bf16 on CUDA, 300 steps, graphs per bucket vs eager decoding, judged as BF16.md allows
    (model/testing/greedy.py): teacher-forced on eager's tokens, a different argmax only at a near
    tie, logits within 0.26 / 0.06. "flex" runs the compiled flex kernels inside the graphs."""
    from strokes.model.network.compiled import CompileOptions
    from strokes.model.testing.greedy import compare_greedy

    engine = load_engine(TINY, device="cuda:0")
    eager_ids, eager_logits, _ = greedy(engine, False, STEPS)
    if kernel == "flex":
        engine.model.language_model.compile_regions(CompileOptions(cache_dir=str(tmp_path)))
    _, graph_logits, _ = greedy(engine, True, STEPS, kernel, feed=eager_ids)
    assert engine._decoder.kernel == kernel and engine._decoder.captures >= 2  # two buckets, one capture each
    comparison = compare_greedy(eager_logits.cpu(), graph_logits.cpu())
    assert comparison.ok, comparison.summary()


def test_graphs_are_reused_by_the_next_job():
    """A second job's decode replays the graphs the first captured (the decoder's own arena)."""
    engine = load_engine(TINY, device="cuda:0")
    engine.static_decode = True
    for job in range(2):
        cache = engine.new_cache()
        engine.append_text(cache, f"job {job}: once upon a time")
        list(engine.decode_text(cache, max_tokens=16, commit=False))
        if job == 0:
            decoder, captures = engine._decoder, engine._decoder.captures
    assert engine._decoder is decoder and decoder.captures == captures and decoder.arena_allocations == 1


def test_the_mask_free_prefill_runs_bottom_right_on_cuda():
    from strokes.model.network.attention import attention_reference, prefill_lower_right

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 28, 64, 128, generator=gen)
    k, v = (torch.randn(1, 4, 1024 + 64, 128, generator=gen) for _ in range(2))
    expected = attention_reference(q, k, v, causal=True)
    out = prefill_lower_right(*(t.cuda().bfloat16() for t in (q, k, v))).float().cpu()
    assert (out - expected).abs().max() < 0.05


def test_compiled_bf16_passes_the_bf16_golden_bounds(tmp_path):
    from strokes.model.network.compiled import CompileOptions
    from strokes.model.testing.conformance import run_case

    engine = load_engine(TINY, device="cuda:0", compile=CompileOptions(cache_dir=str(tmp_path)))
    for case in ("t1_text_gen", "t4_edit"):  # text, and a three-branch edit: few shapes to compile
        diffs = run_case(engine, GOLDEN / "cases" / f"{case}.json")
        assert not diffs.failures, (case, diffs.failures)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs FP8 tensor cores",
)
def test_fp8_weights_pass_their_golden_bounds_and_match_their_emulation():
    from strokes.model.network.fp8 import Float8Linear
    from strokes.model.testing.conformance import run_golden

    linear = torch.nn.Linear(256, 512, device="cuda:0", dtype=torch.bfloat16)
    x = torch.randn(3, 7, 256, device="cuda:0", dtype=torch.bfloat16)
    kernel, emulated = Float8Linear(linear, emulate=False), Float8Linear(linear, emulate=True)
    assert ((kernel(x).float() - emulated(x).float()).norm() / emulated(x).float().norm()) < 0.01
    lines, ok = run_golden(GOLDEN, device="cuda:0", dtype="bfloat16", weights="fp8")
    assert ok, "\n".join(lines)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_and_memory_live_on_a_non_default_device():
    """A worker on cuda:1 while the thread's current device is cuda:0: graphs still capture there."""
    engine = load_engine(TINY, device="cuda:1", dtype="float32")
    torch.cuda.set_device(0)
    results = []
    for static in (False, True):
        engine.static_decode = static
        cache = engine.new_cache()
        engine.append_text(cache, "Once upon a time there was a little robot who")
        dec = engine.decode_text(cache, max_tokens=16, commit=False)
        results.append((dec.ids, torch.stack([s.logits.float().cpu() for s in dec if s.token >= 0])))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-3)
    assert torch.cuda.memory_allocated(1) > 0


def test_bf16_cuda_passes_the_bf16_golden_bounds():
    from strokes.model.testing.conformance import run_golden

    lines, ok = run_golden(GOLDEN, device="cuda:0", dtype="bfloat16")
    assert ok, "\n".join(lines)


def test_denoising_steps_never_wait_for_the_gpu():
    """After the first step (which copies the noise and the schedule once), a step issues its work
    and returns without a host synchronisation (torch's sync debug mode raises on one)."""
    engine = load_engine(TINY, device="cuda:0")
    cond, img = engine.new_cache(), engine.new_cache()
    text_uncond = cond.snapshot()
    engine.append_text(cond, "a red cube on top of a blue sphere")
    engine.append_text(img, "a red cube on top of a blue sphere")
    gen = engine.generate_image(
        cond,
        text_uncond,
        img,
        height=64,
        width=64,
        settings=ImageSettings(steps=8, cfg_img_scale=2.0, cfg_interval=(0.3, 1.0)),
        generator=torch.Generator().manual_seed(0),
    )
    steps = iter(gen)
    next(steps)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            next(steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert next(steps, None) is None and gen.pixels is not None
