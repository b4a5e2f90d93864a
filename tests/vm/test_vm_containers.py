"""Containers in a real guest: boot the built image under QEMU (TCG), drive its agent over the
virtio-serial port with yamux as a Kata 1.x runtime does, run containers from a 9p share.

Both x86_64 and aarch64 boot with the agent under systemd and with the agent as PID 1. Each
boot runs a container whose output and nonzero exit status are read back, an exec
into it, and ends with QEMU exiting 0. The images come from `make image ARCH=...`, run once
per architecture and session (a no-op when they are up to date, a build when they are not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent.host import runner
from kata_agent.host.client import AgentClient
from kata_agent.host.vm import VM, Arch
from kata_agent.oci_convert import spec_to_oci
from kata_agent.protocol import agent_pb2, oci_pb2

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("BUILD_DIR", REPO / "build"))
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
BOOT_TIMEOUT = float(os.environ.get("KATA_BOOT_DEADLINE", "300"))
IMAGE_BUILD_TIMEOUT = 3 * 3600
RPC_TIMEOUT = 120.0

_built: dict[str, Path] = {}


def built_image(arch: str, log_dir: Path) -> Path:
    """`make image ARCH=arch` (content-addressed: a no-op when up to date); the build dir."""
    if shutil.which(QEMU[arch]) is None:
        pytest.skip(f"host capability missing: {QEMU[arch]}")
    if arch not in _built:
        log = log_dir / f"make-image-{arch}.log"
        with log.open("wb") as out:
            rc = subprocess.run(["make", "-C", str(REPO), "image", f"ARCH={arch}"],
                                stdout=out, stderr=subprocess.STDOUT,
                                timeout=IMAGE_BUILD_TIMEOUT, check=False).returncode
        assert rc == 0, f"make image ARCH={arch} failed:\n{log.read_text()[-4000:]}"
        _built[arch] = BUILD
    return _built[arch]


@dataclass
class Booted:
    vm: VM
    client: AgentClient
    share: Path
    ready_seconds: float

    def call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT) -> Any:
        return getattr(self.client.agent, method)(request, timeout=timeout)


@contextmanager
def boot(arch: Arch, mode: runner.Mode, root: runner.Root, tmp: Path,
         capsys: pytest.CaptureFixture[str], *, extra_args: tuple[str, ...] = (),
         console_socket: Path | None = None) -> Iterator[Booted]:
    build = built_image(arch, tmp)
    kernel, initrd, image = runner.boot_files(build, arch, root)
    share = tmp / "share"
    share.mkdir()
    vm = VM(arch=arch, kernel=kernel, initrd=initrd, image=image,
            disk_mode="nvdimm" if root == "nvdimm" else "virtio-blk", memory_mib=1024,
            agent_socket=tmp / "agent.sock", share_dir=share, workdir=tmp,
            kernel_args=[*runner.boot_arguments(mode, root), *extra_args],
            console_socket=console_socket)
    started = time.monotonic()
    vm.start()
    client: AgentClient | None = None
    try:
        client = runner.wait_for_agent(vm, tmp / "agent.sock", started, BOOT_TIMEOUT)
        ready = time.monotonic() - started
        with capsys.disabled():
            sys.stdout.write(f"\n[vm] {arch} {mode} {root}: agent ready after {ready:.2f} s "
                             "from QEMU start (TCG, emulated)\n")
        yield Booted(vm, client, share, ready)
    except BaseException:
        sys.stderr.write(f"--- guest console (tail) ---\n{vm.console_text()[-5000:]}\n")
        raise
    finally:
        if client is not None:
            client.close()
        vm.stop()


# A static multi-call program for the container (the host's busybox only runs on x86_64).
TOOL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void copy(const char *path) {
    char buf[4096];
    ssize_t n;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); return; }
    while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, (size_t)n, stdout);
    close(fd);
}

int main(int argc, char **argv) {
    struct timespec step = {0, 100000000};
    if (argc > 1 && strcmp(argv[1], "main") == 0) {
        /* Output on both streams, then wait for the host to release us through the share. */
        printf("out\n");
        fflush(stdout);
        fprintf(stderr, "err\n");
        while (access("/tmp/release", F_OK) != 0) nanosleep(&step, NULL);
        return 7;
    }
    if (argc > 1 && strcmp(argv[1], "exec") == 0) {
        copy("/proc/self/cgroup");
        printf("pid1=");
        copy("/proc/1/comm");
        fflush(stdout);
        return 3;
    }
    if (argc > 2 && strcmp(argv[1], "cat") == 0) {
        copy(argv[2]);
        return 0;
    }
    if (argc > 2 && strcmp(argv[1], "echo") == 0) {
        printf("%s\n", argv[2]);
        return 0;
    }
    fprintf(stderr, "usage: vmtool main|exec|cat FILE|echo WORD\n");
    return 2;
}
"""
CC = {"x86_64": "gcc", "aarch64": "aarch64-linux-gnu-gcc"}


