"""The whole container lifecycle, driven through a real agent as a Kata 1.x runtime does.

The agent runs in fresh mount, UTS and network namespaces (``unshare``) holding a
veth pair, with an overlay on /etc (so resolv.conf writes stay private) and a tmpfs on /run whose
shared-containers directory is a bind of the test's scratch directory. It is reached over
the unix-serial channel with the host's yamux client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent.host.client import AgentClient
from kata_agent.protocol import agent_pb2, health_pb2, oci_pb2, types_pb2

from tests.agent_process import wait_for

BUSYBOX = "/bin/busybox"
SHARED = "/run/kata-containers/shared/containers"
MAC = "02:00:00:4b:41:54"
APPLETS = ("sh", "echo", "cat", "sleep", "head", "dd", "tr", "hostname", "true", "ls", "stty",
           "printf", "yes", "seq")
RPC_TIMEOUT = 60


def require_tools() -> None:
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"host capability missing: {tool}")
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"host capability missing: {BUSYBOX} (busybox-static)")
    if not os.path.isdir("/sys/fs/cgroup/memory") and not os.path.exists(
            "/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("host capability missing: a memory cgroup controller")


WRAPPER = """set -e
ip link set lo up
ip link add eth0 address {mac} type veth peer name peer0
mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/etc-upper,workdir={tmp}/etc-work /etc
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p {shared}
mount --bind {tmp}/shared {shared}
exec "$@"
"""


class GuestAgent:
    """An agent process in its own namespaces plus a connected client."""

    def __init__(self, tmp: Path, cmdline: str = "", wrapper: Sequence[str] = ()) -> None:
        self.tmp = tmp
        for d in ("etc-upper", "etc-work", "shared", "run"):
            (tmp / d).mkdir()
        self.serial = tmp / "serial.sock"
        (tmp / "cmdline").write_text(f"agent.log=debug {cmdline}\n")
        (tmp / "wrap.sh").write_text(WRAPPER.format(mac=MAC, tmp=tmp, shared=SHARED))
        self.log_path = tmp / "agent.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--net", "--propagation", "private",
             "sh", str(tmp / "wrap.sh"), *wrapper,
             sys.executable, "-m", "kata_agent", "--channel", f"unix-serial:{self.serial}",
             "--cmdline", str(tmp / "cmdline"), "--runtime-dir", str(tmp / "run")],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items()
                    if k != "NOTIFY_SOCKET" and not k.startswith("LISTEN_")},
                 "PYTHONUNBUFFERED": "1"},
        )
        self.client: AgentClient | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            return "agent ready" in self.log_text()

        wait_for(ready, 60, "the agent to be ready")
        self.client = AgentClient(f"unix-serial:{self.serial}")
        self.client.__enter__()

    @property
    def agent(self) -> Any:
        assert self.client is not None
        return self.client.agent

    def call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT) -> Any:
        return getattr(self.agent, method)(request, timeout=timeout)

    def status(self, method: str, request: Any, timeout: float = RPC_TIMEOUT) -> grpc.StatusCode:
        try:
            self.call(method, request, timeout)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def check(self) -> None:
        assert self.client is not None
        reply = self.client.health.Check(health_pb2.CheckRequest(), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def mountinfo(self) -> str:
        return Path(f"/proc/{self.proc.pid}/mountinfo").read_text()

    def children(self) -> list[int]:
        """Every process below the agent (the zygote, pause, containers)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                             check=True).stdout
        parent: dict[int, int] = {}
        for line in out.splitlines():
            pid, ppid = (int(x) for x in line.split())
            parent[pid] = ppid
        found = []
        for pid in parent:
            p = parent.get(pid)
            while p:
                if p == self.proc.pid:
                    found.append(pid)
                    break
                p = parent.get(p)
        return found

    def stop(self) -> int:
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def make_rootfs(guest: GuestAgent, cid: str) -> str:
    """A busybox rootfs in the shared directory; returns its guest path."""
    root = guest.tmp / "shared" / cid / "rootfs"
    if root.exists():
        return f"{SHARED}/{cid}/rootfs"
    for d in ("bin", "proc", "dev", "tmp", "etc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return f"{SHARED}/{cid}/rootfs"


def process_pb(args: list[str], *, terminal: bool = False) -> Any:
    p = oci_pb2.Process(Terminal=terminal, Args=args, Env=["PATH=/bin", "TERM=xterm"], Cwd="/")
    p.User.UID = 0
    p.User.GID = 0
    return p


def container_spec(root: str, args: list[str], cgroup: str, *,
                   terminal: bool = False) -> Any:
    s = oci_pb2.Spec(Version="1.0.1")
    s.Process.CopyFrom(process_pb(args, terminal=terminal))
    s.Root.Path = root
    s.Mounts.add(destination="/proc", source="proc", type="proc")
    s.Mounts.add(destination="/dev", source="tmpfs", type="tmpfs",
                 options=["nosuid", "strictatime", "mode=755", "size=65536k"])
    s.Mounts.add(destination="/dev/pts", source="devpts", type="devpts",
                 options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"])
    # What a 1.x runtime sends: no pid/network namespace, paths emptied.
    s.Linux.Namespaces.add(Type="mount")
    s.Linux.Namespaces.add(Type="ipc")
    s.Linux.Namespaces.add(Type="uts")
    s.Linux.CgroupsPath = cgroup
    return s


def create_sandbox(guest: GuestAgent, *, pidns: bool = True) -> None:
    guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="podhost", dns=["nameserver 10.1.1.1", "search example.test"],
        sandbox_pidns=pidns, sandbox_id="sb1",
        storages=[agent_pb2.Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs",
                                    mount_point="/run/kata-containers/sandbox/shm",
                                    options=["size=1m"])]))


