"""The bfloat16 path against the float32 golden cases, within the documented bf16 bounds
(model/testing/conformance.py BF16_TOLERANCE, docs/gpu.md): the CPU stand-in for what a GPU runs."""

from __future__ import annotations

import pytest
import torch
from testkit.paths import GOLDEN, TINY

import strokes.model.network.decoder as decoder_module
from strokes.model.generation.loading import load_engine
from strokes.model.testing.conformance import run_case, run_golden


@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_every_golden_case_passes_the_bf16_bounds(attn):
    torch.set_num_threads(1)
    lines, ok = run_golden(GOLDEN, attn_impl=attn, dtype="bfloat16")
    assert ok, "\n".join(lines)
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines)


def test_the_bf16_bounds_catch_an_order_one_error(monkeypatch):
    """A RoPE base off by 100x (a plausible porting slip) passes nowhere near the bounds."""
    torch.set_num_threads(1)
    engine = load_engine(TINY, device="cpu", dtype="bfloat16")
    real = decoder_module.rope_tables
    monkeypatch.setattr(decoder_module, "rope_tables", lambda p, d, theta, dt: real(p, d, theta / 100, dt))
    for case in ("t1_text_gen", "t3_t2i"):
        diffs = run_case(engine, GOLDEN / "cases" / f"{case}.json")
        assert diffs.failures, case
