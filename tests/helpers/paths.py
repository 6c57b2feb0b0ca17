"""Where things are: the repository root and the tests' fixture bodies, named once so a
test file's place in the tree does not decide what it can find."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"