def create_container(guest: GuestAgent, cid: str, args: list[str], *,
                     terminal: bool = False) -> str:
    root = make_rootfs(guest, cid)
    cgroup = f"/kata-agent-test-{uuid.uuid4().hex[:12]}"
    guest.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=container_spec(root, args, cgroup,
                                                          terminal=terminal)))
    return cgroup


def read_until(guest: GuestAgent, cid: str, exec_id: str, want: bytes,
               method: str = "ReadStdout") -> bytes:
    got = b""
    deadline = time.monotonic() + RPC_TIMEOUT
    while want not in got:
        assert time.monotonic() < deadline, f"no {want!r} in {got!r}"
        got += guest.call(method, agent_pb2.ReadStreamRequest(
            container_id=cid, exec_id=exec_id, len=4096)).data
    return got


def read_all(guest: GuestAgent, cid: str, exec_id: str, chunk: int = 65536) -> bytes:
    got = bytearray()
    while True:
        try:
            got += guest.call("ReadStdout", agent_pb2.ReadStreamRequest(
                container_id=cid, exec_id=exec_id, len=chunk)).data
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.OUT_OF_RANGE and e.details() == "EOF", e
            return bytes(got)


def cgroup_dirs(cgroup: str) -> list[str]:
    base = "/sys/fs/cgroup"
    found = [os.path.join(base, c, cgroup.lstrip("/")) for c in os.listdir(base)]
    found.append(os.path.join(base, cgroup.lstrip("/")))
    return [d for d in found if os.path.isdir(d)]


def freezer_state(cgroup: str) -> str:
    v1 = Path("/sys/fs/cgroup/freezer") / cgroup.lstrip("/") / "freezer.state"
    if v1.exists():
        return v1.read_text().strip()
    v2 = Path("/sys/fs/cgroup") / cgroup.lstrip("/") / "cgroup.freeze"
    return "FROZEN" if v2.read_text().strip() == "1" else "THAWED"


def nsenter(pid: int, *args: str) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-u", *args], capture_output=True,
                          text=True, check=True).stdout.strip()


def poll(fn: Callable[[], bool], what: str) -> None:
    wait_for(fn, 30, what)


