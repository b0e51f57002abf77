"""FP8 weights on request (model/network/fp8.py): the row-wise float8 arithmetic, emulated on the CPU,
stays within its documented bounds on the golden cases; asking for it where it cannot run fails
before any weight is read, naming what can."""

from __future__ import annotations

import pytest
import torch
from testkit.paths import GOLDEN, TINY
from torch import nn

from strokes.model.generation.loading import load_engine
from strokes.model.network.config import CheckpointError
from strokes.model.network.fp8 import E4M3_MAX, Float8Linear, quantize_decoder, quantize_rows
from strokes.model.testing.conformance import run_golden


def test_rows_are_scaled_to_e4m3s_range_and_rounded_to_its_three_mantissa_bits():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6)[:, None]
    x8, scale = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.allclose(x8.float().abs().amax(-1), torch.full((6,), E4M3_MAX))  # each row's max maps to 448
    back = x8.float() * scale
    big = x.abs() > x.abs().amax(-1, keepdim=True) / 64  # e4m3's normal range below each row's max
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-12)[big].all()  # round-to-nearest, 3 mantissa bits


def test_the_float8_linear_computes_the_dequantized_product_plus_the_bias():
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen))
        linear.bias.copy_(torch.randn(32, generator=gen))
    fp8 = Float8Linear(linear, emulate=True)
    x = torch.randn(2, 5, 64, generator=gen)
    x8, xs = quantize_rows(x.reshape(-1, 64))
    w8, ws = quantize_rows(linear.weight)
    expected = (x8.float() * xs) @ (w8.float() * ws).t() + linear.bias
    torch.testing.assert_close(fp8(x), expected.view(2, 5, 32))
    exact = linear(x)
    assert ((fp8(x) - exact).norm() / exact.norm()).item() < 0.05  # a few percent, as e4m3 rounds


def test_every_decoder_linear_is_swapped_and_nothing_else(engine):
    model = load_engine(TINY, device="cpu", dtype="bfloat16").model
    lm = model.language_model
    names = set(lm.state_dict())
    swapped = quantize_decoder(lm, emulate=True)
    per_layer = 2 * (4 + 3)  # two experts: q, k, v, o and gate, up, down
    assert swapped == per_layer * lm.cfg.num_layers
    assert type(lm.lm_head) is nn.Linear and type(lm.model.embed_tokens) is nn.Embedding
    assert names <= set(lm.state_dict())  # the checkpoint's names are all still there


def test_fp8_is_refused_on_the_cpu_before_anything_loads():
    with pytest.raises(CheckpointError, match=r"compute capability 8\.9\+.*--weights bf16"):
        load_engine(TINY, device="cpu", weights="fp8")
    with pytest.raises(CheckpointError, match="weights must be one of bf16, fp8"):
        load_engine(TINY, device="cpu", weights="int4")


def test_emulated_fp8_passes_its_bounds_on_every_golden_case():
    torch.set_num_threads(1)
    lines, ok = run_golden(GOLDEN, dtype="bfloat16", emulate_fp8=True)
    assert ok, "\n".join(lines)


def test_the_worker_refuses_fp8_on_the_cpu_in_one_line():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", "worker", "--checkpoint", str(TINY), "--device", "cpu"]
        + ["--weights", "fp8"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "compute capability 8.9+" in output and "Traceback" not in output
