"""An agent killed and restarted by its service manager keeps the sandbox: containers keep
running, their stdio keeps flowing, and the new agent manages them.

The manager here is ``fdstore_supervisor.py`` (what systemd does with Type=notify,
Restart=on-failure and the fd store); the VM tier checks the same with systemd itself.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kata_agent.engine.state import pid_start_time
from kata_agent.host.client import AgentClient
from kata_agent.protocol import agent_pb2

from tests.agent_process import wait_for
from tests.privileged.conftest import run_guest
from tests.privileged.test_agent_lifecycle import (
    GuestAgent,
    cgroup_dirs,
    create_container,
    create_sandbox,
    process_pb,
    read_all,
    read_until,
    require_tools,
)

SUPERVISOR = Path(__file__).with_name("fdstore_supervisor.py")
ECHO_LOOP = ["sh", "-c", 'echo ready; while read line; do echo "echo:$line"; done; '
             'echo bye; exit 3']


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[GuestAgent]:
    require_tools()
    yield from run_guest(GuestAgent(tmp_path, wrapper=(sys.executable, str(SUPERVISOR),
                                                       str(tmp_path / "notify.sock"))))


def agent_pids(g: GuestAgent) -> list[int]:
    return [int(p) for p in re.findall(r"supervisor: agent started pid=(\d+)", g.log_text())]


def kill_and_reconnect(g: GuestAgent) -> int:
    """SIGKILL the agent as a crash would; wait for the supervisor's restart; reconnect."""
    old = agent_pids(g)[-1]
    readies = g.log_text().count("agent ready version=")
    assert g.client is not None
    g.client.__exit__(None, None, None)
    g.client = None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: g.log_text().count("agent ready version=") > readies, 60,
             "the restarted agent to be ready")
    g.client = AgentClient(f"unix-serial:{g.serial}")
    g.client.__enter__()
    g.check()
    new = agent_pids(g)[-1]
    assert new != old
    return new


def write(g: GuestAgent, cid: str, exec_id: str, data: bytes) -> None:
    g.call("WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, exec_id=exec_id,
                                                       data=data))


def test_containers_outlive_an_agent_crash(supervised: GuestAgent) -> None:
    g = supervised
    create_sandbox(g)
    cgroup = create_container(g, "c1", ECHO_LOOP)
    g.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c1"))
    assert b"ready" in read_until(g, "c1", "c1", b"ready")
    # A second process, exec'd, still running at the crash.
    g.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="c1", exec_id="e1", process=process_pb(["cat"])))
    pids_before = g.children()
    assert "fd_store" not in g.log_text()

    new_pid = kill_and_reconnect(g)
    log = g.log_text()
    # Three pipe ends for each of the two processes came back to the new agent.
    assert f"supervisor: agent started pid={new_pid} fds=6" in log
    assert "event=sandbox_restored id=sb1 containers=1" in log
    assert "event=stored_fd_unclaimed" not in log
    # The container's processes are the same ones: nothing was restarted.
    listed = g.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id="c1", format="json")).process_list
    assert len(listed) > 2
    # stdin and stdout of the init and of the exec'd process still work.
    write(g, "c1", "c1", b"after-restart\n")
    assert b"echo:after-restart" in read_until(g, "c1", "c1", b"echo:after-restart")
    write(g, "c1", "e1", b"cat-still-here\n")
    assert b"cat-still-here" in read_until(g, "c1", "e1", b"cat-still-here")
    # New processes are the new agent's own: their statuses are exact.
    g.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="c1", exec_id="e2", process=process_pb(["sh", "-c", "exit 7"])))
    assert g.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="e2")).status == 7
    # A process of the previous agent: its status went to the manager, it reads as 255.
    g.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id="c1", exec_id="e1"))
    assert g.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="e1")).status == 255
    g.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id="c1", exec_id="c1"))
    assert read_all(g, "c1", "c1").endswith(b"bye\n")
    assert g.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="c1")).status == 255
    g.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))
    assert cgroup_dirs(cgroup) == []
    g.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert "/run/kata-containers/sandbox/shm" not in g.mountinfo()
    # The first agent's zygote, the pause process and every container process are gone.
    assert len(pids_before) >= 6
    wait_for(lambda: all(pid_start_time(p) is None for p in pids_before), 30,
             "the first agent's processes to end")


def test_restart_without_a_sandbox_and_a_second_crash(supervised: GuestAgent) -> None:
    g = supervised
    kill_and_reconnect(g)
    assert "event=sandbox_restored" not in g.log_text()
    create_sandbox(g, pidns=False)
    create_container(g, "c2", ["sh", "-c", "echo one; read x; echo two-$x"])
    g.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c2"))
    read_until(g, "c2", "c2", b"one")
    kill_and_reconnect(g)
    kill_and_reconnect(g)  # the fds come back each time: the new agent stores them again
    write(g, "c2", "c2", b"x\n")
    assert b"two-x" in read_until(g, "c2", "c2", b"two-x")
    with pytest.raises(grpc.RpcError) as err:
        g.call("CreateSandbox", agent_pb2.CreateSandboxRequest(sandbox_id="again"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    g.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c2"))
    g.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