def test_full_lifecycle(guest: GuestAgent) -> None:
    guest.check()
    baseline_mounts = guest.mountinfo()
    # Network, as the runtime sets it up before the sandbox.
    iface = guest.call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=types_pb2.Interface(
            name="eth0", mtu=1450, hwAddr=MAC,
            IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address="10.1.1.2",
                                             mask="24")])))
    assert iface.name == "eth0" and iface.mtu == 1450
    routes = guest.call("UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(
        Routes=[types_pb2.Route(dest="", gateway="10.1.1.1", device="eth0")])))
    assert any(r.gateway == "10.1.1.1" for r in routes.Routes)

    create_sandbox(guest)
    assert guest.status("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="again")) == grpc.StatusCode.ALREADY_EXISTS
    assert nsenter(guest.proc.pid, "hostname") == "podhost"
    resolv = (guest.tmp / "etc-upper" / "resolv.conf").read_text()
    assert resolv == "nameserver 10.1.1.1\nsearch example.test\n"
    assert " /run/kata-containers/sandbox/shm " in guest.mountinfo()

    cid = "c1"
    cgroup = create_container(guest, cid, [
        "sh", "-c", "echo hello-from-container; hostname; exec sleep 100000"])
    assert cgroup_dirs(cgroup), "the container has a cgroup"
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    assert guest.status("StartContainer", agent_pb2.StartContainerRequest(
        container_id=cid)) == grpc.StatusCode.FAILED_PRECONDITION
    out = read_until(guest, cid, cid, b"podhost\n")
    # The container's UTS namespace is the sandbox's.
    assert out == b"hello-from-container\npodhost\n"

    # An interactive shell on a terminal.
    guest.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id=cid, exec_id="tty1", process=process_pb(["sh"], terminal=True)))
    guest.call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
        container_id=cid, exec_id="tty1", row=33, column=111))
    n = guest.call("WriteStdin", agent_pb2.WriteStreamRequest(
        container_id=cid, exec_id="tty1", data=b"echo pty-$((6*7)); stty size\n")).len
    assert n == len(b"echo pty-$((6*7)); stty size\n")
    got = read_until(guest, cid, "tty1", b"33 111")
    assert b"pty-42\r\n" in got
    # The container's processes, and only those (the shared PID namespace holds more).
    def pids() -> list[int]:
        listed = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
            container_id=cid, format="json")).process_list
        return list(json.loads(listed))

    # The init's sleep and the shell (stty may still be on its way out).
    poll(lambda: len(pids()) == 2, "stty to exit")
    table = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id=cid, format="table")).process_list.decode()
    assert table.splitlines()[0].split()[1] == "PID" and len(table.splitlines()) == 3
    guest.call("WriteStdin", agent_pb2.WriteStreamRequest(
        container_id=cid, exec_id="tty1", data=b"exit 3\n"))
    status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id="tty1")).status
    assert status == 3
    # A waited exec process is gone.
    assert guest.status("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id="tty1")) == grpc.StatusCode.NOT_FOUND

    stats = guest.call("StatsContainer", agent_pb2.StatsContainerRequest(container_id=cid))
    assert stats.cgroup_stats.memory_stats.usage.usage > 0
    assert stats.cgroup_stats.pids_stats.current >= 1
    assert "eth0" in {n.name for n in stats.network_stats}

    guest.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=cid))
    assert freezer_state(cgroup) == "FROZEN"
    guest.call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=cid))
    assert freezer_state(cgroup) == "THAWED"

    guest.call("UpdateContainer", agent_pb2.UpdateContainerRequest(
        container_id=cid, resources=oci_pb2.LinuxResources(
            Memory=oci_pb2.LinuxMemory(Limit=256 << 20))))
    limit = Path("/sys/fs/cgroup/memory") / cgroup.lstrip("/") / "memory.limit_in_bytes"
    if limit.exists():
        assert int(limit.read_text()) == 256 << 20

    # SIGTERM to an init without a handler stops it (as SIGKILL).
    guest.call("SignalProcess", agent_pb2.SignalProcessRequest(
        container_id=cid, exec_id=cid, signal=signal.SIGTERM))
    status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid)).status
    assert status == 128 + signal.SIGKILL

    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []
    assert guest.status("StartContainer", agent_pb2.StartContainerRequest(
        container_id=cid)) == grpc.StatusCode.NOT_FOUND

    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    # Nothing left: only the zygote below the agent, no storage mount, no cgroup.
    poll(lambda: len(guest.children()) == 1, "container processes to be gone")
    assert guest.mountinfo() == baseline_mounts
    # The agent is ready for a new sandbox.
    create_sandbox(guest, pidns=False)
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    guest.check()


@pytest.fixture(params=["", "agent.container_pipe_size=8192"])
def any_pipe_guest(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GuestAgent]:
    require_tools()
    g = GuestAgent(tmp_path, request.param)
    try:
        g.start()
        yield g
    finally:
        code = g.stop()
    assert code == 0, g.log_text()


def test_no_output_lost(any_pipe_guest: GuestAgent) -> None:
    guest = any_pipe_guest
    create_sandbox(guest)
    cid = "big"
    # 1 MiB of a known pattern (seq output), written faster than the host reads it.
    cgroup = create_container(guest, cid, ["sh", "-c", "seq 1 200000 | head -c 1048576"])
    expected = subprocess.run(["sh", "-c", "seq 1 200000 | head -c 1048576"],
                              capture_output=True, check=True).stdout
    assert len(expected) == 1 << 20
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    got = read_all(guest, cid, cid, chunk=7000)
    assert got == expected
    status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid)).status
    assert status == 0
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    assert cgroup_dirs(cgroup) == []
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_wait_returns_after_output_read_even_if_slow_reader(guest: GuestAgent) -> None:
    """WaitProcess answers only once the output written before the exit was read."""
    create_sandbox(guest)
    cid = "order"
    create_container(guest, cid, ["sh", "-c", "yes 0123456789 | head -c 300000"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    waiter = guest.agent.WaitProcess.future(agent_pb2.WaitProcessRequest(
        container_id=cid, exec_id=cid), timeout=RPC_TIMEOUT)
    got = read_all(guest, cid, cid, chunk=4096)
    assert len(got) == 300000
    assert waiter.result().status == 0
    # An agent stopped with a sandbox still up takes it down on its way out.
    cgroup = create_container(guest, "left", ["sleep", "1000"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="left"))
    assert guest.stop() == 0
    assert cgroup_dirs(cgroup) == []
    assert "event=sandbox_destroyed" in guest.log_text()


def test_oom_event_names_the_container(guest: GuestAgent) -> None:
    create_sandbox(guest)
    cid = "hog"
    root = make_rootfs(guest, cid)
    cgroup = f"/kata-agent-test-{uuid.uuid4().hex[:12]}"
    spec = container_spec(root, ["sh", "-c", "x=a; while :; do x=$x$x; done"], cgroup)
    spec.Linux.Resources.Memory.Limit = 16 << 20
    spec.Linux.Resources.Memory.Swap = 16 << 20
    waiter = guest.agent.GetOOMEvent.future(agent_pb2.GetOOMEventRequest(),
                                            timeout=RPC_TIMEOUT)
    guest.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=spec))
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    assert waiter.result().container_id == cid
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert cgroup_dirs(cgroup) == []


