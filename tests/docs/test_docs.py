"""The documentation keeps up with the code: every event is documented in docs/events.md, known to
the Python client and the studio, named only from service/shared/wire.py's list in the Lua scripts;
the README's links resolve, and every test file the repository names outside tests/ exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

from strokes_client.events import EVENT_TYPES
from testkit.paths import ROOT

from strokes.service.shared.wire import EVENT_NAMES


def test_every_event_is_documented_with_an_example():
    text = (ROOT / "docs" / "events.md").read_text()
    documented = re.findall(r"^### `([a-z_.]+)`", text, re.M)
    assert set(documented) == {*EVENT_NAMES, "error"}
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for section in sections:
        assert "```json" in section, section.splitlines()[0]


def test_the_client_knows_every_event():
    assert set(EVENT_TYPES) == {*EVENT_NAMES, "error"}


def test_lua_scripts_and_the_studio_name_only_listed_events_and_the_studio_handles_all():
    name = re.compile(r"""['"]((?:job|stage|text|image|iteration)\.[a-z_]+)['"]""")
    for path in [
        *(ROOT / "service" / "queue" / "lua").glob("*.lua"),
        *(ROOT / "service" / "api" / "studio").glob("*.js"),
    ]:
        unknown = set(name.findall(path.read_text())) - set(EVENT_NAMES)
        assert not unknown, f"{path.name} names events service/shared/wire.py does not list: {unknown}"
    handled = re.findall(
        r'case "([a-z_.]+)":', (ROOT / "service" / "api" / "studio" / "state.js").read_text()
    )
    assert set(handled) == set(EVENT_NAMES)


def test_readme_links_resolve():
    for readme in (ROOT / "README.md", ROOT / "clients" / "python" / "README.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", readme.read_text()):
            if not target.startswith("http"):
                assert (readme.parent / target).exists(), f"{readme.name}: {target}"
    assert "docs/events.md" in (ROOT / "README.md").read_text()
    assert "clients/python" in (ROOT / "README.md").read_text()


# Where the repository's prose and comments may name a test file (tests/ names its own).
NAMING_TESTS = (".md", ".py", ".sh", ".ini", ".toml", ".yaml", ".yml")
NOT_OURS = {".git", ".venv", "tests", "node_modules", "artifacts", "__pycache__"}


def _ours() -> list[Path]:
    """The repository's own text files outside tests/ (virtual environments and builds pruned)."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in NOT_OURS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(NAMING_TESTS) or name in ("Makefile", "Dockerfile"):
                found.append(Path(folder) / name)
    return found


def test_every_test_file_named_outside_the_tests_exists():
    """Docs, comments and scripts that point at a test (`tests/...py`) follow it when it moves."""
    missing = []
    for path in _ours():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for named in re.findall(r"\btests/[\w/]+\.py\b", line):
                if not (ROOT / named).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {named}")
    assert not missing, "\n".join(sorted(missing))
