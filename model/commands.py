"""`strokes` subcommands that run the model in-process: make-tiny, conformance, generate.

They print progress for people; the model code they call never prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A missing or broken checkpoint, golden folder or input is the user's to fix: one line on
    stderr and exit status 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from model.config import CheckpointError
        from model.params import InvalidParams

        try:
            return command(args)
        except (CheckpointError, InvalidParams, OSError) as e:
            print(f"strokes {args.command}: error: {e}", file=sys.stderr)
            return 2

    return run


def _make_tiny(args: argparse.Namespace) -> int:
    import torch

    from model.tiny import PRESETS, make_tiny

    sizes = PRESETS[args.preset]
    overrides = {
        k: v
        for k, v in {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "intermediate": args.intermediate,
            "vit_hidden": args.vit_hidden,
            "vit_layers": args.vit_layers,
        }.items()
        if v is not None
    }
    if overrides:
        from dataclasses import replace

        sizes = replace(sizes, **overrides)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    folder = make_tiny(args.folder, seed=args.seed, sizes=sizes, dtype=dtype)
    print(f"wrote a random {args.preset} BAGEL checkpoint to {folder}")
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from model.conformance import run_golden

    started = time.perf_counter()
    lines, ok = run_golden(args.golden_dir, device=args.device, attn_impl=args.attn)
    for line in lines:
        print(line)
    print(f"{'all cases pass' if ok else 'SOME CASES FAIL'} ({time.perf_counter() - started:.1f} s)")
    return 0 if ok else 1


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from model.events import (
        NO_IMAGE_MESSAGE,
        ImageCompleted,
        ImageProgress,
        StageCompleted,
        StageStarted,
        TextDelta,
    )
    from model.loading import load_engine
    from model.params import GenerationParams, ImageSettings, TextSettings
    from model.pipeline import Pipeline

    out = Path(args.out)
    input_image = None
    if args.image:
        with Image.open(args.image) as image:
            input_image = np.asarray(image.convert("RGB"))
    params = GenerationParams(
        prompt=args.prompt,
        protocol=args.protocol,
        width=args.width,
        height=args.height,
        max_iterations=args.max_iterations,
        seed=args.seed,
        think=not args.no_think,
        draft=ImageSettings(steps=args.steps),
        input_image=input_image,
        refine=ImageSettings(
            steps=args.refine_steps or args.steps,
            cfg_img_scale=2.0,
            cfg_interval=(0.0, 1.0),
            cfg_renorm_type="text_channel",
        ),
        plan=TextSettings(max_tokens=args.max_text_tokens),
        reflect=TextSettings(max_tokens=args.max_text_tokens),
    ).validate()
    print(f"loading {args.checkpoint} on {args.device} ...", file=sys.stderr)
    engine = load_engine(args.checkpoint, device=args.device, dtype=args.dtype)
    print(f"loaded in {engine.load_seconds:.1f} s", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    trajectory, final = None, None
    for event in Pipeline(engine).run(params):
        if isinstance(event, StageStarted):
            print(f"\n[iteration {event.iteration}] {event.stage.value}: ", end="", flush=True)
        elif isinstance(event, TextDelta):
            print(event.delta, end="", flush=True)
        elif isinstance(event, ImageProgress):
            filled = event.step * 30 // event.steps
            print(
                f"\r[iteration {event.iteration}] {event.stage.value}: [{'#' * filled}{'.' * (30 - filled)}] "
                f"{event.step}/{event.steps}",
                end="",
                flush=True,
            )
        elif isinstance(event, ImageCompleted):
            Image.fromarray(event.pixels).save(out / f"{event.image_id}.png")
        elif isinstance(event, StageCompleted):
            extra = f" verdict={event.verdict.value}" if event.verdict else ""
            print(
                f"\n  done in {event.seconds:.2f} s (prefilled {event.prefilled_tokens} tokens, "
                f"{event.cached_tokens} from cache){extra}",
                end="",
                flush=True,
            )
        elif event.name == "done":
            trajectory, final = event.trajectory, event.final_image_id
            if final is not None:
                print(
                    f"\n\nfinal image: {out / final}.png after {event.iterations} "
                    f"iteration(s), {event.seconds:.1f} s"
                )
    (out / "trajectory.json").write_text(json.dumps(trajectory, indent=2, ensure_ascii=False) + "\n")
    print(f"trajectory: {out / 'trajectory.json'}")
    if final is None:
        # The same outcome as the API's job.failed {type: no_image}: no picture, a non-zero exit.
        print(f"strokes generate: {NO_IMAGE_MESSAGE}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a random tiny BAGEL checkpoint in the official layout")
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vit-hidden", "vit-layers"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's size")
    p.set_defaults(func=_user_errors(_make_tiny))

    p = sub.add_parser(
        "conformance", help="replay golden cases of the official BAGEL code, exit 1 on a mismatch"
    )
    p.add_argument("golden_dir", help="a folder with tiny_ckpt/ and cases/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", choices=["sdpa", "reference"], default="sdpa")
    p.set_defaults(func=_user_errors(_conformance))

    p = sub.add_parser("generate", help="run a process-driven generation in-process and save its images")
    p.add_argument("prompt")
    p.add_argument(
        "--checkpoint", required=True, help="a BAGEL checkpoint folder (or a Hugging Face repo id)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--out", default="out")
    p.add_argument("--protocol", choices=["guided", "interleaved"], default="guided")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--max-iterations", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="denoising steps per draft")
    p.add_argument("--refine-steps", type=int, default=None)
    p.add_argument("--max-text-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--image", default=None, help="a starting image (png, jpeg, webp)")
    p.add_argument("--no-think", action="store_true", help="without BAGEL's planning system prompt")
    p.set_defaults(func=_user_errors(_generate))
