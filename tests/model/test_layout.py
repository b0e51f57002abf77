"""The layering of strokes.model: spec <- network <- generation <- training <- testing, each importing only
itself and the rooms before it; model/spec loads no torch, however indirectly (both processes import
it: the API to validate and price, the worker to run); nothing in the model imports the service.

Read from the source by testkit.imports (lazy imports inside functions included), not from
sys.modules.
"""

from __future__ import annotations

import pytest
from testkit.imports import TORCH, closure, imports_of, matches, modules_in
from testkit.paths import ROOT

ROOMS = ("spec", "network", "generation", "training", "testing")  # in order: each may import those before it
COMMANDS = ("strokes.model.commands",)  # the `strokes` subcommands' side
# model/devices.py (the device default, and each device's memory) is a leaf that rooms above spec
# may use: it imports nothing of the model, and torch only lazily (spec's own test keeps it out).


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_imports_only_itself_and_the_rooms_below_it(room: str):
    above = [f"strokes.model.{r}" for r in ROOMS[ROOMS.index(room) + 1 :]]
    modules = modules_in(f"strokes.model.{room}")
    assert len(modules) > 2, f"model/{room}/ is (nearly) empty"
    for module in modules:
        bad = sorted(n for n in imports_of(module) if matches(n, [*above, *COMMANDS]))
        assert not bad, f"{module} imports {bad}"


def test_spec_loads_no_torch_and_no_other_room_however_indirectly():
    reached = closure(modules_in("strokes.model.spec"))
    bad = {
        name: chain
        for name, chain in reached.items()
        if matches(name, TORCH)
        or (
            matches(name, ["strokes"])
            and not matches(name, ["strokes.model.spec"])
            and name != "strokes.model"
        )
    }
    assert not bad, "\n".join(bad.values())


def test_nothing_in_the_model_imports_the_service():
    for module in modules_in("strokes.model"):
        bad = sorted(n for n in imports_of(module) if matches(n, ["strokes.service"]))
        assert not bad, f"{module} imports {bad}"


def test_model_has_no_flat_modules_besides_the_cli():
    flat = {p.name for p in (ROOT / "model").glob("*.py")}
    assert flat == {"__init__.py", "commands.py", "devices.py"}, flat
    rooms = {p.name for p in (ROOT / "model").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(ROOMS), rooms


def test_the_reader_sees_lazy_imports_and_tells_them_from_import_time_ones():
    """The rules above rest on this: an import inside a function counts, unless only what runs at
    import is asked for (the worker's factory imports the model's generation in a function)."""
    lazy = "strokes.model.generation.loading"
    assert lazy in imports_of("strokes.service.worker.main")
    assert lazy not in imports_of("strokes.service.worker.main", at_import=True)
    assert "strokes.service.shared.settings" in imports_of("strokes.service.worker.main", at_import=True)
    # `from strokes.model import devices` names the module, and the packages above it
    assert {"strokes.model", "strokes.model.devices"} <= imports_of("strokes.model.commands")
