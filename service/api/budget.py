"""The API's compute budget check: a request's worst case (model/spec/budget.py's formula, for the
model the API serves) against the operator's limits, before the job is queued.

A request over `max_job_cost` or `max_positions`, or whose events could pass
`events_maxlen / max_attempts`, is refused (OverBudget naming the limit and the request's figure;
a 422 `budget_exceeded`). Besides its stages' events a job emits job.queued, job.started, its
terminal event and a hand-back's job.queued, and each pause (steering) job.paused, job.resumed and
the next attempt's job.started.

A fork, a follow-up at any depth and a continue with replaced text replay a recorded trajectory:
they are priced from its real context (the positions its stages hold) plus what they may still
add (model/spec/budget.py `resumption`), never from the parent's request alone.
"""

from __future__ import annotations

from dataclasses import replace

from strokes.model.spec import budget
from strokes.model.spec.budget import Estimate, Geometry, Resumption
from strokes.model.spec.params import GenerationParams
from strokes.service.shared.messages import JobMessage

JOB_EVENTS = 4  # job.queued, job.started, the terminal event, a hand-back's job.queued
PAUSE_EVENTS = 3  # job.paused, job.resumed, the next attempt's job.started


def estimate(
    message: JobMessage,
    params: GenerationParams,
    geometry: Geometry = budget.BAGEL_7B_MOT,
    resumed: Resumption | None = None,
) -> Estimate:
    """The worst case of a job (its message, and the parameters made of it), its own events
    included. `resumed`: the job replays a recorded trajectory first (a fork, a follow-up at any
    depth, a continue with replaced text) and is priced from its real context."""
    if resumed is not None:
        est, iterations = budget.estimate_resumed(params, resumed, geometry), resumed.iterations
    else:
        iterations = params.max_iterations
        est = budget.estimate(params, geometry, input_image=message.input_image, iterations=iterations)
    events = est.events + PAUSE_EVENTS * iterations * len(message.pause_after) + JOB_EVENTS
    return replace(est, events=events)


class OverBudget(ValueError):
    """The request exceeds a limit; `limit` names the setting, `figure` is the request's value."""

    def __init__(self, message: str, limit: str, figure: int, maximum: int):
        super().__init__(message)
        self.limit, self.figure, self.maximum = limit, figure, maximum


def check(
    message: JobMessage,
    params: GenerationParams,
    *,
    max_cost: int,
    max_positions: int,
    max_events: int,
    resumed: Resumption | None = None,
) -> Estimate:
    """The estimate, or OverBudget naming the first limit the request exceeds."""
    est = estimate(message, params, resumed=resumed)
    if est.cost > max_cost:
        raise OverBudget(
            f"the request's compute cost is {est.cost:,} token-steps, over the limit of {max_cost:,} "
            "(STROKES_MAX_JOB_COST); use fewer iterations or steps, a smaller size, or fewer previews",
            "max_job_cost",
            est.cost,
            max_cost,
        )
    if est.positions > max_positions:
        raise OverBudget(
            f"the request's context could reach {est.positions:,} positions, over the model's limit "
            f"of {max_positions:,} (STROKES_MAX_POSITIONS); use fewer iterations, shorter texts or "
            "lower max_tokens",
            "max_positions",
            est.positions,
            max_positions,
        )
    if est.events > max_events:
        raise OverBudget(
            f"the request could emit {est.events:,} events per attempt, over the limit of "
            f"{max_events:,} (STROKES_EVENTS_MAXLEN / STROKES_MAX_ATTEMPTS); lower max_tokens, steps "
            "or iterations",
            "max_events",
            est.events,
            max_events,
        )
    return est
