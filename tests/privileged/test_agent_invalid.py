"""Hostile and mistaken requests: each gets a clear status, and the agent keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from kata_agent.protocol import agent_pb2

from tests.privileged.test_agent_lifecycle import (
    GuestAgent,
    container_spec,
    create_container,
    create_sandbox,
    make_rootfs,
    process_pb,
)

S = grpc.StatusCode


def expect(guest: GuestAgent, code: grpc.StatusCode, method: str, request: Any) -> None:
    assert guest.status(method, request) == code, f"{method} {request}"
    guest.check()  # still serving


def test_container_rpcs_before_sandbox(guest: GuestAgent) -> None:
    root = make_rootfs(guest, "early")
    expect(guest, S.FAILED_PRECONDITION, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="early", exec_id="early",
        OCI=container_spec(root, ["true"], "/kata-agent-test-early")))
    expect(guest, S.NOT_FOUND, "StartContainer",
           agent_pb2.StartContainerRequest(container_id="early"))
    # DestroySandbox without a sandbox is a no-op, as in the 1.x agent.
    assert guest.status("DestroySandbox", agent_pb2.DestroySandboxRequest()) == S.OK


def test_unknown_and_bad_ids(guest: GuestAgent) -> None:
    create_sandbox(guest)
    expect(guest, S.NOT_FOUND, "StartContainer",
           agent_pb2.StartContainerRequest(container_id="nope"))
    expect(guest, S.NOT_FOUND, "ReadStdout",
           agent_pb2.ReadStreamRequest(container_id="nope", exec_id="nope", len=10))
    expect(guest, S.NOT_FOUND, "WaitProcess",
           agent_pb2.WaitProcessRequest(container_id="nope", exec_id="x"))
    expect(guest, S.NOT_FOUND, "SignalProcess",
           agent_pb2.SignalProcessRequest(container_id="nope", signal=9))
    expect(guest, S.NOT_FOUND, "StatsContainer",
           agent_pb2.StatsContainerRequest(container_id="nope"))
    expect(guest, S.NOT_FOUND, "RemoveContainer",
           agent_pb2.RemoveContainerRequest(container_id="nope"))
    for bad in ("../x", "a/b", "", ".hidden", "x" * 300, "a\0b"):
        expect(guest, S.INVALID_ARGUMENT, "StartContainer",
               agent_pb2.StartContainerRequest(container_id=bad))
    root = make_rootfs(guest, "c1")
    expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="../c1", exec_id="c1", OCI=container_spec(root, ["true"], "/x")))
    expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="c1", exec_id="../../e", OCI=container_spec(root, ["true"], "/x")))

    create_container(guest, "c1", ["sleep", "1000"])
    expect(guest, S.NOT_FOUND, "WaitProcess",
           agent_pb2.WaitProcessRequest(container_id="c1", exec_id="other"))
    expect(guest, S.INVALID_ARGUMENT, "WriteStdin",
           agent_pb2.WriteStreamRequest(container_id="c1", exec_id="../c1", data=b"x"))
    expect(guest, S.ALREADY_EXISTS, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="c1", exec_id="c1", OCI=container_spec(root, ["true"], "/x")))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_bad_paths_and_specs(guest: GuestAgent) -> None:
    create_sandbox(guest)
    make_rootfs(guest, "p1")
    for root in ("/etc", "/run/kata-containers/../../etc", "../../../../etc"):
        expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
            container_id="p1", exec_id="p1", OCI=container_spec(root, ["true"], "/x")))
    spec = container_spec("/run/kata-containers/shared/containers/p1/rootfs", ["true"], "/x")
    spec.ClearField("Process")
    expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="p1", exec_id="p1", OCI=spec))
    spec = container_spec("/run/kata-containers/shared/containers/p1/rootfs", ["true"],
                          "/../../escape")
    expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="p1", exec_id="p1", OCI=spec))
    # A storage outside the agent's directories.
    expect(guest, S.INVALID_ARGUMENT, "CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="p1", exec_id="p1",
        OCI=container_spec("/run/kata-containers/shared/containers/p1/rootfs", ["true"], "/x"),
        storages=[agent_pb2.Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs",
                                    mount_point="/etc/evil")]))
    # CopyFile may not climb out of the shared directory.
    assert guest.status("CopyFile", agent_pb2.CopyFileRequest(
        path="/run/kata-containers/shared/containers/../../../../etc/evil", file_size=1,
        file_mode=0o644, offset=0, data=b"x")) != S.OK
    guest.check()
    assert not Path("/etc/evil").exists()
    # Nothing of the refused containers stayed behind: the id is free.
    create_container(guest, "p1", ["true"])
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_absurd_sizes_and_states(guest: GuestAgent) -> None:
    create_sandbox(guest)
    create_container(guest, "s1", ["sh", "-c", "cat >/dev/null; sleep 1000"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="s1"))
    expect(guest, S.FAILED_PRECONDITION, "StartContainer",
           agent_pb2.StartContainerRequest(container_id="s1"))
    expect(guest, S.INVALID_ARGUMENT, "ReadStdout",
           agent_pb2.ReadStreamRequest(container_id="s1", exec_id="s1", len=2**31))
    expect(guest, S.INVALID_ARGUMENT, "ReadStdout",
           agent_pb2.ReadStreamRequest(container_id="s1", exec_id="s1", len=0))
    expect(guest, S.INVALID_ARGUMENT, "WriteStdin",
           agent_pb2.WriteStreamRequest(container_id="s1", exec_id="s1", data=b"x" * (2 << 20)))
    # Above the message limit, grpc refuses before we see it.
    assert guest.status("WriteStdin", agent_pb2.WriteStreamRequest(
        container_id="s1", exec_id="s1", data=b"x" * (5 << 20))) in (
        S.RESOURCE_EXHAUSTED, S.INVALID_ARGUMENT)
    guest.check()
    expect(guest, S.INVALID_ARGUMENT, "SignalProcess",
           agent_pb2.SignalProcessRequest(container_id="s1", exec_id="s1", signal=0))
    expect(guest, S.INVALID_ARGUMENT, "SignalProcess",
           agent_pb2.SignalProcessRequest(container_id="s1", exec_id="s1", signal=99))
    expect(guest, S.INVALID_ARGUMENT, "ListProcesses",
           agent_pb2.ListProcessesRequest(container_id="s1", format="xml"))
    expect(guest, S.INVALID_ARGUMENT, "ListProcesses",
           agent_pb2.ListProcessesRequest(container_id="s1", format="table",
                                          args=["-ef; reboot"]))
    expect(guest, S.FAILED_PRECONDITION, "TtyWinResize",
           agent_pb2.TtyWinResizeRequest(container_id="s1", exec_id="s1", row=1, column=1))
    expect(guest, S.INVALID_ARGUMENT, "TtyWinResize",
           agent_pb2.TtyWinResizeRequest(container_id="s1", exec_id="s1", row=1 << 20))
    expect(guest, S.FAILED_PRECONDITION, "ResumeContainer",
           agent_pb2.ResumeContainerRequest(container_id="s1"))
    expect(guest, S.ALREADY_EXISTS, "ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="s1", exec_id="s1", process=process_pb(["true"])))
    expect(guest, S.INVALID_ARGUMENT, "ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="s1", exec_id="e1", process=process_pb([])))
    # A read that times out on the host side leaves nothing blocked in the agent.
    assert guest.status("ReadStdout", agent_pb2.ReadStreamRequest(
        container_id="s1", exec_id="s1", len=10), timeout=0.5) == S.DEADLINE_EXCEEDED
    assert guest.status("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="s1", exec_id="s1"), timeout=0.5) == S.DEADLINE_EXCEEDED
    guest.check()
    # Stdin still works after all that, and closing it lets `cat` finish.
    assert guest.call("WriteStdin", agent_pb2.WriteStreamRequest(
        container_id="s1", exec_id="s1", data=b"data\n")).len == 5
    guest.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id="s1", exec_id="s1"))
    expect(guest, S.OUT_OF_RANGE, "WriteStdin",
           agent_pb2.WriteStreamRequest(container_id="s1", exec_id="s1", data=b"x"))
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="s1",
                                                                  timeout=30))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert "Traceback" not in guest.log_text()
