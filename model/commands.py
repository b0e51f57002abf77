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
        from strokes.model.network.config import CheckpointError
        from strokes.model.spec.params import InvalidParams

        try:
            return command(args)
        except (CheckpointError, InvalidParams, OSError) as e:
            print(f"strokes {args.command}: error: {e}", file=sys.stderr)
            return 2

    return run


def _make_tiny(args: argparse.Namespace) -> int:
    import torch

    from strokes.model.testing.tiny import PRESETS, make_tiny

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
    from strokes.model import devices
    from strokes.model.testing.conformance import run_golden

    device, why = devices.resolve(args.device)
    print(f"device {device} ({why})", file=sys.stderr)
    started = time.perf_counter()
    lines, ok = run_golden(args.golden_dir, device=device, attn_impl=args.attn, dtype=args.dtype)
    train = Path(args.golden_dir) / "train"
    if train.is_dir() and args.dtype == "float32":  # the training cases: float32 only
        from strokes.model.testing.train_conformance import run_train_golden

        train_lines, train_ok = run_train_golden(train, Path(args.golden_dir) / "tiny_ckpt", device=device)
        lines, ok = [*lines, *train_lines], ok and train_ok
    for line in lines:
        print(line)
    print(f"{'all cases pass' if ok else 'SOME CASES FAIL'} ({time.perf_counter() - started:.1f} s)")
    return 0 if ok else 1


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from strokes.model.generation.loading import load_engine
    from strokes.model.generation.pipeline import Pipeline
    from strokes.model.spec.params import RunOptions

    out = Path(args.out)
    params, fork = _fork_from(args, out) if args.fork else (_new_params(args), None)
    from strokes.model import devices

    device, why = devices.resolve(args.device)
    print(f"loading {args.checkpoint} on {device} ({why}) ...", file=sys.stderr)
    engine = load_engine(args.checkpoint, device=device, dtype=args.dtype, adapter=args.adapter)
    print(f"loaded in {engine.load_seconds:.1f} s", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if params.input_image is not None:  # kept beside the trajectory, so that it can be forked
        Image.fromarray(params.input_image).save(out / "input.png")
    trajectory, final = None, None
    for event in Pipeline(engine).run(params, options=RunOptions(fork=fork)):
        _print_event(event, out)
        if event.name == "done":
            trajectory, final = event.trajectory, event.final_image_id
    (out / "trajectory.json").write_text(json.dumps(trajectory, indent=2, ensure_ascii=False) + "\n")
    print(f"trajectory: {out / 'trajectory.json'}")
    if final is None:
        from strokes.model.spec.events import NO_IMAGE_MESSAGE

        # The same outcome as the API's job.failed {type: no_image}: no picture, a non-zero exit.
        print(f"strokes generate: {NO_IMAGE_MESSAGE}", file=sys.stderr)
        return 1
    return 0


def _new_params(args: argparse.Namespace):
    import numpy as np
    from PIL import Image

    from strokes.model.spec.params import GenerationParams, ImageSettings, InvalidParams, TextSettings

    if not args.prompt:
        raise InvalidParams("prompt", "give a prompt (or --fork a trajectory.json)")
    input_image = None
    if args.image:
        with Image.open(args.image) as image:
            input_image = np.asarray(image.convert("RGB"))
    return GenerationParams(
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


def _fork_from(args: argparse.Namespace, out: Path):
    """The parent's parameters and the fork of its trajectory.json (images read beside it)."""
    import numpy as np
    from PIL import Image

    from strokes.model.spec.forks import ForkPoint, params_from_trajectory, plan_fork
    from strokes.model.spec.params import InvalidParams

    path = Path(args.fork)
    folder = path.parent
    if out.resolve() == folder.resolve():
        raise InvalidParams("--out", "must differ from the parent's folder (its files would be overwritten)")
    if args.prompt:
        raise InvalidParams("prompt", "a fork runs with its parent's prompt and settings; leave it out")
    try:
        trajectory = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidParams("--fork", f"{path} is not JSON: {e}") from None

    def load(name: str):  # an image id (it1-draft) is the file it1-draft.png
        with Image.open(folder / (name if name.endswith(".png") else f"{name}.png")) as image:
            return np.asarray(image.convert("RGB"))

    point = ForkPoint(text=args.text, instruction=args.instruction, parent=str(path))
    if args.at:
        iteration, _, stage = args.at.partition("/")
        if not iteration.isdigit() or not stage:
            raise InvalidParams("--at", "must be ITERATION/STAGE, e.g. 1/reflect")
        point.iteration, point.stage = int(iteration), stage
    fork = plan_fork(trajectory, point).load_images(load)
    input_image = load("input.png") if trajectory["settings"].get("starting_image") else None
    return params_from_trajectory(trajectory, input_image).validate(), fork


def _print_event(event, out: Path) -> None:
    from PIL import Image

    from strokes.model.spec.events import (
        ImageCompleted,
        ImageProgress,
        StageCompleted,
        StageStarted,
        TextDelta,
    )

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
        if event.inherited:
            print(f"(from the parent) {event.text or event.image_id}", end="", flush=True)
        extra = f" verdict={event.verdict.value}" if event.verdict else ""
        print(
            f"\n  done in {event.seconds:.2f} s (prefilled {event.prefilled_tokens} tokens, "
            f"{event.cached_tokens} from cache){extra}",
            end="",
            flush=True,
        )
    elif event.name == "done" and event.final_image_id is not None:
        print(
            f"\n\nfinal image: {out / event.final_image_id}.png after {event.iterations} "
            f"iteration(s), {event.seconds:.1f} s"
        )


def register(sub: argparse._SubParsersAction) -> None:
    from strokes.model import devices

    p = sub.add_parser("make-tiny", help="write a random tiny BAGEL checkpoint in the official layout")
    p.add_argument("folder", help="where to write the checkpoint (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model sizes")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vit-hidden", "vit-layers"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's size")
    p.set_defaults(func=_user_errors(_make_tiny))

    p = sub.add_parser(
        "conformance", help="replay golden cases of the official BAGEL code, exit 1 on a mismatch"
    )
    p.add_argument(
        "golden_dir", help="a folder with tiny_ckpt/ and cases/ (and train/: the training cases, in float32)"
    )
    p.add_argument("--device", default=devices.default(), help=devices.HELP)
    p.add_argument("--attn", choices=["sdpa", "reference"], default="sdpa", help="attention implementation")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="float32: conformance; bfloat16: the fast path within the bf16 bounds (docs/gpu.md)",
    )
    p.set_defaults(func=_user_errors(_conformance))

    p = sub.add_parser("generate", help="run a process-driven generation in-process and save its images")
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (not with --fork)")
    p.add_argument(
        "--checkpoint", required=True, help="a BAGEL checkpoint folder (or a Hugging Face repo id)"
    )
    p.add_argument("--device", default=devices.default(), help=devices.HELP)
    p.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--adapter", default=None, help="a LoRA adapter of `strokes train`, merged at load")
    p.add_argument("--out", default="out", help="folder for the images and trajectory.json")
    p.add_argument(
        "--protocol",
        choices=["guided", "interleaved"],
        default="guided",
        help="guided: the pipeline prompts each stage (public BAGEL); interleaved: the model drives "
        "the loop (checkpoints fine-tuned in the paper's format)",
    )
    p.add_argument("--width", type=int, default=1024, help="image width (multiple of 16)")
    p.add_argument("--height", type=int, default=1024, help="image height (multiple of 16)")
    p.add_argument("--max-iterations", type=int, default=3, help="draft-reflect-refine rounds at most")
    p.add_argument(
        "--steps", type=int, default=50, help="timesteps per draft (steps - 1 denoising steps run)"
    )
    p.add_argument(
        "--refine-steps", type=int, default=None, help="denoising steps per refinement (default: --steps)"
    )
    p.add_argument(
        "--max-text-tokens", type=int, default=512, help="token budget of each plan and reflection"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one)")
    p.add_argument("--image", default=None, help="a starting image (png, jpeg, webp)")
    p.add_argument("--no-think", action="store_true", help="without BAGEL's planning system prompt")
    p.add_argument(
        "--fork",
        default=None,
        metavar="TRAJECTORY_JSON",
        help="start from a saved run (its images beside it) with its prompt and settings",
    )
    p.add_argument("--at", default=None, metavar="ITERATION/STAGE", help="fork point, e.g. 1/reflect")
    p.add_argument("--text", default=None, help="replace the fork point's text (a plan or a reflection)")
    p.add_argument("--instruction", default=None, help="a follow-up instruction after the final image")
    p.set_defaults(func=_user_errors(_generate))
