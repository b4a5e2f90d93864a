"""Faults the agent must survive: a host that drops the connection, an OOM kill, a
process flooding stdout that nobody reads.

An agent restarted by systemd needs a booted guest with systemd: that case belongs to the VM
tier (tests/vm), not here.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid

import grpc
import pytest
from kata_agent.host.client import AgentClient
from kata_agent.protocol import agent_pb2

from tests.agent_process import wait_for
from tests.privileged.test_agent_lifecycle import (
    RPC_TIMEOUT,
    GuestAgent,
    cgroup_dirs,
    container_spec,
    create_container,
    create_sandbox,
    make_rootfs,
    read_all,
    read_until,
)
from tests.reliability.budget import flood_seconds
from tests.reliability.gauge import rss_bytes, threads_in_poll

log = logging.getLogger(__name__)
OOM_STATUS = 128 + signal.SIGKILL


def reconnect(g: GuestAgent) -> None:
    """Drop the host's connection (yamux session and all its streams) and dial again."""
    assert g.client is not None
    g.client.__exit__(None, None, None)
    g.client = AgentClient(f"unix-serial:{g.serial}")
    g.client.__enter__()


def write_stdin(g: GuestAgent, cid: str, data: bytes) -> None:
    n = g.call("WriteStdin", agent_pb2.WriteStreamRequest(
        container_id=cid, exec_id=cid, data=data)).len
    assert n == len(data)


def test_host_disconnects_mid_read_and_reconnects(guest: GuestAgent) -> None:
    create_sandbox(guest)
    cid = "echo"
    cgroup = create_container(guest, cid, ["cat"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    write_stdin(guest, cid, b"before\n")
    assert read_until(guest, cid, cid, b"before\n") == b"before\n"

    # A read blocked in the agent when the host goes away.
    pid = guest.proc.pid
    polling = threads_in_poll(pid)
    blocked = guest.agent.ReadStdout.future(agent_pb2.ReadStreamRequest(
        container_id=cid, exec_id=cid, len=4096), timeout=RPC_TIMEOUT)
    wait_for(lambda: threads_in_poll(pid) == polling + 1, 30,
             "the agent to block in the read")
    assert not blocked.done()
    old_client = guest.client
    reconnect(guest)
    assert guest.client is not old_client
    with pytest.raises(grpc.RpcError) as err:
        blocked.result(timeout=RPC_TIMEOUT)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    # The agent noticed: the abandoned read no longer holds a thread.
    wait_for(lambda: threads_in_poll(pid) == polling, 30, "the abandoned read to end")

    # The container and its state survived; output flows to the new connection, and the
    # abandoned read did not swallow it.
    guest.check()
    listed = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id=cid, format="json")).process_list
    assert listed.strip() not in (b"", b"[]", b"null")
    for n in range(3):
        line = f"after-{n}\n".encode()
        write_stdin(guest, cid, line)
        assert read_until(guest, cid, cid, line) == line

    # Output written while nobody is connected waits in the pipe for the next host.
    write_stdin(guest, cid, b"while-away\n")
    reconnect(guest)
    assert read_until(guest, cid, cid, b"while-away\n") == b"while-away\n"

    guest.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id=cid, exec_id=cid))
    assert read_all(guest, cid, cid) == b""
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid)).status == 0
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_oom_kill_leaves_agent_serving(guest: GuestAgent) -> None:
    """test_agent_lifecycle checks GetOOMEvent names the container; this checks what follows:
    the agent lives, reports the kill as the exit status, and cleans up."""
    create_sandbox(guest)
    cid = "hog"
    root = make_rootfs(guest, cid)
    cgroup = f"/kata-agent-test-{uuid.uuid4().hex[:12]}"
    spec = container_spec(root, ["sh", "-c", "x=a; while :; do x=$x$x; done"], cgroup)
    spec.Linux.Resources.Memory.Limit = 16 << 20
    spec.Linux.Resources.Memory.Swap = 16 << 20
    event = guest.agent.GetOOMEvent.future(agent_pb2.GetOOMEventRequest(), timeout=RPC_TIMEOUT)
    guest.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=spec))
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    assert event.result().container_id == cid
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid)).status == OOM_STATUS
    assert guest.proc.poll() is None, "the agent itself was killed"
    guest.check()
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []

    # The next container runs normally.
    create_container(guest, "next", ["sh", "-c", "echo alive"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="next"))
    assert read_all(guest, "next", "next") == b"alive\n"
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="next", exec_id="next")).status == 0
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


# Allowed growth of the agent's RSS while a process floods an unread stdout: buffering a
# pipe's worth is fine, buffering the flood is not (`yes` writes gigabytes in the window).
FLOOD_RSS_GROWTH = 0.10


def test_unread_stdout_flood_keeps_agent_rss_bounded(guest: GuestAgent) -> None:
    pid = guest.proc.pid
    create_sandbox(guest)
    cid = "flood"
    cgroup = create_container(guest, cid, ["yes"])
    before = rss_bytes(pid)
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    window = flood_seconds()
    peak = before
    end = time.monotonic() + window
    while time.monotonic() < end:
        time.sleep(1.0)  # a measuring window, not a wait for a condition
        peak = max(peak, rss_bytes(pid))
    guest.check()
    log.info("flood seconds=%d rss_before=%d rss_peak=%d", window, before, peak)
    assert peak <= before * (1 + FLOOD_RSS_GROWTH), f"agent RSS {before} -> {peak} during flood"

    # The stream still works and carries what `yes` wrote.
    data = guest.call("ReadStdout", agent_pb2.ReadStreamRequest(
        container_id=cid, exec_id=cid, len=65536)).data
    assert data and set(data.split(b"\n")[:-1]) == {b"y"}
    guest.call("SignalProcess", agent_pb2.SignalProcessRequest(
        container_id=cid, exec_id=cid, signal=signal.SIGKILL))
    rest = read_all(guest, cid, cid)
    assert set((data + rest).split(b"\n")[:-1]) == {b"y"}
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid)).status == 128 + signal.SIGKILL
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())

