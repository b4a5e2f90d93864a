"""systemd restarts a crashed agent and the new one keeps the sandbox: the container runs
on, the output it wrote before the crash is still there to read, and the new agent
manages it (exec, wait, remove, destroy).

The crash is typed into the guest's debug console (``agent.debug_console`` on a console
served on a unix socket): the operator's way to reach a guest whose agent misbehaves.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kata_agent.host import runner
from kata_agent.protocol import agent_pb2, oci_pb2

from tests.agent_process import wait_for
from tests.vm.console import run_on_console
from tests.vm.test_vm_containers import (
    BOOT_TIMEOUT,
    IMAGE_BUILD_TIMEOUT,
    Booted,
    add_container,
    boot,
    read_all,
    sandbox_storage,
)

KILL_AGENT = "kill -KILL $(systemctl show --property MainPID --value kata-agent.service)"


def crash_and_reconnect(guest: Booted, console: Path) -> None:
    readies = guest.vm.console_text().count("agent ready version=")
    guest.client.close()
    run_on_console(guest.vm, console, KILL_AGENT, BOOT_TIMEOUT, what="the kill of the agent")
    wait_for(lambda: guest.vm.console_text().count("agent ready version=") > readies,
             BOOT_TIMEOUT, "systemd to restart the agent")
    guest.client = runner.wait_for_agent(guest.vm, guest.vm.config.agent_socket or Path(),
                                         time.monotonic(), BOOT_TIMEOUT)


@pytest.mark.timeout(IMAGE_BUILD_TIMEOUT)  # the first boot may build the image
def test_systemd_restarts_the_agent_and_the_sandbox_lives_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console = tmp_path / "console.sock"
    with boot("x86_64", "systemd", "initrd", tmp_path, capsys,
              extra_args=("agent.debug_console",), console_socket=console) as guest:
        guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname="vmrestart", sandbox_id="sb-restart", storages=[sandbox_storage()]))
        add_container(guest, "c1", ["/bin/vmtool", "main"], tmp_path)
        guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c1"))
        pids = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
            container_id="c1", format="json")).process_list
        # Its output is not read before the crash: the pipes holding it must outlive the
        # agent.
        first_client = guest.client
        try:
            crash_and_reconnect(guest, console)
            restarted_sandbox(guest, pids)
        finally:
            if guest.client is not first_client:
                guest.client.close()


def restarted_sandbox(guest: Booted, pids: bytes) -> None:
    text = guest.vm.console_text()
    assert "event=sandbox_restored id=sb-restart containers=1" in text, text[-4000:]
    # The very same container process, untouched by the restart.
    assert guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id="c1", format="json")).process_list == pids
    exec_proc = oci_pb2.Process(Args=["/bin/vmtool", "echo", "after"], Env=["PATH=/bin"],
                                Cwd="/")
    guest.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="c1", exec_id="e1", process=exec_proc))
    assert read_all(guest, "ReadStdout", "c1", "e1") == b"after\n"
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="e1")).status == 0
    (guest.share / "c1" / "rootfs" / "tmp" / "release").touch()
    # Its exit status went to systemd with the first agent gone: reported as 255.
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="c1")).status == 255
    # Written before the crash, kept in the pipe the fd store held.
    assert read_all(guest, "ReadStdout", "c1", "c1") == b"out\n"
    assert read_all(guest, "ReadStderr", "c1", "c1") == b"err\n"
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert runner.shut_down(guest.vm) == 0
