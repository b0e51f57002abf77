"""The service's rooms say which process they run in, and these rules hold them (docs/architecture.md).
Read from the source by testkit.imports, lazy imports inside functions included, and followed
through every strokes module reached, so a rule cannot be dodged through another room:

    room (and all it reaches)           never reaches
    api (the API process)               torch, the model but model/spec, worker, webhooks, cli
    queue, blobs, shared (every process) the same, and api
    worker                              api (routes, schemas, errors), webhooks, cli
    webhooks (the dispatcher process)   torch, the model but model/spec, api, worker, cli

and the `strokes` command, as every process starts (cli/main.py imports each command's module to
register it) imports no room's process code: each command imports its room when it runs, so the
API process holds no worker code and a worker none of the API's routes.
"""

from __future__ import annotations

import pytest
from testkit.imports import TORCH, closure, matches, modules_in
from testkit.paths import ROOT

from strokes.service.cli.main import COMMAND_MODULES

S = "strokes.service"
MODEL_BUT_SPEC = (
    "strokes.model.network",
    "strokes.model.generation",
    "strokes.model.testing",
    "strokes.model.commands",
    "strokes.model.devices",
)
LIBRARY_ROOMS = ("queue", "blobs", "shared")  # used by every process
ROOMS = ("api", "worker", "webhooks", "cli", *LIBRARY_ROOMS)
NEVER = {
    "api": (*TORCH, *MODEL_BUT_SPEC, f"{S}.worker", f"{S}.webhooks", f"{S}.cli"),
    **{
        room: (*TORCH, *MODEL_BUT_SPEC, f"{S}.api", f"{S}.worker", f"{S}.webhooks", f"{S}.cli")
        for room in LIBRARY_ROOMS
    },
    "worker": (f"{S}.api", f"{S}.webhooks", f"{S}.cli"),
    "webhooks": (*TORCH, *MODEL_BUT_SPEC, f"{S}.api", f"{S}.worker", f"{S}.cli"),
}
# What starting the `strokes` command may not import before a command runs.
NEVER_AT_START = (*TORCH, *MODEL_BUT_SPEC[:3], f"{S}.api", f"{S}.worker", f"{S}.webhooks")


def _violations(reached: dict[str, str], never: tuple[str, ...]) -> list[str]:
    """The chains into a forbidden module from an allowed one (not those inside a forbidden room)."""
    bad = []
    for name, chain in reached.items():
        hops = chain.split(" -> ")
        if matches(name, never) and (len(hops) < 2 or not matches(hops[-2], never)):
            bad.append(chain)
    return sorted(bad)


@pytest.mark.parametrize("room", sorted(NEVER))
def test_a_room_never_reaches_what_its_process_must_not_hold(room: str):
    modules = modules_in(f"{S}.{room}")
    assert len(modules) > 2, f"service/{room}/ is (nearly) empty"
    bad = _violations(closure(modules), NEVER[room])
    assert not bad, f"service/{room} reaches:\n" + "\n".join(bad)


def test_starting_the_strokes_command_imports_no_rooms_process_code():
    started = closure([*modules_in(f"{S}.cli"), *COMMAND_MODULES], at_import=True)
    bad = _violations(started, NEVER_AT_START)
    assert not bad, "importing the `strokes` command imports:\n" + "\n".join(bad)


def test_every_module_of_the_service_is_in_a_room():
    flat = {p.name for p in (ROOT / "service").glob("*.py")}
    assert flat == {"__init__.py"}, flat
    rooms = {p.name for p in (ROOT / "service").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(ROOMS), rooms
