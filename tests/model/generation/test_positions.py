"""A run's context is priced by its real positions, at any depth of follow-ups, and refused past the
model's max_position_embeddings before any work (tiny random model, a few steps).

Every stage record carries the RoPE positions the context holds after it (model/generation/run.py);
model/spec/budget.py prices a fork from them plus what it may still add, and the engine's own bound
(model/generation/budget.py) is checked before the first event."""

from __future__ import annotations

import pytest

from strokes.model.generation.budget import rope_bound
from strokes.model.generation.pipeline import Pipeline
from strokes.model.spec import budget
from strokes.model.spec.events import ImageCompleted
from strokes.model.spec.forks import ForkPoint, params_from_trajectory, plan_fork
from strokes.model.spec.params import GenerationParams, ImageSettings, InvalidParams, RunOptions, TextSettings

TEXT = TextSettings(max_tokens=6, do_sample=True, temperature=1.0)


def params(**changes) -> GenerationParams:
    base = GenerationParams(
        prompt="a red cube on top of a blue sphere",
        width=64,
        height=64,
        max_iterations=1,
        draft=ImageSettings(steps=3),
        refine=ImageSettings(steps=3, cfg_img_scale=2.0),
        plan=TEXT,
        reflect=TEXT,
        seed=7,
    )
    return base.replace(**changes)


def run(engine, p, fork=None):
    events = list(Pipeline(engine).run(p, options=RunOptions(fork=fork)))
    images = {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}
    return events[-1].trajectory, images


def test_follow_ups_at_any_depth_are_priced_from_the_recorded_context(own_engine):
    trajectory, images = run(own_engine, params())
    seen = []
    follow_ups = ("now make it green", "now add a hat", "now a second cube", "now a red sky")
    for depth, instruction in enumerate(follow_ups, 1):
        p = params_from_trajectory(trajectory)
        cut = plan_fork(trajectory, ForkPoint(instruction=instruction))
        resumed = budget.resumption(p, cut.stages, instruction=instruction, input_image=False)
        estimate = budget.estimate_resumed(p, resumed)
        bound = rope_bound(own_engine.tokenizer.segment, p, cut)
        # The estimate starts from the positions the parent's context really held ...
        assert resumed.positions >= trajectory["stages"][-1]["positions"]
        trajectory, child_images = run(own_engine, p, cut.load_images({**images}.__getitem__))
        images.update(child_images)
        real = trajectory["stages"][-1]["positions"]
        # ... so it covers the child's real context, whatever the depth (doubling the parent's
        # iterations once did not: from the second follow-up on it fell short).
        assert real <= bound <= estimate.positions
        doubled = budget.estimate(p, input_image=False, iterations=2 * p.max_iterations).positions
        seen.append((depth, real, estimate.positions, doubled))
    reals, estimates, doubled = zip(*[s[1:] for s in seen], strict=True)
    assert list(reals) == sorted(reals) and list(estimates) == sorted(estimates)  # they grow together
    assert len(set(doubled)) == 1 and reals[-1] > doubled[-1], seen  # the old price stood still


def test_a_replaced_text_is_counted_in_the_price(own_engine):
    trajectory, _ = run(own_engine, params())
    p = params_from_trajectory(trajectory)
    short = plan_fork(trajectory, ForkPoint(1, "plan", text="a cube"))
    long = plan_fork(trajectory, ForkPoint(1, "plan", text="a very long plan " * 200))
    assert "positions" not in long.stages[-1]  # the recorded figure was the old text's
    priced = [
        budget.resumption(p, cut.stages, instruction=None, input_image=False).positions
        for cut in (short, long)
    ]
    assert priced[1] - priced[0] >= len(("a very long plan " * 200).encode()) - len(b"a cube")


def test_a_context_past_max_position_embeddings_is_refused_before_any_work(own_engine):
    limit = own_engine.cfg.llm.max_position_embeddings
    long = params(
        max_iterations=2, plan=TextSettings(max_tokens=limit // 2), reflect=TextSettings(max_tokens=64)
    )
    events = Pipeline(own_engine).run(long)
    with pytest.raises(InvalidParams) as caught:
        next(events)  # nothing was computed: the very first step refuses
    assert caught.value.field == "max_positions"
    assert f"{limit:,}" in caught.value.message and "positions" in caught.value.message
    run(own_engine, params())  # a request within the limit runs
