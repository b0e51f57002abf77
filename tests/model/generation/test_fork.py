"""Forks and resumes on a tiny random model: a context rebuilt from a trajectory equals the parent's.

Text is sampled (do_sample, temperature 1), so every later stage depends on the random generator's
state at the fork point as well as on the rebuilt caches and the replayed VAE posterior draws.
"""

from __future__ import annotations

import numpy as np
import pytest

from strokes.model.generation.pipeline import Pipeline
from strokes.model.generation.warm import WarmContexts
from strokes.model.spec.events import ImageCompleted, Paused, StageCompleted
from strokes.model.spec.forks import ForkPoint, params_from_trajectory, plan_fork
from strokes.model.spec.params import GenerationParams, ImageSettings, InvalidParams, RunOptions, TextSettings

SAMPLED = TextSettings(max_tokens=8, do_sample=True, temperature=1.0)
# What must match between a parent's stage and a fork's (timings and cache counters may differ).
SAME = ("iteration", "stage", "instruction", "text", "verdict", "tokens", "stop", "image", "rng", "rng_vae")


def params(**changes) -> GenerationParams:
    base = GenerationParams(
        prompt="a red cube on top of a blue sphere",
        width=64,
        height=64,
        max_iterations=2,
        draft=ImageSettings(steps=4),
        refine=ImageSettings(steps=4, cfg_img_scale=2.0),
        plan=SAMPLED,
        reflect=SAMPLED,
        seed=3,
    )
    return base.replace(**changes)


def run(engine, p, fork=None, processor=None):
    events = list(Pipeline(engine).run(p, options=RunOptions(fork=fork, logits_processor=processor)))
    images = {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}
    return events, events[-1].trajectory, images


def comparable(trajectory) -> list[dict]:
    return [{k: s.get(k) for k in SAME} for s in trajectory["stages"]]


def fork_of(trajectory, images, point: ForkPoint):
    return plan_fork(trajectory, point).load_images(images.__getitem__)


def assert_same_run(parent, parent_images, child, child_images):
    assert comparable(child) == comparable(parent)
    assert child_images.keys() == parent_images.keys()
    for name, pixels in parent_images.items():
        assert np.array_equal(child_images[name], pixels), name  # bitwise


@pytest.fixture(scope="module")
def guided(own_engine):
    return run(own_engine, params())


def test_a_fork_at_every_stage_boundary_reproduces_the_parents_remaining_stages_bitwise(own_engine, guided):
    _, parent, images = guided
    kinds = [(s["iteration"], s["stage"]) for s in parent["stages"]]
    assert kinds == [(i, k) for i in (1, 2) for k in ("plan", "draft", "reflect", "refine")]
    for it, stage in kinds:
        events, child, child_images = run(
            own_engine, params_from_trajectory(parent), fork_of(parent, images, ForkPoint(it, stage))
        )
        assert_same_run(parent, images, child, child_images)
        done = [e for e in events if isinstance(e, StageCompleted)]
        cut = kinds.index((it, stage)) + 1
        assert [e.inherited for e in done] == [True] * cut + [False] * (len(kinds) - cut)
        assert all(s.get("inherited") for s in child["stages"][:cut])
        assert child["parent"] == {"job_id": None, "iteration": it, "stage": stage}
        replayed_prefill = sum(e.prefilled_tokens for e in done[:cut])
        assert replayed_prefill > 0  # the rebuild is counted as this fork's work
        assert events[-1].usage["images"] == sum(1 for k in kinds[cut:] if k[1] in ("draft", "refine"))


def test_the_comparison_can_fail_a_wrong_generator_state_changes_what_follows(own_engine, guided):
    _, parent, images = guided
    fork = fork_of(parent, images, ForkPoint(1, "refine"))
    fork.stages[-1]["rng"] = parent["stages"][0]["rng"]  # the state after the plan, not the refine
    _, child, _ = run(own_engine, params_from_trajectory(parent), fork)
    assert comparable(child)[4:] != comparable(parent)[4:]


def test_interleaved_forks_replay_the_models_own_choices(own_engine):
    tok = own_engine.tokenizer

    def steer(history, logits):  # a function of the logits only, so replays see the same choices
        logits = logits.clone()
        logits[[tok.bos_id, tok.start_of_image, tok.eos_id]] += 6.0
        return logits

    short = TextSettings(max_tokens=6, do_sample=True, temperature=1.0)
    p = params(
        protocol="interleaved",
        plan=short,
        reflect=short,
        draft=ImageSettings(steps=3),
        refine=ImageSettings(steps=3),
    )
    _, parent, images = run(own_engine, p, processor=steer)
    kinds = [(s["iteration"], s["stage"]) for s in parent["stages"]]
    assert len(kinds) >= 4 and {"draft", "reflect"} <= {k for _, k in kinds}
    for it, stage in dict.fromkeys(kinds):  # a fork point names the last stage of that kind
        _, child, child_images = run(
            own_engine, params_from_trajectory(parent), fork_of(parent, images, ForkPoint(it, stage)), steer
        )
        assert_same_run(parent, images, child, child_images)
    warm = Pipeline(own_engine, warm=WarmContexts(device_bytes=1 << 30))
    list(warm.run(p, options=RunOptions(logits_processor=steer, warm_key="parent")))
    for it, stage in dict.fromkeys(kinds):  # the same from warm caches (logits kept per boundary)
        fork = fork_of(parent, images, ForkPoint(it, stage))
        events = list(
            warm.run(params_from_trajectory(parent), options=RunOptions(fork=fork, logits_processor=steer))
        )
        child_images = {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}
        assert_same_run(parent, images, events[-1].trajectory, child_images)
    assert warm.warm.hits == len(dict.fromkeys(kinds))


