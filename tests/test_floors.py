"""The version floors: `.ci/floors.txt` pins exactly the lower bounds that pyproject.toml states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower()


def test_floor_pins_equal_the_lower_bounds_in_pyproject():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        match = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        assert match, f"pyproject.toml: {requirement!r} has no lower bound"
        bounds[_name(requirement)] = match.group(1)
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    assert bounds == pins
