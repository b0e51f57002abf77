"""`strokes` subcommands of training: train, train-export, data from-trajectories, data check.

    strokes data from-trajectories EXPORTS... --out DATA     service exports -> DATA/samples.jsonl
    strokes data check DATA/samples.jsonl [--checkpoint C]   validate (and count tokens)
    strokes train --data DATA/samples.jsonl --checkpoint C --out RUN [...]
    torchrun --nproc-per-node 8 -m strokes.service.cli train ...   (FSDP2 over 8 GPUs)
    strokes train-export RUN --out DIR [--as adapter|checkpoint]   from the run's latest checkpoint

`strokes train` has one flag per field of TrainConfig (model/training/config.py). Bad data, a
missing checkpoint or a resume that does not match is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from strokes.model.network.config import CheckpointError
        from strokes.model.training.checkpoint import ResumeError
        from strokes.model.training.samples import DataError
        from strokes.model.training.trajectories import ConversionError

        try:
            return command(args)
        except (DataError, CheckpointError, ResumeError, ConversionError, ValueError, OSError) as e:
            print(f"strokes {args.command}: error: {e}", file=sys.stderr)
            return 2

    return run


def _train(args: argparse.Namespace) -> int:
    from strokes.model.training.config import CONFIG_FIELDS, TrainConfig
    from strokes.model.training.trainer import train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in CONFIG_FIELDS})
    result = train(cfg)
    if result.export is not None:
        print(f"exported: {result.export}")
    return 0


def _train_export(args: argparse.Namespace) -> int:
    from strokes.model.training.export import export_run

    out = export_run(Path(args.run), Path(args.out), args.kind, args.step)
    print(f"exported: {out}")
    return 0


def _from_trajectories(args: argparse.Namespace) -> int:
    from strokes.model.training.trajectories import convert

    converted = convert([Path(p) for p in args.exports], Path(args.out), think=not args.no_think)
    for reason in converted.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    kinds: dict[str, int] = {}
    for s in converted.samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    print(
        f"{len(converted.samples)} samples ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items())) or 'none'}) "
        f"-> {Path(args.out) / 'samples.jsonl'}; {len(converted.skipped)} skipped"
    )
    if not converted.samples or (args.strict and converted.skipped):
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from strokes.model.training.samples import load_samples

    samples = load_samples(args.data)
    kinds: dict[str, int] = {}
    for s in samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    summary = {"samples": len(samples), "kinds": kinds}
    if args.checkpoint:
        from strokes.model.network.config import load_config
        from strokes.model.network.tokenizer import BagelTokenizer
        from strokes.model.training.data import geometry_of
        from strokes.model.training.plan import SpecialTokens, compile_sample, plan_tokens

        cfg = load_config(args.checkpoint)
        tok = BagelTokenizer.from_folder(args.checkpoint)
        special = SpecialTokens(tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image)
        geometry = geometry_of(cfg)
        tokens = [plan_tokens(compile_sample(s, tok.encode, special), geometry) for s in samples]
        summary.update(tokens_min=min(tokens), tokens_max=max(tokens), tokens_total=sum(tokens))
        too_long = [s.id for s, n in zip(samples, tokens, strict=True) if n > args.max_tokens]
        if too_long:
            print(
                f"{len(too_long)} samples exceed --max-tokens {args.max_tokens}: {too_long[:5]}",
                file=sys.stderr,
            )
            print(json.dumps(summary))
            return 1
    print(json.dumps(summary))
    return 0


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from strokes.model.training.config import CONFIG_FIELDS

    types = {"str": str, "int": int, "float": float}
    for f in CONFIG_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        required = f.default is None or f.default is MISSING
        if f.type == "bool":
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
        else:
            p.add_argument(
                flag,
                dest=f.name,
                type=types[f.type],
                default=None if required else f.default,
                required=required,
                choices=f.metadata.get("choices"),
                help=f.metadata["help"],
            )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune BAGEL on process trajectories (full or LoRA; torchrun for several GPUs)"
    )
    _add_config_flags(p)
    p.set_defaults(func=_user_errors(_train))

    p = sub.add_parser(
        "train-export", help="export a training run's checkpoint as an adapter or an official checkpoint"
    )
    p.add_argument("run", help="the run folder of `strokes train --out`")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--as",
        dest="kind",
        choices=["adapter", "checkpoint"],
        default="checkpoint",
        help="adapter (LoRA runs) or an official checkpoint (LoRA merged in)",
    )
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    p.set_defaults(func=_user_errors(_train_export))

    p = sub.add_parser("data", help="training data: convert trajectory exports, check a dataset")
    data = p.add_subparsers(
        dest="data_command", metavar="DATA_COMMAND", required=True, help="from-trajectories or check"
    )
    q = data.add_parser(
        "from-trajectories", help="service trajectory exports -> samples in the interleaved format"
    )
    q.add_argument(
        "exports", nargs="+", help="export folders (trajectory.json + images), or folders holding them"
    )
    q.add_argument("--out", required=True, help="the dataset folder to write (samples.jsonl + images/)")
    q.add_argument(
        "--no-think",
        action="store_true",
        help="without BAGEL's planning system prompt (serve with think off)",
    )
    q.add_argument("--strict", action="store_true", help="exit 1 when any trajectory is skipped")
    q.set_defaults(func=_user_errors(_from_trajectories))
    q = data.add_parser("check", help="validate a dataset file (and count tokens with --checkpoint)")
    q.add_argument("data", help="a samples.jsonl")
    q.add_argument("--checkpoint", default=None, help="a BAGEL checkpoint folder: tokenize and count tokens")
    q.add_argument("--max-tokens", type=int, default=32_768, help="the pack size to check samples against")
    q.set_defaults(func=_user_errors(_check))
