"""The publisher's text-delta coalescing: pieces go out by count, by age, and whole at a stage's end."""

from __future__ import annotations

from strokes.model.spec.events import Stage, TextDelta
from strokes.service.worker.publisher import DeltaBuffer


def test_deltas_are_coalesced_by_count_and_flushed_whole():
    buffer = DeltaBuffer(max_pieces=3, max_s=3600)
    pieces = [TextDelta(1, Stage.plan, p) for p in ("a", "b", "c", "d")]
    out = [buffer.add(p) for p in pieces]
    assert out[:2] == [None, None] and out[2].delta == "abc" and out[3] is None
    assert buffer.flush().delta == "d" and buffer.flush() is None


def test_a_slow_model_s_pieces_go_out_at_once():
    buffer = DeltaBuffer(max_pieces=16, max_s=0.0)
    assert buffer.add(TextDelta(1, Stage.plan, "a")).delta == "a"


def test_a_piece_of_another_stage_sends_the_held_text_first():
    buffer = DeltaBuffer(max_pieces=16, max_s=3600)
    assert buffer.add(TextDelta(1, Stage.plan, "a")) is None
    out = buffer.add(TextDelta(1, Stage.reflect, "b"))
    assert (out.stage, out.delta) == (Stage.plan, "a") and buffer.flush().stage == Stage.reflect
