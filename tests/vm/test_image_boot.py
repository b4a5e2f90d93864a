"""Boot the built guest under QEMU (TCG) from the initrd and from the disk image.

Needs `make image ARCH=x86_64` output in build/x86_64/ and a kernel: build/x86_64/vmlinuz
or $KERNEL. Each boot waits on the serial console, with a deadline, for systemd to start
the agent unit and reach kata-containers.target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "x86_64"
BOOT_DEADLINE = float(os.environ.get("KATA_BOOT_DEADLINE", "280"))
AGENT_STARTED = "Started kata-agent.service"
TARGET_REACHED = "Reached target kata-containers.target"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Full unit names in systemd's console status lines (not descriptions, not ellipsized).
SYSTEMD_ARGS = "systemd.status_unit_format=name systemd.show_status=1"


def kernel_path() -> Path:
    path = Path(os.environ.get("KERNEL", BUILD / "vmlinuz"))
    if not path.exists():
        pytest.skip(f"host capability missing: guest kernel {path} (make kernel, or KERNEL=)")
    return path


def artifact(name: str) -> Path:
    path = BUILD / name
    if not path.exists():
        pytest.skip(f"host capability missing: {path} (make image ARCH=x86_64)")
    return path


class Guest:
    """One QEMU process with its serial console in a file."""

    def __init__(self, tmp: Path, args: list[str], append: str, *,
                 qemu_name: str = "qemu-system-x86_64", machine: tuple[str, ...] = (),
                 kernel: Path | None = None, console: str = "ttyS0") -> None:
        qemu = shutil.which(qemu_name)
        if qemu is None:
            pytest.skip(f"host capability missing: {qemu_name}")
        self.console = tmp / "console.log"
        self.cmd = [qemu, *machine, "-accel", "tcg", "-m", "1024", "-smp", "1", "-nodefaults",
                    "-no-user-config", "-display", "none", "-no-reboot",
                    "-serial", f"file:{self.console}", "-kernel", str(kernel or kernel_path()),
                    "-append", f"console={console} panic=-1 {SYSTEMD_ARGS} {append}", *args]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)

    def text(self) -> str:
        try:
            return ANSI.sub("", self.console.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def wait_for(self, *needles: str, deadline: float = BOOT_DEADLINE) -> str:
        """Wait until every needle is on the console, QEMU exits, or the deadline passes."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.5)  # returns early if QEMU exits
        text = self.text()
        missing = [n for n in needles if n not in text]
        if missing:
            pytest.fail(f"console lacks {missing}; qemu rc={self.proc.poll()}\n{text[-4000:]}")
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.stop()


def boot(guests: list[Guest], tmp: Path, args: list[str], append: str) -> Guest:
    guest = Guest(tmp, args, append)
    guests.append(guest)
    return guest


def test_manifest_matches_artifacts() -> None:
    data = json.loads(artifact("manifest.json").read_text())
    assert data["arch"] == "x86_64"
    names = {f["name"] for f in data["files"]}
    assert {"initrd.img", "rootfs.img"} <= names
    for record in data["files"]:
        path = BUILD / record["name"]
        assert path.stat().st_size == record["size"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == record["sha256"], record["name"]
    assert data["versions"]["python"].startswith("3.11")
    assert data["python_packages"]["python-prctl"]["source"].startswith("Debian")


def test_initrd_boots_to_kata_target(guests: list[Guest], tmp_path: Path) -> None:
    initrd = artifact("initrd.img")
    guest = boot(guests, tmp_path, ["-initrd", str(initrd)], "rdinit=/init")
    text = guest.wait_for(AGENT_STARTED, TARGET_REACHED)
    assert "kata-agent[" in text or AGENT_STARTED in text


def test_disk_image_boots_as_virtio_blk(guests: list[Guest], tmp_path: Path) -> None:
    disk = artifact("rootfs.img")
    args = ["-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
    guest = boot(guests, tmp_path, args,
                 "root=/dev/vda1 rootfstype=ext4 ro init=/usr/lib/systemd/systemd")
    text = guest.wait_for(AGENT_STARTED, TARGET_REACHED)
    assert "EXT4-fs (vda1): mounted" in text


def test_disk_image_boots_as_nvdimm_with_dax(guests: list[Guest], tmp_path: Path) -> None:
    disk = artifact("rootfs.img")
    size = disk.stat().st_size
    args = ["-machine", "pc,nvdimm=on", "-m", f"1024,slots=2,maxmem={1024 * 1024 * 1024 + size}",
            "-object",
            f"memory-backend-file,id=root,mem-path={disk},size={size},share=off,readonly=on",
            "-device", "nvdimm,id=nv0,memdev=root,unarmed=on"]
    guest = boot(guests, tmp_path, args,
                 "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro "
                 "rootfstype=ext4 ro init=/usr/lib/systemd/systemd")
    text = guest.wait_for(AGENT_STARTED, TARGET_REACHED)
    # The pfn driver accepted our info block (a pfn device), MBR #2 gave pmem0p1, ext4 on it.
    assert re.search(r"nd_pmem pfn\d+\.\d+", text), text[-3000:]
    assert "pmem0: p1" in text
    assert "EXT4-fs (pmem0p1): mounted" in text


def test_agent_as_init_from_initrd(guests: list[Guest], tmp_path: Path) -> None:
    initrd = artifact("initrd.img")
    guest = boot(guests, tmp_path, ["-initrd", str(initrd)], "rdinit=/usr/bin/kata-agent")
    # The agent's own log lines on the console show it survived init setup and started.
    text = guest.wait_for("Run /usr/bin/kata-agent as init process", "kata_agent")
    assert "Kernel panic" not in text
    assert "init setup failed" not in text


def test_agent_as_init_from_read_only_disk(guests: list[Guest], tmp_path: Path) -> None:
    disk = artifact("rootfs.img")
    args = ["-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
    guest = boot(guests, tmp_path, args,
                 "root=/dev/vda1 rootfstype=ext4 ro init=/usr/bin/kata-agent")
    text = guest.wait_for("Run /usr/bin/kata-agent as init process", "kata_agent")
    assert "Kernel panic" not in text
    assert "init setup failed" not in text


def test_aarch64_initrd_boots_to_kata_target(guests: list[Guest], tmp_path: Path) -> None:
    build = REPO / "build" / "aarch64"
    kernel = Path(os.environ.get("KERNEL_AARCH64", build / "Image"))
    if not kernel.exists():
        pytest.skip(f"host capability missing: aarch64 kernel {kernel} (or KERNEL_AARCH64=)")
    initrd = build / "initrd.img"
    if not initrd.exists():
        pytest.skip(f"host capability missing: {initrd} (make image ARCH=aarch64)")
    guest = Guest(tmp_path, ["-initrd", str(initrd)], "rdinit=/init",
                  qemu_name="qemu-system-aarch64",
                  machine=("-machine", "virt", "-cpu", "cortex-a57"),
                  kernel=kernel, console="ttyAMA0")
    guests.append(guest)
    guest.wait_for(AGENT_STARTED, TARGET_REACHED)
