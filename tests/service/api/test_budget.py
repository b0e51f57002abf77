"""The API's compute budget: a request's worst case by the one formula (model/spec/budget.py)
against the operator's limits, refused naming the limit and the request's figure."""

from __future__ import annotations

import pytest

from strokes.model.spec.params import GenerationParams
from strokes.service.api import budget
from strokes.service.api.schemas import GenerationRequest
from strokes.service.shared.messages import JobMessage

LIMITS = {"max_cost": 16_000_000, "max_positions": 32768, "max_events": 50000 // 3}


def _job(**body) -> tuple[JobMessage, GenerationParams]:
    """A request's message, and the parameters the API makes of it (what the budget prices)."""
    message = GenerationRequest(prompt="a red cube", **body).job_message()
    return message, message.to_params()


def test_the_default_request_fits_the_default_budget_with_its_figures():
    est = budget.check(*_job(), **LIMITS)
    # 3 iterations x (draft 4096 tokens x 2 branches x 50 steps + refine 4096 x 3 x 50 + 768 x 64)
    assert est.cost == 3 * (4096 * 2 * 50 + 4096 * 3 * 50 + (512 + 256) * 64)
    assert est.images == 6 and est.positions < 32768 and est.events < LIMITS["max_events"]


def test_the_hours_of_gpu_request_is_refused_naming_the_limit_and_its_figure():
    bomb = _job(
        max_iterations=8,
        draft={"steps": 200},
        refine={"steps": 200},
        plan={"max_tokens": 4096},
        reflect={"max_tokens": 4096},
        preview_every=1,
    )
    with pytest.raises(budget.OverBudget) as caught:
        budget.check(*bomb, **LIMITS)
    assert caught.value.limit == "max_job_cost" and caught.value.figure > LIMITS["max_cost"]
    assert f"{caught.value.figure:,}" in str(caught.value)


def test_a_context_that_could_pass_the_position_limit_is_refused():
    small_images = {"width": 64, "height": 64, "draft": {"steps": 2}, "refine": {"steps": 2}}
    long_texts = _job(
        max_iterations=8, plan={"max_tokens": 4096}, reflect={"max_tokens": 4096}, **small_images
    )
    with pytest.raises(budget.OverBudget) as caught:
        budget.check(*long_texts, **LIMITS)
    assert caught.value.limit == "max_positions" and caught.value.figure > 32768


def test_every_event_a_request_can_emit_is_counted_in_its_bound():
    job = _job(
        max_iterations=2,
        draft={"steps": 10},
        refine={"steps": 12},
        plan={"max_tokens": 7},
        reflect={"max_tokens": 5},
    )
    # per iteration: 4 stages x (started + completed) + one delta per token + one progress per step
    # + iteration.completed; then job.queued, job.started, the terminal event and a hand-back
    assert budget.estimate(*job).events == 2 * (7 + 5 + 10 + 12 + 9) + 4