def tool_rootfs(arch: str, tmp: Path) -> Path:
    """A rootfs holding only /bin/vmtool, built static for the guest's architecture."""
    if shutil.which(CC[arch]) is None:
        pytest.skip(f"host capability missing: {CC[arch]}")
    libc = subprocess.run([CC[arch], "-print-file-name=libc.a"], capture_output=True,
                          text=True, check=False).stdout.strip()
    if not os.path.isabs(libc):
        pytest.skip(f"host capability missing: static libc for {CC[arch]} "
                    f"({'libc6-dev' if arch == 'x86_64' else 'libc6-dev-arm64-cross'})")
    rootfs = tmp / f"tool-rootfs-{arch}"
    if rootfs.is_dir():
        return rootfs
    for sub in ("bin", "dev", "proc", "sys", "tmp", "etc"):
        (rootfs / sub).mkdir(parents=True)
    source = tmp / "vmtool.c"
    source.write_text(TOOL_C)
    subprocess.run([CC[arch], "-static", "-Os", "-s", "-o", str(rootfs / "bin" / "vmtool"),
                    str(source)], check=True, capture_output=True)
    return rootfs


def add_container(guest: Booted, cid: str, args: list[str], tmp: Path) -> None:
    rootfs = tool_rootfs(guest.vm.arch, tmp)
    runner.share_rootfs(rootfs, guest.share, cid)
    doc = runner.default_spec(args)
    guest.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=runner.guest_spec(doc, cid)))


def read_all(guest: Booted, method: str, cid: str, exec_id: str) -> bytes:
    got = bytearray()
    while True:
        try:
            got += guest.call(method, agent_pb2.ReadStreamRequest(
                container_id=cid, exec_id=exec_id, len=65536)).data
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.OUT_OF_RANGE, err
            return bytes(got)


def sandbox_storage() -> agent_pb2.Storage:
    return agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                             options=list(runner.SHARE_OPTIONS),
                             mount_point=runner.SHARED_DIR + "/")


def container_round(guest: Booted, tmp: Path, cgroup_line: str) -> None:
    """A container with output on both streams and exit status 7, ps and an exec into it,
    its release through the share, then removal; QEMU quits with status 0."""
    guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="vmtest", sandbox_id="sb-vm", storages=[sandbox_storage()]))
    add_container(guest, "c1", ["/bin/vmtool", "main"], tmp)
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c1"))
    # ps in the guest (procps) lists the container's one process.
    listed = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id="c1", format="json")).process_list
    assert len(json.loads(listed)) == 1, listed
    table = guest.call("ListProcesses", agent_pb2.ListProcessesRequest(
        container_id="c1", format="table")).process_list.decode()
    assert "vmtool main" in table, table

    exec_proc = oci_pb2.Process(Args=["/bin/vmtool", "exec"], Env=["PATH=/bin"], Cwd="/")
    guest.call("ExecProcess", agent_pb2.ExecProcessRequest(
        container_id="c1", exec_id="e1", process=exec_proc))
    exec_out = read_all(guest, "ReadStdout", "c1", "e1").decode()
    exec_status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="e1")).status
    assert exec_status == 3, exec_out
    # The exec joined the container's PID namespace (its init is sh) and its cgroup.
    assert "pid1=vmtool" in exec_out, exec_out
    assert cgroup_line in exec_out.splitlines(), exec_out

    # Released from the host side of the 9p share only now: had the init exited while the
    # exec ran, the end of its PID namespace would have killed the exec.
    (guest.share / "c1" / "rootfs" / "tmp" / "release").touch()
    status = guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c1", exec_id="c1")).status
    assert status == 7
    assert read_all(guest, "ReadStdout", "c1", "c1") == b"out\n"
    assert read_all(guest, "ReadStderr", "c1", "c1") == b"err\n"
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))

    # A second container after the first is gone: exit status 0, stdout only.
    add_container(guest, "c2", ["/bin/vmtool", "echo", "second"], tmp)
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c2"))
    assert read_all(guest, "ReadStdout", "c2", "c2") == b"second\n"
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="c2", exec_id="c2")).status == 0
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c2"))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert runner.shut_down(guest.vm) == 0


# cgroup v2 under systemd 252; hybrid (v1 controllers plus `unified`) with the agent as init.
V2_LINE = "0::/kata/c1"


