"""Where things are: the repository's root and the golden fixtures (tests never read /work/shared)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"
GOLDEN = FIXTURES / "golden"  # the official BAGEL run's recorded cases
TINY = GOLDEN / "tiny_ckpt"  # the tiny checkpoint those cases were recorded with