def test_an_edited_reflection_changes_the_verdict_and_records_what_it_replaced(own_engine, guided):
    _, parent, images = guided
    edit = "The intermediate step is correct. The cube sits on the sphere."
    point = ForkPoint(1, "reflect", text=edit, parent="job-parent")
    events, child, _ = run(own_engine, params_from_trajectory(parent), fork_of(parent, images, point))
    assert [(s["iteration"], s["stage"]) for s in child["stages"]] == [
        (1, "plan"),
        (1, "draft"),
        (1, "reflect"),
    ]
    last = child["stages"][-1]
    assert last["text"] == edit and last["verdict"] == "correct" and last["edited"] is True
    assert child["parent"] == {
        "job_id": "job-parent",
        "iteration": 1,
        "stage": "reflect",
        "replaced_text": parent["stages"][2]["text"],
    }
    assert events[-1].final_image_id == "it1-draft"


def test_an_edited_plan_is_drawn_from(own_engine, guided):
    _, parent, images = guided
    point = ForkPoint(1, "plan", text="<ins>draw a green cube</ins> <des>a green cube</des>")
    _, child, child_images = run(own_engine, params_from_trajectory(parent), fork_of(parent, images, point))
    assert child["stages"][0]["text"] == point.text
    assert not np.array_equal(child_images["it1-draft"], images["it1-draft"])


def test_a_follow_up_instruction_runs_new_iterations_and_can_itself_be_forked_exactly(own_engine, guided):
    _, parent, images = guided
    point = ForkPoint(instruction="now make the cube green")
    events, child, child_images = run(
        own_engine, params_from_trajectory(parent), fork_of(parent, images, point)
    )
    stages = child["stages"]
    assert comparable({"stages": stages[:8]}) == comparable(parent)
    assert stages[8]["stage"] == "instruction" and stages[8]["iteration"] == 3
    assert stages[8]["appended_image"] == "it2-refine"  # the final image enters the context
    assert stages[9]["stage"] == "plan" and "now make the cube green" in stages[9]["instruction"]
    assert events[-1].iterations == 4 and events[-1].final_image_id.startswith("it4-")
    for s in stages[8:]:
        _, grandchild, grand_images = run(
            own_engine,
            params_from_trajectory(child),
            fork_of(child, child_images, ForkPoint(s["iteration"], s["stage"])),
        )
        assert_same_run(child, child_images, grandchild, grand_images)


@pytest.mark.parametrize(
    ("point", "field"),
    [
        (ForkPoint(1, "plan", text="fine <|im_end|> <|im_start|>"), "fork.text"),
        (ForkPoint(1, "reflect", text="   "), "fork.text"),
        (ForkPoint(1, "draft", text="a green cube"), "fork.text"),
        (ForkPoint(1, "refine", text="a green cube"), "fork.text"),
        (ForkPoint(3, "plan"), "fork.stage"),
        (ForkPoint(1, "sketch"), "fork.stage"),
        (ForkPoint(), "fork.stage"),
        (ForkPoint(1, "plan", instruction="and green"), "fork.instruction"),
        (ForkPoint(instruction="now <|vision_start|>"), "fork.instruction"),
    ],
)
def test_bad_fork_points_and_edits_are_refused_naming_the_field(guided, point, field):
    _, parent, _ = guided
    with pytest.raises(InvalidParams) as err:
        plan_fork(parent, point)
    assert err.value.field == field


def test_a_trajectory_without_replay_records_cannot_be_forked(guided):
    _, parent, _ = guided
    old = {**parent, "stages": [{k: v for k, v in s.items() if k != "rng"} for s in parent["stages"]]}
    with pytest.raises(InvalidParams) as err:
        plan_fork(old, ForkPoint(1, "plan"))
    assert err.value.field == "fork.job_id"


def test_a_paused_run_continued_unchanged_equals_the_uninterrupted_run(own_engine, guided):
    _, parent, images = guided
    p, fork, seen = params(), None, []
    while True:  # pause after every plan and reflection, continue each time as it is
        events = list(
            Pipeline(own_engine).run(p, options=RunOptions(fork=fork, pause_after=("plan", "reflect")))
        )
        last = events[-1]
        seen += [e.image_id for e in events if isinstance(e, ImageCompleted)]
        if not isinstance(last, Paused):
            break
        assert last.stage.value in ("plan", "reflect") and last.text == last.trajectory["stages"][-1]["text"]
        point = ForkPoint(last.iteration, last.stage.value)
        loaded = {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}
        fork = plan_fork(last.trajectory, point).load_images(loaded.__getitem__)
    assert comparable(last.trajectory) == comparable(parent)
    assert len(seen) > len(images)  # each resume re-emitted the images it inherited


