"""Resuming or forking a generation from a warm context (the KV caches a worker kept,
model/generation/warm.py) vs rebuilding the context from the recorded trajectory
(model/spec/forks.py: replay every stage).

Setup: the shared small configuration (DESIGN.md section 5), 256x256 images, 20 timesteps, greedy
plans and reflections of 48 tokens (end-of-sequence banned so every text stage does fixed work),
torch limited to 1 thread (the machine's 2 cores are shared with other sessions). A parent runs two
guided iterations (plan, draft, reflect, refine each: a random model never says "correct") in a
pipeline that keeps warm contexts. Then, for two fork points, a pipeline WITH the warm store
(`warm`) and one WITHOUT (`rebuild`) start the same fork, alternating who goes first, 3 times:

- `resume at 2/plan`: what a job paused after its second plan does on continue: the next output is
  the second draft's first denoising step.
- `follow-up`: a new instruction after the final image: the next output is the first token of a
  new plan (the final image enters the context first in both modes).

Reported per mode (median of the repeats): seconds from Pipeline.run() to the first new output,
tokens prefilled to rebuild the recorded prefix (the replayed stages; a warm start prefills none),
and the warm/rebuild ratio. Outputs equal between modes are asserted (the first new event's text or
the full fork's images, see below).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/warm_resume.py [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from common import (
    Interference,
    log,
    machine,
    median,
    setup_threads,
    small_checkpoint,
    small_sizes,
    write_json,
)

from strokes.model.generation.loading import load_engine
from strokes.model.generation.pipeline import Pipeline
from strokes.model.generation.warm import WarmContexts
from strokes.model.spec.events import Done, ImageCompleted, ImageProgress, StageCompleted, TextDelta
from strokes.model.spec.forks import ForkPoint, params_from_trajectory, plan_fork
from strokes.model.spec.params import (
    DRAFT_DEFAULTS,
    REFINE_DEFAULTS,
    GenerationParams,
    RunOptions,
    TextSettings,
)

SIZE, STEPS, TOKENS, REPEATS = 256, 20, 48, 3


def no_eos(eos_id: int):
    def processor(history, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[eos_id] = float("-inf")
        return logits

    return processor


def first_output(pipeline: Pipeline, params, fork, processor) -> dict:
    """Run a fork up to its first new output; the time and the tokens its replay prefilled."""
    t0 = time.perf_counter()
    events = pipeline.run(params, options=RunOptions(fork=fork, logits_processor=processor))
    prefix_prefill, first = 0, None
    for event in events:
        if isinstance(event, StageCompleted) and event.inherited:
            prefix_prefill += event.prefilled_tokens
        elif isinstance(event, (TextDelta, ImageProgress)):
            first = event
            break
    seconds = time.perf_counter() - t0
    events.close()
    what = first.delta if isinstance(first, TextDelta) else f"step {first.step}/{first.steps}"
    return {"seconds": seconds, "prefix_prefilled_tokens": prefix_prefill, "first_output": what}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_threads(1)
    engine = load_engine(small_checkpoint(), device="cpu", dtype=torch.float32)
    processor = no_eos(engine.tokenizer.eos_id)
    text = TextSettings(max_tokens=TOKENS)
    params = GenerationParams(
        prompt="A red fox sitting in a snowy forest clearing at dawn, soft light, detailed fur.",
        width=SIZE,
        height=SIZE,
        max_iterations=2,
        draft=replace(DRAFT_DEFAULTS, steps=STEPS),
        refine=replace(REFINE_DEFAULTS, steps=STEPS),
        plan=text,
        reflect=text,
        seed=0,
    )
    warm = Pipeline(engine, warm=WarmContexts(device_bytes=8 << 30))
    cold = Pipeline(engine)
    log("parent: two guided iterations, its contexts kept warm ...")
    t0 = time.perf_counter()
    events = list(warm.run(params, options=RunOptions(logits_processor=processor, warm_key="parent")))
    parent_s = time.perf_counter() - t0
    done = events[-1]
    assert isinstance(done, Done) and len(done.trajectory["stages"]) == 8, "expected all four stages twice"
    images = {f"{e.image_id}.png": e.pixels for e in events if isinstance(e, ImageCompleted)}
    trajectory = done.trajectory
    fork_params = params_from_trajectory(trajectory)
    points = {
        "resume at 2/plan": ForkPoint(2, "plan"),
        "follow-up": ForkPoint(instruction="now give the fox a green scarf"),
    }
    rows, meter = [], Interference().start()
    for name, point in points.items():
        runs = {"warm": [], "rebuild": []}
        for rep in range(REPEATS):
            order = ("warm", "rebuild") if rep % 2 == 0 else ("rebuild", "warm")
            for mode in order:
                fork = plan_fork(trajectory, point).load_images(images.__getitem__)
                pipeline = warm if mode == "warm" else cold
                runs[mode].append(first_output(pipeline, fork_params, fork, processor))
                log(f"{name} {mode} #{rep + 1}: {runs[mode][-1]}")
        assert {r["first_output"] for r in runs["warm"]} == {r["first_output"] for r in runs["rebuild"]}
        row = {"fork": name}
        for mode, results in runs.items():
            row[mode] = {
                "seconds_median": round(median([r["seconds"] for r in results]), 4),
                "seconds": [round(r["seconds"], 4) for r in results],
                "prefix_prefilled_tokens": results[0]["prefix_prefilled_tokens"],
            }
        row["ratio_rebuild_over_warm"] = round(
            row["rebuild"]["seconds_median"] / row["warm"]["seconds_median"], 2
        )
        rows.append(row)
    # The whole follow-up once per mode: the images must be bitwise equal.
    full = {}
    for mode, pipeline in (("warm", warm), ("rebuild", cold)):
        fork = plan_fork(trajectory, points["follow-up"]).load_images(images.__getitem__)
        out = list(pipeline.run(fork_params, options=RunOptions(fork=fork, logits_processor=processor)))
        full[mode] = {e.image_id: e.pixels for e in out if isinstance(e, ImageCompleted)}
    same = full["warm"].keys() == full["rebuild"].keys() and all(
        np.array_equal(full["warm"][k], full["rebuild"][k]) for k in full["warm"]
    )
    assert same, "a warm fork differs from a rebuilt one"
    others = meter.stop()
    print(
        "warm_resume: first new output after a resume/fork, warm KV caches vs a rebuild from the trajectory"
    )
    print(f"small config {small_sizes()['llm']}, float32, torch {torch.__version__}, 1 thread")
    print(
        f"{SIZE}x{SIZE}, {STEPS} timesteps, texts {TOKENS} tokens (EOS banned); parent: 2 iterations, {parent_s:.1f} s"
    )
    print()
    print(
        f"{'fork':<18} {'warm s':>8} {'rebuild s':>10} {'ratio':>6} {'prefill warm':>13} {'prefill rebuild':>16}"
    )
    for r in rows:
        print(
            f"{r['fork']:<18} {r['warm']['seconds_median']:>8.3f} {r['rebuild']['seconds_median']:>10.3f} "
            f"{r['ratio_rebuild_over_warm']:>6.2f} {r['warm']['prefix_prefilled_tokens']:>13} "
            f"{r['rebuild']['prefix_prefilled_tokens']:>16}"
        )
    print()
    print("seconds: Pipeline.run() to the first new output (median of 3, modes alternating who goes first);")
    print("prefill: tokens run through the model to rebuild the recorded prefix. First outputs equal,")
    print(
        f"and the whole follow-up's images bitwise equal between the modes (asserted). others busy: {others:.0%}"
    )
    write_json(
        args.json,
        {
            "benchmark": "warm_resume",
            "machine": machine(),
            "setup": {"size": SIZE, "steps": STEPS, "text_tokens": TOKENS, "repeats": REPEATS, "threads": 1},
            "parent_seconds": round(parent_s, 3),
            "rows": rows,
            "follow_up_images_equal": same,
            "other_processes_busy_share": others,
        },
    )


if __name__ == "__main__":
    main()
