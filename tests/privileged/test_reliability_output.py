"""No output lost: a process prints a known 1 MiB pattern and exits, R times; every byte
arrives, in order, every time. Raise R with KATA_OUTPUT_RUNS (``make soak``).

The pattern is random bytes (fixed seed), so a dropped, repeated or reordered chunk cannot
go unnoticed the way it could in repetitive text. The host reads with varying chunk sizes,
including ones that do not divide the pipe size, and the first read races the process start.
"""

from __future__ import annotations

import logging
import random
import time

from kata_agent.protocol import agent_pb2

from tests.privileged.test_agent_lifecycle import (
    RPC_TIMEOUT,
    GuestAgent,
    cgroup_dirs,
    create_container,
    create_sandbox,
    make_rootfs,
    process_pb,
    read_all,
)
from tests.reliability.budget import output_runs

log = logging.getLogger(__name__)
PATTERN_SIZE = 1 << 20
# Read sizes: odd, page, pipe, whole pattern, prime.
CHUNKS = (7000, 4096, 65536, 1 << 20, 1021)


def pattern() -> bytes:
    return random.Random(0x6B617461).randbytes(PATTERN_SIZE)


def test_every_byte_arrives_every_run(guest: GuestAgent) -> None:
    create_sandbox(guest)
    cid = "out"
    expected = pattern()
    root = make_rootfs(guest, cid)
    (guest.tmp / "shared" / cid / "rootfs" / "pattern").write_bytes(expected)
    assert root.endswith("/rootfs")
    cgroup = create_container(guest, cid, ["sleep", "1000000"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))

    runs = output_runs()
    started = time.monotonic()
    for run in range(runs):
        exec_id = f"cat-{run}"
        chunk = CHUNKS[run % len(CHUNKS)]
        guest.call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, process=process_pb(["cat", "/pattern"])))
        got = read_all(guest, cid, exec_id, chunk=chunk)
        assert len(got) == PATTERN_SIZE, f"run {run}: {len(got)} bytes"
        assert got == expected, f"run {run}: content differs (chunk {chunk})"
        status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=cid, exec_id=exec_id)).status
        assert status == 0, f"run {run}: exit {status}"
    elapsed = time.monotonic() - started
    log.info("output runs=%d seconds=%.1f per_run=%.3f", runs, elapsed, elapsed / runs)

    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_every_byte_arrives_from_a_container_init(guest: GuestAgent) -> None:
    """The same check on a container's own init, with WaitProcess already waiting: the exit
    is reported only after the last byte was read."""
    create_sandbox(guest)
    expected = pattern()
    for run in range(3):
        cid = f"init-{run}"
        make_rootfs(guest, cid)
        (guest.tmp / "shared" / cid / "rootfs" / "pattern").write_bytes(expected)
        cgroup = create_container(guest, cid, ["cat", "/pattern"])
        guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        waiter = guest.agent.WaitProcess.future(agent_pb2.WaitProcessRequest(
            container_id=cid, exec_id=cid), timeout=RPC_TIMEOUT)
        assert read_all(guest, cid, cid, chunk=CHUNKS[run]) == expected
        assert waiter.result().status == 0
        guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
        assert cgroup_dirs(cgroup) == []
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
