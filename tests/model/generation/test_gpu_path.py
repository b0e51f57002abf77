"""The GPU path's code, checked on the CPU: the static decoder (the graphs' step, run eagerly) against
the eager decoder in float32 and bfloat16, float32 attention scores in bf16, grouped-query
attention without key copies, length buckets, decoder reuse across stages, caches sized once per
job, branch rooms (no per-step cache copies), and the device plumbing that needs no GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from testkit.decoding import STEPS, greedy
from testkit.paths import TINY

from strokes.model.generation.loading import load_engine, prepare_device
from strokes.model.generation.pipeline import Pipeline
from strokes.model.network.attention import attention_reference, attention_sdpa
from strokes.model.network.kv_cache import branch_rooms
from strokes.model.network.static_decode import MIN_BUCKET, length_bucket
from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings
from strokes.model.testing.greedy import compare_greedy


@pytest.mark.parametrize("kernel", ["mask", "flex"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_decoder_matches_eager_decoding(dtype, kernel):
    """Hundreds of steps, crossing two length buckets. float32: the same tokens, logits within
    float32 rounding. bfloat16 (other kernels, another rounding order): teacher-forced on eager's
    tokens, a different argmax only at a near tie and logits within BF16.md's bounds
    (model/testing/greedy.py; measured here: max ~0.125, mean ~0.003)."""
    torch.manual_seed(0)
    engine = load_engine(TINY, device="cpu", dtype=dtype)
    eager_ids, eager_logits, _ = greedy(engine, False, STEPS)
    feed = None if dtype == "float32" else eager_ids
    static_ids, static_logits, reached = greedy(engine, True, STEPS, kernel, feed)
    assert engine._decoder.kernel == kernel
    assert reached > MIN_BUCKET  # the decode moved to a second bucket on the way
    if dtype == "float32":
        assert static_ids == eager_ids
        assert (static_logits - eager_logits).abs().max() < 1e-4
    else:
        comparison = compare_greedy(eager_logits, static_logits)
        assert comparison.ok, comparison.summary()


def test_the_bf16_token_judge_still_fails_on_a_real_fault(monkeypatch):
    """A static decoder whose RoPE position is one off is caught in bf16 despite the near-tie rule."""
    import strokes.model.network.static_decode as static_decode

    engine = load_engine(TINY, device="cpu", dtype="bfloat16")
    eager_ids, eager_logits, _ = greedy(engine, False, 64)
    real = static_decode.rope_tables
    monkeypatch.setattr(static_decode, "rope_tables", lambda pos, *a: real(pos + 1, *a))
    _, broken_logits, _ = greedy(engine, True, 64, "mask", eager_ids)
    assert not compare_greedy(eager_logits, broken_logits).ok


def test_the_token_judge_allows_flips_only_at_near_ties():
    reference = torch.tensor([[5.0, 4.9, 0.0], [5.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    near_tie = reference + torch.tensor([[-0.06, 0.06, 0.0], [0.0] * 3, [0.0] * 3])
    assert compare_greedy(reference, near_tie).ok and compare_greedy(reference, near_tie).flips == [0]
    clear_gap = reference.clone()
    clear_gap[1] = torch.tensor([1.0, 5.0, 0.0])
    assert not compare_greedy(reference, clear_gap).ok
    drift = reference + 0.1  # every logit off by 0.1: the mean bound catches it
    assert not compare_greedy(reference, drift).ok


def test_bf16_attention_scores_and_softmax_are_float32():
    """Scores near 40 whose differences are about bf16's step there (0.25): a bf16 q @ k^T, even
    with a float32 softmax after it, is visibly off; every attention path here stays at the bf16
    rounding of its output."""
    g = torch.Generator().manual_seed(0)
    d, tk, s = 64, 96, 32.0
    unit = F.normalize(torch.randn(1, 2, 1, d, generator=g), dim=-1)  # (1, H=G=2, 1, D)
    q = s * unit
    k = (40 * math.sqrt(d) / s) * unit + (math.sqrt(d) / s) * torch.randn(1, 2, tk, d, generator=g)
    v = torch.randn(1, 2, tk, d, generator=g)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = attention_reference(qb.float(), kb.float(), vb.float(), causal=False)  # (1, 2, 1, D)
    naive_scores = (qb @ kb.transpose(-1, -2)).float() / math.sqrt(d)  # rounded to bf16 first
    naive = naive_scores.softmax(-1) @ vb.float()
    errors = {
        name: (out.float() - exact).abs().max().item()
        for name, out in (
            ("naive", naive),
            ("sdpa", attention_sdpa(qb, kb, vb, causal=False)),
            ("reference", attention_reference(qb, kb, vb, causal=False)),
        )
    }
    assert errors["naive"] > 4 * max(errors["sdpa"], errors["reference"]), errors
    assert errors["sdpa"] < 0.01 and errors["reference"] < 0.01, errors


@pytest.mark.parametrize("tq,tk", [(5, 12), (1, 9), (7, 7)])
def test_grouped_sdpa_matches_the_reference_without_repeating_keys(tq, tk, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, t, 16, generator=g) for h, t in ((8, tq), (2, tk), (2, tk)))
    calls = []
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **kw: calls.append(a))
    out = attention_sdpa(q, k, v, causal=True)
    monkeypatch.undo()
    assert not calls, "keys or values were repeated per query head"
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_length_buckets_sit_just_above_the_live_length():
    assert length_bucket(1, 10_000) == MIN_BUCKET
    assert length_bucket(MIN_BUCKET + 1, 10_000) == 2 * MIN_BUCKET
    assert length_bucket(300, 280) == 280  # never past the capacity
    for n in (1000, 4097, 8193, 30_000):
        b = length_bucket(n, 1 << 20)
        assert n <= b <= n + max(MIN_BUCKET, n // 8)
    assert len({length_bucket(n, 1 << 20) for n in range(1, 8193)}) <= 24  # few graphs per job


def test_one_static_decoder_and_its_arena_serve_every_stage_of_every_job(engine):
    """The decoder (its arena, and on GPU its graphs) is bound to no job's cache: a second stage and
    a second job reuse it as it is, decode what eager decoding decodes, and leave the job's cache
    as it was (the decoded text is committed by re-prefilling it, as the reference does)."""

    def stages(static: bool) -> list[str]:
        engine.static_decode = static
        texts = []
        for prompt in ("first job", "another job"):
            cache = engine.new_cache(capacity=512)
            for stage in ("plan", "reflect"):
                engine.append_text(cache, f"{prompt}: {stage}")
                before = (cache.length, cache.rope)
                list(engine.decode_text(cache, max_tokens=4, commit=False))
                assert (cache.length, cache.rope) == before
                texts.append(list(engine.decode_text(cache, max_tokens=6)))
        return ["".join(s.delta for s in steps) for steps in texts]

    try:
        eager = stages(False)
        engine._decoder = None
        static = stages(True)
        decoder = engine._decoder
        assert static == eager
        assert decoder.arena_allocations == 1  # four stages of two jobs, one arena
        again = stages(True)
        assert engine._decoder is decoder and decoder.arena_allocations == 1 and again == eager
    finally:
        engine.static_decode = False


def test_a_job_sizes_its_caches_once(engine, monkeypatch):
    """A two-iteration guided job with an input image never grows a cache mid-job."""
    import numpy as np

    made = []
    original = engine.new_cache

    def record(capacity=1024):
        made.append(original(capacity))
        return made[-1]

    monkeypatch.setattr(engine, "new_cache", record)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    params = GenerationParams(
        prompt="a red cube",
        width=64,
        height=48,
        max_iterations=2,
        seed=3,
        input_image=image,
        plan=TextSettings(max_tokens=24),
        reflect=TextSettings(max_tokens=24),
        draft=ImageSettings(steps=3),
        refine=ImageSettings(steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
    )
    events = list(Pipeline(engine).run(params))
    assert events[-1].usage["images"] >= 2
    assert len(made) == 2 and all(c.reallocations == 0 for c in made)
    assert made[0].length > 100  # the budget was really used, not trivially large


def test_branch_rooms_copy_only_a_prefix_that_shares_a_used_cache(engine):
    cond, img = engine.new_cache(capacity=64), engine.new_cache(capacity=64)
    engine.append_text(cond, "a blue sphere")
    text_uncond = cond.snapshot()
    engine.append_text(cond, "on a table")
    engine.append_text(img, "on a table")
    rooms = branch_rooms([cond, text_uncond, img], 20)
    assert rooms[0].cache is cond and rooms[2].cache is img  # written in their own spare room
    assert rooms[1].cache is not cond and rooms[1].length == text_uncond.length
    assert torch.equal(rooms[1].cache.k[:, :, : text_uncond.length], cond.k[:, :, : text_uncond.length])
    lengths = (cond.length, img.length)
    gen = engine.generate_image(
        cond,
        text_uncond,
        img,
        height=32,
        width=32,
        settings=ImageSettings(steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
        generator=torch.Generator().manual_seed(0),
    )
    list(gen)
    assert (cond.length, img.length) == lengths  # the blocks were scratch, never committed


def test_no_cache_sized_concatenation_during_denoising(engine, monkeypatch):
    cond, img = engine.new_cache(capacity=256), engine.new_cache(capacity=256)
    for _ in range(8):
        engine.append_text(cond, "a long context of many words to attend over")
    engine.append_text(img, "short")
    text_uncond = cond.snapshot()
    engine.append_text(cond, "and more")
    biggest = []
    real_cat = torch.cat

    def cat(tensors, *a, **kw):
        biggest.append(max(t.shape[-2] if t.dim() >= 2 else 0 for t in tensors))
        return real_cat(tensors, *a, **kw)

    monkeypatch.setattr(torch, "cat", cat)
    gen = engine.generate_image(
        cond,
        text_uncond,
        img,
        height=32,
        width=32,
        settings=ImageSettings(steps=4, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
        generator=torch.Generator().manual_seed(0),
    )
    list(gen)
    monkeypatch.undo()
    assert max(biggest) < cond.length  # only block-sized concatenations (markers, branch rows)


def test_prepare_device_and_cuda_checks_without_a_gpu():
    assert prepare_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        from strokes.model.network.config import CheckpointError

        with pytest.raises(CheckpointError, match="CUDA is not available"):
            prepare_device("cuda:1")


def test_gpu_memory_metrics_read_the_workers_own_devices(monkeypatch):
    """observe_gpu asks torch about each named CUDA device, not the current one."""
    from strokes.service.worker.metrics import WorkerMetrics

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: asked.append(d) or 10)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 20)
    m = WorkerMetrics()
    m.devices = ["cuda:1", "cuda:2"]
    m.observe_gpu()
    assert [str(d) for d in asked] == ["cuda:1", "cuda:2"]
    assert m.gpu_memory._value.get() == 20 and m.gpu_memory_peak._value.get() == 40
    asked.clear()
    m.devices = ["cpu"]
    m.observe_gpu()
    assert asked == []


def test_sdpa_kernels_keep_float32_reductions_for_bf16():
    """The setting that would let the math kernel reduce in bf16 stays off."""
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    q = torch.randn(1, 2, 3, 8).bfloat16()
    assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
