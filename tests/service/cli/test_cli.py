"""The `strokes` command line: help and defaults on every flag, one device default, and one-line
errors for ports in use (before anything claims to be running)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from testkit.paths import ROOT

from strokes.model import devices
from strokes.service.cli.main import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_has_help_and_its_default_is_shown(monkeypatch):
    for var in ("STROKES_DEVICE", "STROKES_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps a long default at its hyphens otherwise
    commands = _subcommands(build_parser())
    assert {"api", "worker", "serve", "generate", "conformance", "demo", "openapi"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"strokes {name} {action.dest}: no help"
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if shown:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_one_device_default_for_every_command(monkeypatch):
    monkeypatch.delenv("STROKES_DEVICE", raising=False)
    with_device = {
        name: next(a.default for a in parser._actions if a.dest == "device")
        for name, parser in _subcommands(build_parser()).items()
        if any(a.dest == "device" for a in parser._actions)
    }
    assert set(with_device) >= {"worker", "serve", "generate", "conformance"}
    assert set(with_device.values()) == {devices.AUTO}
    monkeypatch.setenv("STROKES_DEVICE", "cpu")
    assert devices.default() == "cpu"


def test_auto_resolves_to_cuda_when_available_else_cpu():
    import torch

    device, why = devices.resolve("auto")
    assert device == ("cuda:0" if torch.cuda.is_available() else "cpu") and why.startswith("auto")
    assert devices.resolve("cpu") == ("cpu", "as requested")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "args",
    [
        ["api", "--port", "{port}"],
        ["serve", "--port", "{port}", "--checkpoint", "missing"],
        ["serve", "--port", "0", "--worker-metrics-port", "{port}", "--checkpoint", "missing"],
        ["worker", "--metrics-port", "{port}", "--metrics-host", "127.0.0.1", "--checkpoint", "missing"],
    ],
    ids=["api", "serve", "serve-metrics", "worker-metrics"],
)
def test_a_port_in_use_is_a_one_line_error(taken_port: int, args: list[str]):
    argv = [a.format(port=taken_port) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert str(taken_port) in output and "Traceback" not in output and "API on" not in output


@pytest.mark.parametrize(
    "command, variable, value",
    [
        (["api", "--port", "0"], "STROKES_REDIS_TIMEOUT_S", "soon"),
        (["webhooks"], "STROKES_WEBHOOK_SECRET", "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw== whsec_!!"),
        (["worker", "--checkpoint", "missing"], "STROKES_QUEUE_CAP", "0"),
    ],
    ids=["api", "webhooks", "worker"],
)
def test_a_malformed_setting_is_a_one_line_error_that_does_not_echo_it(command, variable, value):
    done = subprocess.run(
        [sys.executable, "-m", "strokes.service.cli", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", variable: value},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert output.strip().splitlines() == [output.strip()] and output.startswith(
        f"strokes: setting {variable}"
    )
    assert "Traceback" not in output and value not in output and "c2VjcmV0" not in output


def test_building_the_command_loads_no_torch():
    """Every process starts by building the `strokes` parser (`strokes api` too): registering the
    subcommands must not load torch, whatever room they come from (the training options, say)."""
    probe = "import sys; from strokes.service.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
