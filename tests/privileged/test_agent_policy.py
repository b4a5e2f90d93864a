"""The agent honours a deny-by-default policy file given on its kernel command line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kata_agent.protocol import agent_pb2

from tests.agent_process import AgentProcess
from tests.privileged.test_agent_lifecycle import (
    GuestAgent,
    create_sandbox,
    make_rootfs,
    process_pb,
    require_tools,
)
from tests.privileged.test_agent_lifecycle import (
    container_spec as spec_for,
)

POLICY = {
    "allow_rpcs": ["CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer",
                   "ExecProcess", "WaitProcess", "RemoveContainer"],
    "containers": {
        "allowed_commands": [["sh", "-c", "sleep *"]],
        "allowed_images": ["/run/kata-containers/shared/containers/*/rootfs"],
    },
    "exec": {"allowed_commands": [["true"]]},
}


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[GuestAgent]:
    require_tools()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    g = GuestAgent(tmp_path, cmdline=f"agent.policy={policy}")
    try:
        g.start()
        yield g
    finally:
        code = g.stop()
    assert code == 0, g.log_text()


def create(guest: GuestAgent, cid: str, args: list[str]) -> grpc.StatusCode:
    root = make_rootfs(guest, cid)
    return guest.status("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=spec_for(root, args, f"/kata-policy-{cid}")))


def test_policy_limits_rpcs_containers_and_execs(guarded: GuestAgent) -> None:
    g = guarded
    g.check()  # always allowed
    assert g.status("ListInterfaces", agent_pb2.ListInterfacesRequest()) == \
        grpc.StatusCode.PERMISSION_DENIED
    create_sandbox(g)
    assert create(g, "denied", ["sh", "-c", "cat /etc/shadow"]) == \
        grpc.StatusCode.PERMISSION_DENIED
    # Nothing was created for the refused container.
    assert g.status("StartContainer", agent_pb2.StartContainerRequest(container_id="denied")) \
        == grpc.StatusCode.NOT_FOUND
    assert create(g, "allowed", ["sh", "-c", "sleep 30"]) == grpc.StatusCode.OK
    g.call("StartContainer", agent_pb2.StartContainerRequest(container_id="allowed"))
    refused = agent_pb2.ExecProcessRequest(container_id="allowed", exec_id="e1",
                                           process=process_pb(["cat", "/etc/passwd"]))
    assert g.status("ExecProcess", refused) == grpc.StatusCode.PERMISSION_DENIED
    ok = agent_pb2.ExecProcessRequest(container_id="allowed", exec_id="e2",
                                      process=process_pb(["true"]))
    assert g.status("ExecProcess", ok) == grpc.StatusCode.OK
    status = g.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id="allowed",
                                                                exec_id="e2"))
    assert status.status == 0
    g.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="allowed",
                                                               timeout=5))
    g.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_a_bad_policy_file_keeps_the_agent_from_starting(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow_rpcs": ["NoSuchRpc"]}))
    agent = AgentProcess(tmp_path, f"unix-serial:{tmp_path / 's.sock'}",
                         extra=["--policy", str(policy)])
    try:
        code = agent.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        agent.stop()
        raise
    agent.stop()
    assert code == 2
    assert "policy refused, not starting" in agent.log_text()