@pytest.mark.timeout(IMAGE_BUILD_TIMEOUT)  # the first boot may build the image
@pytest.mark.parametrize(("arch", "mode"), [
    ("x86_64", "systemd"), ("x86_64", "init"), ("aarch64", "init"), ("aarch64", "systemd"),
])
def test_guest_runs_containers(arch: Arch, mode: runner.Mode, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with boot(arch, mode, "initrd", tmp_path, capsys) as guest:
        cgroup_line = V2_LINE if mode == "systemd" else hybrid_memory_line(guest, tmp_path)
        container_round(guest, tmp_path, cgroup_line)


def hybrid_memory_line(guest: Booted, tmp: Path) -> str:
    """The memory line of /proc/self/cgroup a process in /kata/c1 shows under hybrid cgroups
    (the hierarchy id depends on the order of the guest's /proc/cgroups)."""
    guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="probe", sandbox_id="sb-probe", storages=[sandbox_storage()]))
    add_container(guest, "probe", ["/bin/vmtool", "cat", "/proc/self/cgroup"], tmp)
    guest.call("StartContainer", agent_pb2.StartContainerRequest(container_id="probe"))
    lines = read_all(guest, "ReadStdout", "probe", "probe").decode().splitlines()
    assert guest.call("WaitProcess", agent_pb2.WaitProcessRequest(
        container_id="probe", exec_id="probe")).status == 0
    guest.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="probe"))
    guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    memory = [line for line in lines if ":memory:" in line]
    assert len(memory) == 1 and memory[0].endswith(":memory:/kata/probe"), lines
    return memory[0].replace("/kata/probe", "/kata/c1")


@pytest.mark.timeout(IMAGE_BUILD_TIMEOUT)  # the first boot may build the image
def test_kata_vm_run_exit_status_and_streams(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI end to end, from the disk image: stdout carries only the container's output,
    the runner's messages and the container's stderr go to stderr, its status is ours."""
    build = built_image("x86_64", tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kata_agent.host.runner", "--arch", "x86_64", "--mode", "init",
         "--root", "disk", "--build-dir", str(build), "--",
         "sh", "-c", "echo out; echo err >&2; exit 7"],
        capture_output=True, timeout=BOOT_TIMEOUT + 120, check=False)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 7, stderr[-4000:]
    assert proc.stdout == b"out\n"
    assert "err\n" in stderr
    ready = [line for line in stderr.splitlines() if line.startswith("agent ready after ")]
    assert len(ready) == 1 and ready[0].endswith("s from QEMU start (TCG, emulated)"), stderr
    with capsys.disabled():
        sys.stdout.write(f"\n[vm] kata-vm-run x86_64 init disk: {ready[0]}\n")


def test_kata_vm_run_fails_cleanly_without_image(tmp_path: Path) -> None:
    """No image: status 125 and a message naming the missing file, no QEMU left behind."""
    proc = subprocess.run(
        [sys.executable, "-m", "kata_agent.host.runner", "--arch", "x86_64",
         "--build-dir", str(tmp_path / "nothing"), "--", "true"],
        capture_output=True, timeout=60, check=False)
    assert proc.returncode == runner.RUNNER_FAILURE
    assert b"make image ARCH=x86_64" in proc.stderr
    assert proc.stdout == b""


def test_bundle_spec_reaches_the_agent_as_a_runtime_sends_it(tmp_path: Path) -> None:
    """config.json -> grpc.Spec -> the agent's OCI reading keeps what matters; the network
    namespace and host paths are dropped, the rootfs points into the share."""
    doc = runner.default_spec(["sh", "-c", "exit 0"])
    doc["linux"]["namespaces"].append({"type": "network", "path": "/var/run/netns/x"})
    doc["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 99}}
    doc["process"]["terminal"] = True
    spec = runner.guest_spec(json.loads(json.dumps(doc)), "c9")
    back = spec_to_oci(spec)
    assert back["root"]["path"] == f"{runner.SHARED_DIR}/c9/rootfs"
    assert back["process"]["args"] == ["sh", "-c", "exit 0"]
    assert "terminal" not in back["process"] or back["process"]["terminal"] is False
    assert [ns["type"] for ns in back["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    assert back["linux"]["resources"]["memory"]["limit"] == 64 << 20
    assert back["linux"]["resources"]["pids"]["limit"] == 99
    assert back["linux"]["cgroupsPath"] == "/kata/c9"
    assert back["mounts"][0] == {"destination": "/proc", "type": "proc", "source": "proc"}


def test_bundle_spec_with_wrong_types_is_refused() -> None:
    doc = runner.default_spec(["true"])
    doc["process"]["user"]["uid"] = "0"
    with pytest.raises(runner.RunError, match=r"process\.user\.uid"):
        runner.guest_spec(doc, "c1")
    doc = runner.default_spec(["true"])
    doc["process"]["user"]["umask"] = 18  # no such field in the protocol: reported, skipped
    spec = runner.guest_spec(doc, "c1")
    assert list(spec.Process.Args) == ["true"]


def test_default_bundle_checks_the_busybox_architecture(tmp_path: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("host capability missing: /bin/busybox (busybox-static)")
    host = runner.elf_arch(busybox)
    assert host in ("x86_64", "aarch64")
    other = "aarch64" if host == "x86_64" else "x86_64"
    with pytest.raises(runner.RunError, match=r"not an .* executable"):
        runner.busybox_bundle(tmp_path / "b1", ["true"], busybox, other)
    bundle = runner.busybox_bundle(tmp_path / "b2", ["echo", "x"], busybox, host)
    doc, rootfs = runner.load_bundle(bundle)
    assert doc["process"]["args"] == ["echo", "x"]
    assert (rootfs / "bin" / "sh").resolve() == (rootfs / "bin" / "busybox").resolve()
