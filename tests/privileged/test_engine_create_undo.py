"""A failed create takes every process of the container's cgroup with it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from kata_agent.engine.cgroups import open_cgroup
from kata_agent.engine.create import discard_cgroup


def test_discard_cgroup_kills_lost_processes_then_removes_it() -> None:
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("host capability missing: cgroup hierarchy under /sys/fs/cgroup")
    cg = open_cgroup("", f"undo-{os.getpid()}")
    cg.create()
    # A process in the cgroup that no caller knows about, as an init whose launch
    # step timed out would be.
    lost = subprocess.Popen(["sleep", "600"])
    try:
        cg.add_process(lost.pid)
        assert lost.pid in cg.procs()
        discard_cgroup(cg)
        assert lost.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while any(os.path.isdir(d) for d in cg.paths().values()):
            assert time.monotonic() < deadline, "cgroup directories left behind"
            time.sleep(0.01)
    finally:
        if lost.poll() is None:
            lost.kill()
            lost.wait()
