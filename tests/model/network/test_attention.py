"""The mask-free attention paths (model/network/attention.py) compute the reference's attention: the
bottom-right causal prefill after a cache, flex decoding over a length bucket with a live-block count
read at run time; and the per-shape backend table parses, validates and picks as documented."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from strokes.model.network.attention import (
    DECODE_BLOCK,
    TABLE_PATH,
    attention_reference,
    decode_block_mask,
    decode_flex,
    parse_table,
    prefill_folded,
    prefill_lower_right,
    shape_kind,
)


def _qkv(h, g, tq, tk, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, tq, d, generator=gen)
    k, v = (torch.randn(1, g, tk, d, generator=gen) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("h,g,tq,tk", [(8, 2, 5, 37), (4, 4, 9, 9), (8, 2, 1, 20)])
def test_the_mask_free_causal_prefill_is_the_references_bottom_right_attention(h, g, tq, tk):
    q, k, v = _qkv(h, g, tq, tk)
    expected = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(prefill_lower_right(q, k, v), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill_folded(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_decoding_over_a_bucket_reads_only_the_live_slots(dtype):
    """One block mask for the bucket; the live length moves from step to step through device
    tensors only. Slots past the live one hold garbage (large values) that must not leak in."""
    h, g, bucket = 8, 2, 2 * DECODE_BLOCK
    q, k, v = _qkv(h, g, 1, bucket, dtype=dtype)
    index = torch.zeros(1, dtype=torch.long)
    live_blocks = torch.ones(1, 1, 1, dtype=torch.int32)
    mask = decode_block_mask(bucket, index, live_blocks)
    for live in (0, 5, DECODE_BLOCK - 1, DECODE_BLOCK, 200, bucket - 1):
        index.fill_(live)
        live_blocks.copy_((index // DECODE_BLOCK + 1).view(1, 1, 1))
        garbage_k, garbage_v = k.clone(), v.clone()
        garbage_k[:, :, live + 1 :] = 1e4
        garbage_v[:, :, live + 1 :] = 1e4
        out = decode_flex(q, garbage_k, garbage_v, mask, compiled=False)
        expected = attention_reference(q, k[:, :, : live + 1], v[:, :, : live + 1], causal=False)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_flex_decoding_keeps_float32_scores_in_bf16():
    """Scores near 40 that differ by about bf16's step there: a bf16 q @ k^T is visibly off, flex
    (like every other path) stays at the bf16 rounding of its output."""
    gen = torch.Generator().manual_seed(0)
    d, tk, s = 64, DECODE_BLOCK, 32.0
    unit = F.normalize(torch.randn(1, 2, 1, d, generator=gen), dim=-1)
    q = s * unit
    k = (40 * math.sqrt(d) / s) * unit + (math.sqrt(d) / s) * torch.randn(1, 2, tk, d, generator=gen)
    v = torch.randn(1, 2, tk, d, generator=gen)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = attention_reference(qb.float(), kb.float(), vb.float(), causal=False)
    index = torch.full((1,), tk - 1)
    mask = decode_block_mask(tk, index, torch.ones(1, 1, 1, dtype=torch.int32))
    flex = decode_flex(qb, kb, vb, mask, compiled=False).float()
    naive = ((qb @ kb.transpose(-1, -2)).float() / math.sqrt(d)).softmax(-1) @ vb.float()
    assert (flex - exact).abs().max() < 0.01 < (naive - exact).abs().max()


def test_shape_kinds():
    assert shape_kind(1, 900, causal=True) == "single"
    assert shape_kind(258, 900, causal=False) == "image"
    assert shape_kind(64, 64, causal=True) == "square"
    assert shape_kind(64, 900, causal=True) == "prefill"


def test_the_backend_table_picks_the_first_rule_that_covers_a_shape():
    data = {
        "tables": [
            {
                "gpu": "NVIDIA H100 80GB HBM3",
                "dtype": "bfloat16",
                "rules": [
                    {"kind": "image", "max_tq": 1100, "max_tk": 4000, "backends": ["cudnn", "flash"]},
                    {"kind": "image", "max_tq": 1 << 30, "max_tk": 1 << 30, "backends": ["flash"]},
                ],
            }
        ]
    }
    (table,) = parse_table(data, "t.json")
    assert table.backends("image", 1026, 1400) == ("cudnn", "flash")
    assert table.backends("image", 4098, 14000) == ("flash",)
    assert table.backends("prefill", 64, 900) is None  # not measured: torch chooses


@pytest.mark.parametrize(
    "rule,field",
    [
        ({"kind": "sideways", "max_tq": 1, "max_tk": 1, "backends": ["flash"]}, ".kind"),
        ({"kind": "image", "max_tq": 1, "max_tk": 1, "backends": ["turbo"]}, ".backends"),
        ({"kind": "image", "max_tq": "1", "max_tk": 1, "backends": ["flash"]}, ".max_tq"),
    ],
)
def test_a_malformed_table_fails_naming_the_file_and_the_field(rule, field):
    data = {"tables": [{"gpu": "x", "dtype": "bfloat16", "rules": [rule]}]}
    with pytest.raises(ValueError, match=rf"t\.json: tables\[0\]\.rules\[0\]\{field}"):
        parse_table(data, "t.json")


def test_the_committed_table_parses():
    parse_table(json.loads(TABLE_PATH.read_text()), str(TABLE_PATH))
