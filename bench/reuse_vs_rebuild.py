"""The guided pipeline with one growing KV cache reused from stage to stage vs rebuilding every
context from scratch before every stage (what a stateless, reference-style loop would do).

Setup: the shared small configuration, 256x256 images (256 latent tokens), 20 timesteps per image
(19 Euler steps; drafts with BAGEL's text-to-image guidance: 2 branches, refinements with its edit
guidance: 3 branches), the think system prompt, greedy plans of 96 tokens and reflections of 64
tokens (the end-of-sequence token is banned by a logits processor so every text stage decodes
exactly its max_tokens: the work per stage is fixed). A random model's reflection never says
"correct" (the verdict parses as "unknown", which the pipeline treats as wrong), so every iteration
runs all four stages: plan, draft, reflect, refine; the benchmark asserts it.

For max_iterations 1, 2 and 3, `Pipeline(engine, reuse_cache=True)` and `reuse_cache=False` run the
same request (same seed) in lockstep, event by event (so load from other processes on this shared
machine hits both alike); each pipeline's time is the sum of its own event computations. Reported:
wall seconds and their ratio, prefilled tokens (every token run into a KV cache by a prefill, text
and image appends and rebuilds; decoded tokens not included) and their ratio, tokens served from
the cache, and that every image and every text is identical (asserted).

Run: .venv/bin/python bench/reuse_vs_rebuild.py [--iterations 1 2 3] [--json out.json]
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
    setup_threads,
    small_checkpoint,
    small_sizes,
    wait_for_quiet,
    write_json,
)

from strokes.model.generation.loading import load_engine
from strokes.model.generation.pipeline import Pipeline
from strokes.model.spec.events import (
    Done,
    ImageCompleted,
    IterationCompleted,
    StageCompleted,
    StageStarted,
    Verdict,
)
from strokes.model.spec.params import (
    DRAFT_DEFAULTS,
    REFINE_DEFAULTS,
    GenerationParams,
    RunOptions,
    TextSettings,
)

PROMPT = "A red fox sitting in a snowy forest clearing at dawn, soft light, detailed fur."
SIZE = 256
STEPS = 20
PLAN_TOKENS = 96
REFLECT_TOKENS = 64
MODES = ("reuse", "rebuild")


def params(iterations: int) -> GenerationParams:
    return GenerationParams(
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        max_iterations=iterations,
        draft=replace(DRAFT_DEFAULTS, steps=STEPS),
        refine=replace(REFINE_DEFAULTS, steps=STEPS),
        plan=TextSettings(max_tokens=PLAN_TOKENS),
        reflect=TextSettings(max_tokens=REFLECT_TOKENS),
        seed=0,
        think=True,
    )


def no_eos(eos: int):
    def processor(history, logits):
        logits = logits.clone()
        logits[eos] = float("-inf")
        return logits

    return processor


def lockstep(pipelines: dict[str, Pipeline], p: GenerationParams, eos: int) -> dict[str, dict]:
    """Run the same request through every pipeline, one event each in turn; per pipeline: its own
    compute seconds (total and per stage), the events it yielded."""
    runs = {m: pl.run(p, options=RunOptions(logits_processor=no_eos(eos))) for m, pl in pipelines.items()}
    out = {m: {"seconds": 0.0, "stage_seconds": {}, "events": []} for m in pipelines}
    current = {m: None for m in pipelines}
    order = list(pipelines)
    i = 0
    while runs:
        for m in order if i % 2 == 0 else order[::-1]:
            if m not in runs:
                continue
            t0 = time.perf_counter()
            try:
                event = next(runs[m])
            except StopIteration:
                del runs[m]
                continue
            dt = time.perf_counter() - t0
            o = out[m]
            o["seconds"] += dt
            if isinstance(event, StageStarted):
                current[m] = f"it{event.iteration}-{event.stage.value}"
            if current[m] is not None:
                o["stage_seconds"][current[m]] = o["stage_seconds"].get(current[m], 0.0) + dt
            o["events"].append(event)
        i += 1
    return out


def check_identical(out: dict[str, dict]) -> dict:
    """Every image pixel-identical and every stage text identical between the modes (asserted)."""
    images = {m: [e for e in out[m]["events"] if isinstance(e, ImageCompleted)] for m in MODES}
    texts = {
        m: [e.text for e in out[m]["events"] if isinstance(e, StageCompleted) and e.text is not None]
        for m in MODES
    }
    assert len(images["reuse"]) == len(images["rebuild"]), "different numbers of images"
    diffs = [
        int(np.abs(a.pixels.astype(np.int16) - b.pixels.astype(np.int16)).max())
        for a, b in zip(images["reuse"], images["rebuild"], strict=True)
    ]
    identical = all(
        np.array_equal(a.pixels, b.pixels) for a, b in zip(images["reuse"], images["rebuild"], strict=True)
    )
    assert texts["reuse"] == texts["rebuild"], "the stage texts differ between reuse and rebuild"
    assert identical, f"images differ between reuse and rebuild: max abs pixel differences {diffs}"
    return {
        "images": len(diffs),
        "images_identical": identical,
        "max_abs_pixel_diff": max(diffs),
        "texts_identical": True,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_threads()
    engine = load_engine(small_checkpoint())
    eos = engine.tokenizer.eos_id
    pipelines = {"reuse": Pipeline(engine, reuse_cache=True), "rebuild": Pipeline(engine, reuse_cache=False)}
    quiet = wait_for_quiet()
    log("warm-up (one short generation) ...")
    warm = replace(
        params(1), draft=replace(DRAFT_DEFAULTS, steps=3), refine=replace(REFINE_DEFAULTS, steps=3)
    )
    for _ in pipelines["reuse"].run(
        replace(warm, plan=TextSettings(max_tokens=4), reflect=TextSettings(max_tokens=4))
    ):
        pass

    result = {
        "benchmark": "reuse_vs_rebuild",
        "machine": machine() | quiet,
        "config": small_sizes(),
        "dtype": str(engine.dtype),
        "request": {
            "prompt": PROMPT,
            "size": f"{SIZE}x{SIZE}",
            "num_timesteps": STEPS,
            "plan_tokens": PLAN_TOKENS,
            "reflect_tokens": REFLECT_TOKENS,
            "think": True,
            "seed": 0,
            "draft": "BAGEL text-to-image guidance (cfg_text 4, interval [0.4, 1]: 2 branches)",
            "refine": "BAGEL edit guidance (cfg_text 4, cfg_img 2, interval [0, 1]: 3 branches)",
        },
        "method": "reuse and rebuild pipelines in lockstep, event by event; each timed on its own events",
        "runs": {},
    }
    lines = [
        "reuse_vs_rebuild: the guided pipeline with one reused KV cache vs rebuilding every context per stage",
        f"small config {small_sizes()['llm']}, {engine.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"{SIZE}x{SIZE}, {STEPS} timesteps per image, plans {PLAN_TOKENS} tokens, reflections {REFLECT_TOKENS} "
        "tokens (EOS banned), every reflection 'unknown' -> all four stages every iteration",
        "",
        f"{'iters':>5}{'reuse s':>10}{'rebuild s':>11}{'ratio':>8}{'prefill reuse':>15}{'prefill rebuild':>17}"
        f"{'ratio':>8}{'cached (reuse)':>16}{'images equal':>14}{'others busy':>13}",
    ]
    for iterations in args.iterations:
        log(f"max_iterations {iterations}: reuse and rebuild in lockstep ...")
        meter = Interference().start()
        out = lockstep(pipelines, params(iterations), eos)
        other_busy = meter.stop()
        same = check_identical(out)
        verdicts = [e.verdict for e in out["reuse"]["events"] if isinstance(e, IterationCompleted)]
        assert len(verdicts) == iterations and all(v != Verdict.correct for v in verdicts), verdicts
        done = {m: next(e for e in out[m]["events"] if isinstance(e, Done)) for m in MODES}
        stages = [e for e in out["reuse"]["events"] if isinstance(e, StageCompleted)]
        assert len(stages) == 4 * iterations, f"expected {4 * iterations} stages, got {len(stages)}"
        run = {
            "stages": len(stages),
            "verdicts": [v.value for v in verdicts],
            "other_processes_busy_share": other_busy,
            **same,
        }
        for m in MODES:
            usage = done[m].usage
            run[m] = {
                "seconds": round(out[m]["seconds"], 3),
                "prefilled_tokens": usage["prefilled_tokens"],
                "cached_tokens": usage["cached_tokens"],
                "generated_tokens": usage["generated_tokens"],
                "denoising_steps": usage["denoising_steps"],
                "model_forwards": usage["model_forwards"],
                "stage_seconds": {k: round(v, 3) for k, v in out[m]["stage_seconds"].items()},
                "stage_prefilled_tokens": {
                    f"it{e.iteration}-{e.stage.value}": e.prefilled_tokens
                    for e in out[m]["events"]
                    if isinstance(e, StageCompleted)
                },
            }
        run["time_ratio_rebuild_over_reuse"] = round(run["rebuild"]["seconds"] / run["reuse"]["seconds"], 3)
        run["prefill_ratio_rebuild_over_reuse"] = round(
            run["rebuild"]["prefilled_tokens"] / run["reuse"]["prefilled_tokens"], 3
        )
        run["seconds_saved"] = round(run["rebuild"]["seconds"] - run["reuse"]["seconds"], 3)
        result["runs"][str(iterations)] = run
        lines.append(
            f"{iterations:>5}{run['reuse']['seconds']:>10.2f}{run['rebuild']['seconds']:>11.2f}"
            f"{run['time_ratio_rebuild_over_reuse']:>8.3f}{run['reuse']['prefilled_tokens']:>15}"
            f"{run['rebuild']['prefilled_tokens']:>17}{run['prefill_ratio_rebuild_over_reuse']:>8.2f}"
            f"{run['reuse']['cached_tokens']:>16}{same['images_identical']!s:>14}{other_busy:>13.0%}"
        )
        log(lines[-1])
    lines += [
        "",
        "ratio: rebuild / reuse. prefill: tokens run through the model by appends and rebuilds (decoded",
        "tokens excluded); cached (reuse): context tokens the reusing pipeline served from its caches.",
        "Images pixel-identical and texts identical between the two modes in every run (asserted).",
        "others busy: share of the cores other processes kept busy during that run (the machine is shared).",
    ]
    print("\n".join(lines), flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