def test_a_pause_continued_with_an_edited_plan_draws_from_the_edit(own_engine):
    events = list(Pipeline(own_engine).run(params(), options=RunOptions(pause_after=("plan",))))
    paused = events[-1]
    assert isinstance(paused, Paused) and (paused.iteration, paused.stage.value) == (1, "plan")
    assert not any(isinstance(e, ImageCompleted) for e in events)
    fork = plan_fork(paused.trajectory, ForkPoint(1, "plan", text="<ins>a green cube</ins>"))
    events = list(Pipeline(own_engine).run(params(), options=RunOptions(fork=fork, pause_after=("plan",))))
    paused = events[-1]
    assert isinstance(paused, Paused) and (paused.iteration, paused.stage.value) == (2, "plan")
    assert paused.trajectory["stages"][0]["text"] == "<ins>a green cube</ins>"


def test_forks_from_warm_contexts_equal_rebuilt_ones_and_prefill_nothing_of_the_prefix(own_engine, guided):
    _, parent, images = guided
    warm = WarmContexts(device_bytes=1 << 30)
    pipeline = Pipeline(own_engine, warm=warm)
    list(
        pipeline.run(params(), options=RunOptions(warm_key="parent"))
    )  # the parent again, now with its caches kept
    assert warm.holds("parent")
    kinds = [(s["iteration"], s["stage"]) for s in parent["stages"]]
    for n, (it, stage) in enumerate(kinds, start=1):
        fork = fork_of(parent, images, ForkPoint(it, stage))
        events = list(
            pipeline.run(params_from_trajectory(parent), options=RunOptions(fork=fork, warm_key=f"fork-{n}"))
        )
        child = events[-1].trajectory
        child_images = {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}
        assert_same_run(parent, images, child, child_images)
        done = [e for e in events if isinstance(e, StageCompleted)]
        assert sum(e.prefilled_tokens for e in done[:n]) == 0  # the prefix came from warm caches
    assert warm.hits == len(kinds)
    # A paused run kept warm resumes from its caches, edited or not, and stays exact.
    events = list(pipeline.run(params(), options=RunOptions(pause_after=("reflect",), warm_key="paused")))
    paused = events[-1]
    resumed = list(
        pipeline.run(
            params(),
            options=RunOptions(
                fork=plan_fork(paused.trajectory, ForkPoint(1, "reflect")).load_images(images.__getitem__)
            ),
        )
    )
    assert comparable(resumed[-1].trajectory) == comparable(parent)
    assert sum(e.prefilled_tokens for e in resumed if isinstance(e, StageCompleted) and e.inherited) == 0


def test_the_warm_budget_drops_the_least_recently_used(own_engine):
    warm = WarmContexts(device_bytes=0, host_bytes=0)
    pipeline = Pipeline(own_engine, warm=warm)
    list(pipeline.run(params(max_iterations=1), options=RunOptions(warm_key="a")))
    assert not warm.holds("a") and warm.nbytes() == 0
    one = Pipeline(own_engine, warm=WarmContexts(device_bytes=1 << 30))
    list(one.run(params(max_iterations=1), options=RunOptions(warm_key="a")))
    size = one.warm.nbytes()
    one.warm.device_bytes = int(size * 1.5)
    list(one.run(params(max_iterations=1, seed=4), options=RunOptions(warm_key="b")))
    assert one.warm.holds("b") and not one.warm.holds("a")


def test_a_warm_fork_gets_caches_sized_from_its_budget_that_never_grow(own_engine, guided, monkeypatch):
    """The copies a warm fork starts from have the job's budget as capacity (not the prefix's
    length), so the rest of the job appends in place: no reallocation, no copy, no rebind."""
    from strokes.model.generation.budget import job_budget

    _, parent, images = guided
    warm = WarmContexts(device_bytes=1 << 30)
    pipeline = Pipeline(own_engine, warm=warm)
    list(pipeline.run(params(), options=RunOptions(warm_key="parent")))
    hits, take = [], warm.take
    monkeypatch.setattr(warm, "take", lambda *a, **kw: hits.append(take(*a, **kw)) or hits[-1])
    fork = fork_of(parent, images, ForkPoint(1, "plan"))
    forked = params_from_trajectory(parent)
    list(pipeline.run(forked, options=RunOptions(fork=fork)))
    (hit,) = hits
    budget = job_budget(own_engine.cfg, own_engine.tokenizer.segment, forked)
    assert hit.cond.capacity >= budget.cond and hit.img_uncond.capacity >= budget.img_uncond
    assert hit.cond.length < hit.cond.capacity  # the job went on appending after the warm prefix
    assert hit.cond.reallocations == 0 and hit.img_uncond.reallocations == 0
