"""The decoder's layers compiled with inductor (model/network/compiled.py) compute what the eager ones
do: within float32 rounding in float32, within the BF16.md bounds in bfloat16; their artifacts come
back from the on-disk cache. Few, tiny compiles: each costs seconds on a 2-core machine."""

from __future__ import annotations

import pytest
import torch
from testkit.paths import TINY

from strokes.model.generation.loading import load_engine
from strokes.model.network.compiled import CompileOptions
from strokes.model.spec.params import ImageSettings

# Importing inductor touches torch.jit.script_method, which this torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _run(engine) -> dict[str, torch.Tensor]:
    """A causal prefill (symbolic length), decode steps through the static decoder (T = 1) and a
    guided image (image blocks of a fixed size, batched branches): every region kind."""
    torch.set_num_threads(1)
    engine.static_decode = True
    cache, uncond = engine.new_cache(256), engine.new_cache(256)
    prefill = engine.append_ids(cache, list(range(5, 40))).float()
    engine.append_ids(uncond, list(range(5, 20)))
    dec = engine.decode_text(cache, max_tokens=3, commit=False)
    decode = torch.stack([s.logits.float() for s in dec if s.token >= 0])
    gen = engine.generate_image(
        cache,
        cache.snapshot(),
        uncond,
        height=32,
        width=32,
        settings=ImageSettings(steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)),
        generator=torch.Generator().manual_seed(0),
        trace=True,
    )
    velocities = torch.stack([s.v_cond.float() for s in gen])
    return {"prefill": prefill, "decode": decode, "velocity": velocities, "latent": gen.latent.float()}


def test_compiled_equals_eager_in_float32_and_comes_back_from_the_disk_cache(tmp_path):
    from torch._dynamo.utils import counters

    engine = load_engine(TINY, device="cpu", dtype="float32")
    eager = _run(engine)
    options = CompileOptions(cache_dir=str(tmp_path / "inductor"))
    engine.model.language_model.compile_regions(options)
    counters.clear()
    compiled = _run(engine)
    assert counters["stats"]["unique_graphs"] >= 3  # prefill, decode and image regions compiled
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-4, msg=name)

    torch._dynamo.reset()  # a restarted worker: nothing in memory, the artifacts on disk
    engine.model.language_model.compile_regions(options)
    counters.clear()
    again = _run(engine)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 3 and not counters["inductor"]["fxgraph_cache_miss"]
    for name, value in compiled.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


def test_compiled_bf16_stays_within_the_bf16_bounds_of_float32(tmp_path):
    """BF16.md: logits max 0.26 / mean 0.06, velocity max 0.6 / mean 0.08 (edit: three branches),
    final latent max 0.2 / mean 0.04."""
    reference = _run(load_engine(TINY, device="cpu", dtype="float32"))
    engine = load_engine(TINY, device="cpu", dtype="bfloat16")
    engine.model.language_model.compile_regions(CompileOptions(cache_dir=str(tmp_path / "inductor")))
    compiled = _run(engine)
    bounds = {"prefill": (0.26, 0.06), "decode": (0.26, 0.06), "velocity": (0.6, 0.08), "latent": (0.2, 0.04)}
    for name, (max_bound, mean_bound) in bounds.items():
        diff = (compiled[name] - reference[name]).abs()
        assert diff.max() <= max_bound and diff.mean() <= mean_bound, (name, diff.max(), diff.mean())
