"""Fixtures shared by the privileged tests: a real agent, and a kata-oci state root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.test_agent_lifecycle import GuestAgent, require_tools
from tests.privileged.test_oci_cli import Runtime, cgroup_dirs


def run_guest(g: GuestAgent) -> Iterator[GuestAgent]:
    """Start ``g``, hand it to the test, and check it stops cleanly afterwards."""
    try:
        g.start()
        yield g
    finally:
        code = g.stop()
    assert code == 0, g.log_text()


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[GuestAgent]:
    """An agent in its own namespaces with a connected client; it must stop cleanly."""
    require_tools()
    yield from run_guest(GuestAgent(tmp_path))


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    """A kata-oci state root; every container created through it is gone afterwards."""
    r = Runtime(tmp_path)
    yield r
    for cid in r.ids:
        r.cli("delete", "--force", cid)
    for cid in r.ids:
        assert not (r.root / cid).exists(), f"state of {cid} left behind"
        assert cgroup_dirs(cid) == [], f"cgroup of {cid} left behind"
