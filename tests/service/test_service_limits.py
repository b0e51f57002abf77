"""Pure units of the hardening: the compute budget's formula, text-delta coalescing, and the CPU
worker's share of the cores."""

from __future__ import annotations

import pytest

from strokes.model.spec.events import Stage, TextDelta
from strokes.service.api.schemas import GenerationRequest
from strokes.service.cli.worker import cpu_share
from strokes.service.shared import budget
from strokes.service.shared.settings import Settings
from strokes.service.worker.publisher import DeltaBuffer

LIMITS = {"max_cost": 16_000_000, "max_positions": 32768, "max_events": 50000 // 3}


def _record(**body) -> dict:
    return GenerationRequest(prompt="a red cube", **body).job_record()


def test_the_default_request_fits_the_default_budget_with_its_figures():
    est = budget.check(_record(), **LIMITS)
    # 3 iterations x (draft 4096 tokens x 2 branches x 50 steps + refine 4096 x 3 x 50 + 768 x 64)
    assert est.cost == 3 * (4096 * 2 * 50 + 4096 * 3 * 50 + (512 + 256) * 64)
    assert est.images == 6 and est.positions < 32768 and est.events < LIMITS["max_events"]


def test_the_hours_of_gpu_request_is_refused_naming_the_limit_and_its_figure():
    bomb = _record(
        max_iterations=8,
        draft={"steps": 200},
        refine={"steps": 200},
        plan={"max_tokens": 4096},
        reflect={"max_tokens": 4096},
        preview_every=1,
    )
    with pytest.raises(budget.OverBudget) as caught:
        budget.check(bomb, **LIMITS)
    assert caught.value.limit == "max_job_cost" and caught.value.figure > LIMITS["max_cost"]
    assert f"{caught.value.figure:,}" in str(caught.value)


def test_a_context_that_could_pass_the_position_limit_is_refused():
    small_images = {"width": 64, "height": 64, "draft": {"steps": 2}, "refine": {"steps": 2}}
    long_texts = _record(
        max_iterations=8, plan={"max_tokens": 4096}, reflect={"max_tokens": 4096}, **small_images
    )
    with pytest.raises(budget.OverBudget) as caught:
        budget.check(long_texts, **LIMITS)
    assert caught.value.limit == "max_positions" and caught.value.figure > 32768


def test_every_event_a_request_can_emit_is_counted_in_its_bound():
    rec = _record(
        max_iterations=2,
        draft={"steps": 10},
        refine={"steps": 12},
        plan={"max_tokens": 7},
        reflect={"max_tokens": 5},
    )
    # per iteration: 4 stages x (started + completed) + one delta per token + one progress per step
    # + iteration.completed; then job.queued, job.started, the terminal event and a hand-back
    assert budget.estimate(rec).events == 2 * (7 + 5 + 10 + 12 + 9) + 4


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


def test_cpu_workers_take_their_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_share(Settings(local_workers=2)) == 8
    assert cpu_share(Settings(local_workers=32)) == 1
    assert cpu_share(Settings(local_workers=2, torch_threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_share(Settings(local_workers=2)) == 5
