"""Boot the built guest kernels under QEMU (TCG) with the launcher and a tiny test initrd."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kata_agent.host.vm import VM, Arch

from .conftest import BUILD_TIMEOUT, MARKER, ROOT, BuiltKernel, InitrdMaker, busybox_disk

# Generous for TCG on shared cores; every wait below ends as soon as its condition holds.
BOOT_TIMEOUT = 180.0

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 600)


def _boot_and_check(kernel: BuiltKernel, initrd: Path, workdir: Path) -> str:
    sock = workdir / "agent.sock"
    arch: Arch = "x86_64" if kernel.arch == "x86_64" else "aarch64"
    with VM(
        arch=arch,
        kernel=kernel.path,
        initrd=initrd,
        agent_socket=sock,
        memory_mib=256,
        workdir=workdir,
    ) as vm:
        assert vm.wait_for_socket(timeout=BOOT_TIMEOUT) == sock
        assert stat.S_ISSOCK(sock.stat().st_mode)
        status = vm.wait(timeout=BOOT_TIMEOUT)
        console = vm.console_text()
    assert status == 0, f"qemu status {status}\n{console[-3000:]}"
    assert f"Linux version {kernel.release}" in console
    assert f"kata-init: kernel {kernel.release}" in console
    assert "virtio-port: agent.channel.0" in console, console[-3000:]
    assert MARKER in console
    return console


def test_x86_64_kernel_boots_and_shows_agent_port(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    initrd = make_initrd("x86_64", tmp_path)
    console = _boot_and_check(x86_64_kernel, initrd, tmp_path)
    assert "ttyS0" in console


def test_aarch64_kernel_boots_and_shows_agent_port(
    aarch64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    initrd = make_initrd("aarch64", tmp_path)
    console = _boot_and_check(aarch64_kernel, initrd, tmp_path)
    assert "ttyAMA0" in console


def test_x86_64_9p_share_is_mounted(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello-from-host\n")
    initrd = make_initrd("x86_64", tmp_path)
    with VM(
        arch="x86_64",
        kernel=x86_64_kernel.path,
        initrd=initrd,
        share_dir=share,
        memory_mib=256,
        workdir=tmp_path,
    ) as vm:
        assert vm.wait(timeout=BOOT_TIMEOUT) == 0
        console = vm.console_text()
    assert "share: hello-from-host" in console, console[-3000:]


def test_stop_ends_a_guest_that_does_not_power_off(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    initrd = make_initrd("x86_64", tmp_path)
    vm = VM(
        arch="x86_64",
        kernel=x86_64_kernel.path,
        initrd=initrd,
        memory_mib=256,
        workdir=tmp_path,
        kernel_args=("kata.hold",),
    )
    vm.start()
    try:
        vm.wait_for_console("kata-init: holding", timeout=BOOT_TIMEOUT)
        assert vm.running()
        pid = vm.pid
        assert pid is not None
        started = time.monotonic()
        vm.stop(grace=3.0)
        # system_powerdown is ignored by this init; QMP `quit` ends QEMU well before SIGKILL.
        assert time.monotonic() - started < 30.0
        assert not vm.running()
        assert vm.returncode() is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        vm.stop(grace=1.0)
    assert MARKER not in vm.console_text()


def test_cli_boots_and_prints_console(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    initrd = make_initrd("x86_64", tmp_path)
    sock = tmp_path / "agent.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "agent"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kata_agent.host.vm",
            "--arch",
            "x86_64",
            "--kernel",
            str(x86_64_kernel.path),
            "--initrd",
            str(initrd),
            "--agent-socket",
            str(sock),
            "--memory",
            "256",
            "--timeout",
            str(BOOT_TIMEOUT),
            "--print-console",
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "virtio-port: agent.channel.0" in result.stdout
    # The QEMU command line is visible in the debug log.
    assert "qemu command line: qemu-system-x86_64 -machine q35" in result.stderr
    assert "virtserialport,bus=vser0.0,chardev=agentch,name=agent.channel.0" in result.stderr


def test_vsock_device_needs_vhost(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    if not Path("/dev/vhost-vsock").exists():
        pytest.skip("host capability missing: /dev/vhost-vsock (vhost_vsock module)")
    initrd = make_initrd("x86_64", tmp_path)
    cid = 3 + os.getpid() % 100000
    with VM(
        arch="x86_64",
        kernel=x86_64_kernel.path,
        initrd=initrd,
        vsock_cid=cid,
        memory_mib=256,
        workdir=tmp_path,
    ) as vm:
        assert vm.wait(timeout=BOOT_TIMEOUT) == 0
        console = vm.console_text()
    assert "vsock: present" in console, console[-3000:]


def test_x86_64_boots_from_virtio_blk_disk(x86_64_kernel: BuiltKernel, tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("host capability missing: /bin/busybox (busybox-static)")
    disk = busybox_disk(tmp_path / "disk.img", tmp_path)
    sock = tmp_path / "agent.sock"
    with VM(
        arch="x86_64",
        kernel=x86_64_kernel.path,
        image=disk,
        agent_socket=sock,
        memory_mib=256,
        workdir=tmp_path,
    ) as vm:
        assert vm.wait(timeout=BOOT_TIMEOUT) == 0
        console = vm.console_text()
    assert "EXT4-fs (vda1): mounted filesystem" in console, console[-3000:]
    assert "virtio-port: agent.channel.0" in console
    assert MARKER in console


def test_x86_64_boots_from_nvdimm_pmem(x86_64_kernel: BuiltKernel, tmp_path: Path) -> None:
    """A plain partitioned image on an NVDIMM (no DAX metadata, so no DAX mount)."""
    if not Path("/bin/busybox").is_file():
        pytest.skip("host capability missing: /bin/busybox (busybox-static)")
    disk = busybox_disk(tmp_path / "disk.img", tmp_path)
    sock = tmp_path / "agent.sock"
    with VM(
        arch="x86_64",
        kernel=x86_64_kernel.path,
        image=disk,
        disk_mode="nvdimm",
        root_dax=False,
        agent_socket=sock,
        memory_mib=256,
        workdir=tmp_path,
    ) as vm:
        assert vm.wait(timeout=BOOT_TIMEOUT) == 0
        console = vm.console_text()
    assert "pmem0: p1" in console, console[-3000:]
    assert "EXT4-fs (pmem0p1): mounted filesystem" in console
    assert "virtio-port: agent.channel.0" in console
    assert MARKER in console


def test_x86_64_microvm_boots_pvh_vmlinux(
    x86_64_kernel: BuiltKernel, make_initrd: InitrdMaker, tmp_path: Path
) -> None:
    """microvm: virtio-mmio transport, uncompressed vmlinux entered through PVH."""
    vmlinux = x86_64_kernel.path.with_name("vmlinux")
    initrd = make_initrd("x86_64", tmp_path)
    sock = tmp_path / "agent.sock"
    with VM(
        arch="x86_64",
        machine="microvm",
        kernel=vmlinux,
        initrd=initrd,
        agent_socket=sock,
        memory_mib=256,
        workdir=tmp_path,
    ) as vm:
        vm.wait_for_socket(timeout=BOOT_TIMEOUT)
        console = vm.wait_for_console(MARKER, timeout=BOOT_TIMEOUT)
    assert "virtio-port: agent.channel.0" in console, console[-3000:]
    assert "vsock: present" not in console  # no vsock device was given


def test_unchanged_config_is_not_rebuilt(x86_64_kernel: BuiltKernel, tmp_path: Path) -> None:
    """A second build with the same inputs is a cache hit and republishes identical files."""
    build_dir = tmp_path / "out"
    env = dict(os.environ, BUILD_DIR=str(build_dir))
    result = subprocess.run(
        [str(ROOT / "image-build" / "build-kernel.sh"), "x86_64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cache hit" in result.stdout
    assert "building" not in result.stdout
    manifest = json.loads((build_dir / "x86_64" / "kernel.json").read_text())
    assert manifest == x86_64_kernel.manifest
    for name, info in manifest["files"].items():
        data = (build_dir / "x86_64" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert len(data) == info["size"]
