"""`strokes bench NAME [ARGS...]`: run one of the repository's benchmarks (bench/NAME.py).

The benchmarks live in the source tree, not in the installed package: they need the bench/ folder of
a clone (an editable install, as `make install` makes). `strokes bench` with no name lists them with
the first line of each one's docstring. Arguments after NAME go to the script unchanged, so
`strokes bench gpu_bagel7b --dry-run` is `python bench/gpu_bagel7b.py --dry-run` run from the
repository root; the exit status is the script's.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def scripts(folder: Path = BENCH_DIR) -> dict[str, str]:
    """{name: one-line description} of every runnable benchmark in `folder`."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", "test_")) or path.stem == "common":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def run(args: argparse.Namespace) -> int:
    if not BENCH_DIR.is_dir():
        print(
            f"no bench/ folder beside this installation ({BENCH_DIR}): the benchmarks ship with the "
            "source tree; run `make install` in a clone of the repository",
            file=sys.stderr,
        )
        return 2
    available = scripts()
    if not args.name:
        for name, line in available.items():
            print(f"{name:<20} {line}")
        return 0
    if args.name not in available:
        print(
            f"unknown benchmark {args.name!r}; one of: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    script = BENCH_DIR / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.args], cwd=BENCH_DIR.parent)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (no name: list them)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("name", nargs="?", help="benchmark name (file bench/NAME.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=run)
