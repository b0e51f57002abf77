"""The layering of model/: network <- generation <- training <- testing, and nothing in model/
imports service/ (spec, the torch-free vocabulary, imports none of the others).

Read from the source (lazy imports inside functions included), not from sys.modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2] / "model"

# What each subpackage must never import (prefixes of module names).
TRAINING = "strokes.model.training"
FORBIDDEN = {
    "spec": (
        "strokes.model.network",
        "strokes.model.generation",
        TRAINING,
        "strokes.model.testing",
        "strokes.service",
    ),
    "network": (
        "strokes.model.generation",
        TRAINING,
        "strokes.model.testing",
        "strokes.model.commands",
        "strokes.service",
    ),
    "generation": (TRAINING, "strokes.model.testing", "strokes.model.commands", "strokes.service"),
    "training": ("strokes.model.testing", "strokes.model.commands", "strokes.service"),
    "testing": ("strokes.model.commands", "strokes.service"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_a_subpackage_imports_only_what_lies_below_it(subpackage):
    files = sorted((MODEL / subpackage).glob("*.py"))
    assert len(files) > 1, f"model/{subpackage}/ is empty"
    for path in files:
        for name in imported_modules(path):
            bad = [p for p in FORBIDDEN[subpackage] if name == p or name.startswith(p + ".")]
            assert not bad, f"model/{subpackage}/{path.name} imports {name}"


def test_model_has_no_flat_modules_besides_the_cli():
    flat = {p.name for p in MODEL.glob("*.py")}
    assert flat == {"__init__.py", "commands.py", "devices.py"}, flat
