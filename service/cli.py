"""The `strokes` command: one entry point whose subcommands live beside what they run.

Each subcommand module exposes `register(subparsers)`; importing torch happens only inside the
commands that need it, so `strokes api` starts without loading the model stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

# (module, attribute) pairs; each `register(subparsers)` adds one or more subcommands.
COMMAND_MODULES: list[str] = [
    "model.commands",
    "service.api",
    "service.worker_cli",
    "service.serve",
    "service.demo",
    "service.bench",
]


def build_parser() -> argparse.ArgumentParser:
    try:
        v = version("strokes")
    except PackageNotFoundError:  # running from a source tree without install
        v = "0+unknown"
    parser = argparse.ArgumentParser(prog="strokes", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"strokes {v}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
