"""The `strokes` command: one entry point whose subcommands live beside what they run.

Each subcommand module exposes `register(subparsers)`; importing torch happens only inside the
commands that need it, so `strokes api` starts without loading the model stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from pydantic import ValidationError

# Each module's `register(subparsers)` adds one or more subcommands.
COMMAND_MODULES: list[str] = [
    "strokes.model.commands",  # generate, make-tiny, conformance
    "strokes.model.training.commands",  # train, train-export, data
    "strokes.service.cli.api",  # api, openapi
    "strokes.service.cli.worker",
    "strokes.service.cli.serve",
    "strokes.service.cli.demo",
    "strokes.service.cli.webhooks",
    "strokes.service.cli.migrate",  # migrate-keys
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; None and False defaults are left out (the help
    says what leaving the flag out means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of `strokes` and of every subcommand: defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def port_in_use(host: str, port: int) -> str | None:
    """A one-line error when (host, port) cannot be listened on, else None. SO_REUSEADDR like the
    servers we start, so a port in TIME_WAIT is not reported."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc} (pick another port)"
    return None


def build_parser() -> argparse.ArgumentParser:
    try:
        v = version("strokes")
    except PackageNotFoundError:  # running from a source tree without install
        v = "0+unknown"
    parser = Parser(prog="strokes", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"strokes {v}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        for error in exc.errors():  # a malformed STROKES_* variable: one line each, no traceback
            name = "STROKES_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"strokes: setting {name} (or its flag): {error['msg']}", file=sys.stderr)
        return 2