def test_remove_with_running_exec_and_streams_blocked(guest: GuestAgent) -> None:
    """Removing a container wakes its blocked readers and forgets its exec processes;
    the agent keeps reaping for the next container."""
    create_sandbox(guest)
    create_container(guest, "r1", ["sleep", "1000"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="r1"))
    guest.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="r1", exec_id="e1", process=process_pb(["sleep", "1000"])))
    reader = guest.agent.ReadStdout.future(agent_pb2.ReadStreamRequest(
        container_id="r1", exec_id="e1", len=100), timeout=RPC_TIMEOUT)
    waiter = guest.agent.WaitProcess.future(agent_pb2.WaitProcessRequest(
        container_id="r1", exec_id="e1"), timeout=RPC_TIMEOUT)
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="r1"))
    with pytest.raises(grpc.RpcError) as err:
        reader.result()
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert waiter.result().status == 128 + signal.SIGKILL
    create_container(guest, "r2", ["sh", "-c", "exit 5"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="r2"))
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="r2", exec_id="r2")).status == 5
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    poll(lambda: len(guest.children()) == 1, "container processes to be gone")
    assert not (guest.tmp / "run" / "containers").exists() or \
        list((guest.tmp / "run" / "containers").iterdir()) == []


def test_guest_hooks_run_for_every_container(guest: GuestAgent) -> None:
    hooks = guest.tmp / "hooks"
    (hooks / "prestart").mkdir(parents=True)
    marker = guest.tmp / "hook-ran"
    script = hooks / "prestart" / "mark"
    # A hook gets the container's state on stdin, as OCI hooks do.
    script.write_text(f"#!/bin/sh\ncat > {marker}\n")
    script.chmod(0o755)
    guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="hooked", sandbox_pidns=True, guest_hook_path=str(hooks)))
    create_container(guest, "h1", ["true"])
    state = json.loads(marker.read_text())
    assert state["id"] == "h1" and state["pid"] > 0
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_missing_kernel_module_fails_cleanly(guest: GuestAgent) -> None:
    assert guest.status("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="m", kernel_modules=[agent_pb2.KernelModule(
            name="kata_agent_test_no_such_module")])) == grpc.StatusCode.INTERNAL
    # Nothing was created: a correct request works afterwards.
    create_sandbox(guest)
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


@pytest.mark.parametrize("pidns", [False, True])
def test_pid_namespace_follows_sandbox_pidns(guest: GuestAgent, pidns: bool) -> None:
    create_sandbox(guest, pidns=pidns)
    create_container(guest, "p", ["sh", "-c", "echo $$"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="p"))
    pid = int(read_all(guest, "p", "p"))
    # Its own PID namespace makes the init pid 1; the sandbox's has the pause as pid 1.
    assert (pid == 1) is (not pidns)
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="p", exec_id="p")).status == 0
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())


def test_sandbox_outlives_the_rpc_thread_that_created_it(guest: GuestAgent) -> None:
    """RPC worker threads end when idle; the pause process a CreateSandbox started from
    one must not end with it (PR_SET_PDEATHSIG would fire on that thread's exit)."""
    from kata_agent import h2server

    tasks = Path(f"/proc/{guest.proc.pid}/task")
    create_sandbox(guest)
    after_create = len(list(tasks.iterdir()))
    wait_for(lambda: len(list(tasks.iterdir())) < after_create,
             h2server.WORKER_IDLE_SECONDS * 6, "the idle RPC worker to exit")
    create_container(guest, "late", ["echo", "still-here"])
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="late"))
    assert read_all(guest, "late", "late") == b"still-here\n"
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="late", exec_id="late")).status == 0
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="late"))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
