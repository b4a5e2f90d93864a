"""Test tiers: the folder a test lives in gives its marker (unit, privileged, vm)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in ("unit", "privileged", "vm"):
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "privileged" and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="host capability missing: root (euid 0)"))
