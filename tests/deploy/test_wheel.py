"""The wheel a user installs: built from the repository's own files (pip, no network), it holds one
top-level package, `strokes` (model/ as strokes.model, service/ as strokes.service), every module and
data file of those two folders (the Lua scripts, the studio's files), and nothing else: no test,
benchmark or client module (the client is its own distribution, strokes_client)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from testkit.paths import ROOT

FOLDERS = {"model": "strokes/model", "service": "strokes/service"}  # pyproject's package-dir
DATA = ("service/queue/lua", "service/api/studio")  # files the package reads at run time


def _sources() -> dict[str, Path]:
    """What the wheel must carry, by its path inside it: every module of model/ and service/, and
    their data (the queue's Lua scripts, the studio's page)."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            relative = path.relative_to(ROOT).as_posix()
            if path.suffix == ".py" or relative.startswith(tuple(d + "/" for d in DATA)):
                out[f"{package}/{path.relative_to(ROOT / folder).as_posix()}"] = path
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of what the build reads (so the build writes nothing here)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for path in _sources().values():
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("strokes-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_wheel_holds_strokes_alone(wheel: zipfile.ZipFile):
    top = {name.split("/")[0] for name in wheel.namelist()}
    (dist_info,) = [t for t in top if t.endswith(".dist-info")]
    assert top == {"strokes", dist_info}, top


def test_every_module_and_data_file_of_model_and_service_is_in_it_and_nothing_else(wheel: zipfile.ZipFile):
    shipped = {name for name in wheel.namelist() if name.startswith("strokes/")}
    expected = set(_sources())
    assert expected - shipped == set(), "missing from the wheel"
    assert shipped - expected == set(), "in the wheel but not in model/ or service/"
    assert any(name.endswith(".lua") for name in shipped)  # the queue's scripts ...
    assert "strokes/service/api/studio/index.html" in shipped  # ... and the studio's files are data
    for name, path in _sources().items():
        assert wheel.read(name) == path.read_bytes(), name


def test_no_test_bench_or_client_module_is_shipped(wheel: zipfile.ZipFile):
    names = wheel.namelist()
    banned = [
        n
        for n in names
        if n.startswith(("tests/", "bench/", "clients/", "strokes_client/"))
        or Path(n).name.startswith("test_")
        or Path(n).name == "conftest.py"
    ]
    assert banned == [], banned


def test_the_strokes_command_is_the_entry_point(wheel: zipfile.ZipFile):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    lines = wheel.read(entry_points).decode().splitlines()
    assert "strokes = strokes.service.cli.main:main" in [line.strip() for line in lines]
