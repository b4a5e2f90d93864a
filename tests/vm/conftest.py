"""Shared fixtures of the vm tier: built (or cached) guest kernels and tiny test initrds."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "image-build" / "build-kernel.sh"
KERNEL_FILE = {"x86_64": "vmlinuz", "aarch64": "Image"}
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
CROSS_GCC = "aarch64-linux-gnu-gcc"
DEFAULT_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# A kernel build on two shared cores takes minutes; the boot itself seconds.
BUILD_TIMEOUT = 3600
MARKER = "kata-init: done"


@dataclass(frozen=True)
class BuiltKernel:
    arch: str
    path: Path
    manifest: dict[str, object]

    @property
    def release(self) -> str:
        return str(self.manifest["version"])


def _require(arch: str) -> None:
    if shutil.which(QEMU[arch]) is None:
        pytest.skip(f"host capability missing: {QEMU[arch]}")
    if (
        os.environ.get("KERNEL_SRC") is None
        and not Path(os.environ.get("KERNEL_TARBALL", DEFAULT_TARBALL)).is_file()
    ):
        pytest.skip(f"host capability missing: kernel source {DEFAULT_TARBALL} (linux-source-6.1)")
    if arch == "aarch64" and shutil.which(CROSS_GCC) is None:
        pytest.skip(f"host capability missing: {CROSS_GCC} (gcc-aarch64-linux-gnu)")


def build_kernel(arch: str, log_dir: Path) -> BuiltKernel:
    """Run the real build script: a cache hit returns in seconds, a miss builds the kernel."""
    _require(arch)
    log_path = log_dir / f"build-kernel-{arch}.log"
    with log_path.open("wb") as log:
        result = subprocess.run(
            [str(BUILD_SCRIPT), arch],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    output = log_path.read_text(errors="replace")
    assert result.returncode == 0, f"kernel build failed:\n{output[-4000:]}"
    build_dir = Path(os.environ.get("BUILD_DIR", ROOT / "build")) / arch
    manifest = json.loads((build_dir / "kernel.json").read_text())
    kernel = build_dir / KERNEL_FILE[arch]
    assert kernel.stat().st_size == manifest["files"][KERNEL_FILE[arch]]["size"]
    return BuiltKernel(arch=arch, path=kernel, manifest=manifest)


@pytest.fixture(scope="session")
def x86_64_kernel(tmp_path_factory: pytest.TempPathFactory) -> BuiltKernel:
    return build_kernel("x86_64", tmp_path_factory.mktemp("kernel-x86_64"))


@pytest.fixture(scope="session")
def aarch64_kernel(tmp_path_factory: pytest.TempPathFactory) -> BuiltKernel:
    return build_kernel("aarch64", tmp_path_factory.mktemp("kernel-aarch64"))


# --- initramfs (cpio "newc") ----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int  # full st_mode including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """An initramfs archive in the kernel's "newc" cpio format (no root needed for nodes)."""
    out = bytearray()
    ino = 1
    for entry in [*entries, Entry("TRAILER!!!", 0)]:
        name = entry.name.encode() + b"\0"
        fields = [
            ino,
            entry.mode,
            0,
            0,
            1,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        ]
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
        ino += 1
    return bytes(out)


DIR, FILE, CHR, LNK = 0o040000, 0o100000, 0o020000, 0o120000


def base_entries() -> list[Entry]:
    # /dev/console must exist in the archive: the kernel opens it for init's stdio
    # before init can mount devtmpfs.
    return [Entry(d, DIR | 0o755) for d in ("bin", "dev", "proc", "sys", "mnt")] + [
        Entry("dev/console", CHR | 0o600, rdev=(5, 1)),
    ]


BUSYBOX_INIT = f"""#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
echo "kata-init: kernel $($bb uname -r)"
# Port names arrive from the host over the control queue after the virtio-serial device is
# bound; wait for them with a deadline, and only when such a device exists.
tries=0
$bb ls -d /sys/bus/virtio/drivers/virtio_console/virtio* >/dev/null 2>&1 || tries=80
while [ "$tries" -lt 80 ]; do
    names=$($bb cat /sys/class/virtio-ports/*/name 2>/dev/null)
    [ -n "$names" ] && break
    $bb sleep 0.25
    tries=$((tries + 1))
done
for f in /sys/class/virtio-ports/*/name; do
    [ -e "$f" ] && echo "virtio-port: $($bb cat "$f")"
done
$bb ls -d /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* >/dev/null 2>&1 \\
    && echo "vsock: present"
if $bb grep -q kataShared /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null; then
    $bb mount -t 9p -o trans=virtio,version=9p2000.L kataShared /mnt \\
        && echo "share: $($bb cat /mnt/hello.txt)"
fi
if $bb grep -q kata.hold /proc/cmdline; then
    echo "kata-init: holding"
    while true; do $bb sleep 3600; done
fi
echo "{MARKER}"
$bb sync
$bb poweroff -f
"""

C_INIT = r"""
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static int print_ports(int print) {
    int found = 0;
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *ent;
    while (dir && (ent = readdir(dir)) != NULL) {
        char path[512], name[256] = "";
        FILE *f;
        if (ent->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", ent->d_name);
        f = fopen(path, "r");
        if (!f) continue;
        if (fgets(name, sizeof name, f) && name[0] != '\0' && name[0] != '\n') {
            name[strcspn(name, "\n")] = '\0';
            found = 1;
            if (print) printf("virtio-port: %s\n", name);
        }
        fclose(f);
    }
    if (dir) closedir(dir);
    return found;
}

static int has_console_device(void) {
    int found = 0;
    DIR *dir = opendir("/sys/bus/virtio/drivers/virtio_console");
    struct dirent *ent;
    while (dir && (ent = readdir(dir)) != NULL)
        if (strncmp(ent->d_name, "virtio", 6) == 0) found = 1;
    if (dir) closedir(dir);
    return found;
}

int main(void) {
    struct utsname uts;
    struct timespec step = {0, 250000000};
    int tries;
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    uname(&uts);
    printf("kata-init: kernel %s\n", uts.release);
    /* Port names arrive from the host over the control queue; wait with a deadline. */
    if (has_console_device())
        for (tries = 0; tries < 80 && !print_ports(0); tries++) nanosleep(&step, NULL);
    print_ports(1);
    printf("%s\n", "MARKER");
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 1;
}
""".replace('"MARKER"', f'"{MARKER}"')


def busybox_initrd(dest: Path) -> Path:
    """x86_64 test initrd: the host's static busybox and a shell /init."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("host capability missing: /bin/busybox (busybox-static)")
    if shutil.which("file") is not None:
        probe = subprocess.run(
            ["file", "-b", str(busybox)], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0 and "statically linked" not in probe.stdout:
            pytest.skip("host capability missing: a static /bin/busybox (busybox-static)")
    entries = [
        *base_entries(),
        Entry("bin/busybox", FILE | 0o755, busybox.read_bytes()),
        Entry("bin/sh", LNK | 0o777, b"busybox"),
        Entry("init", FILE | 0o755, BUSYBOX_INIT.encode()),
    ]
    dest.write_bytes(gzip.compress(cpio_newc(entries)))
    return dest


def c_init_initrd(dest: Path, workdir: Path) -> Path:
    """aarch64 test initrd: a static /init cross-compiled with aarch64-linux-gnu-gcc."""
    if shutil.which(CROSS_GCC) is None:
        pytest.skip(f"host capability missing: {CROSS_GCC} (gcc-aarch64-linux-gnu)")
    source = workdir / "init.c"
    binary = workdir / "init"
    source.write_text(C_INIT)
    subprocess.run(
        [CROSS_GCC, "-static", "-Os", "-s", "-o", str(binary), str(source)],
        check=True,
        capture_output=True,
    )
    entries = [*base_entries(), Entry("init", FILE | 0o755, binary.read_bytes())]
    dest.write_bytes(gzip.compress(cpio_newc(entries)))
    return dest


InitrdMaker = Callable[[str, Path], Path]


@pytest.fixture
def make_initrd() -> InitrdMaker:
    def make(arch: str, workdir: Path) -> Path:
        dest = workdir / f"initrd-{arch}.img"
        if arch == "x86_64":
            return busybox_initrd(dest)
        return c_init_initrd(dest, workdir)

    return make


# --- disk image (MBR + one ext4 partition) ----------------------------------------------------

SECTOR = 512
PART_START = 2048  # sectors: the first partition starts at 1 MiB


def mbr(partition_sectors: int) -> bytes:
    """A DOS partition table with one Linux (0x83) partition at 1 MiB."""
    table = bytearray(SECTOR)
    entry = bytearray(16)
    entry[4] = 0x83
    entry[1:4] = entry[5:8] = b"\xfe\xff\xff"  # CHS unused: LBA addressing only
    entry[8:12] = PART_START.to_bytes(4, "little")
    entry[12:16] = partition_sectors.to_bytes(4, "little")
    table[446:462] = entry
    table[510:512] = b"\x55\xaa"
    return bytes(table)


def busybox_disk(dest: Path, workdir: Path, size_mib: int = 16) -> Path:
    """A raw disk whose first partition is ext4 holding busybox and the test init as /sbin/init."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        pytest.skip("host capability missing: mkfs.ext4 (e2fsprogs)")
    root = workdir / "rootfs"
    for sub in ("bin", "sbin", "dev", "proc", "sys", "mnt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    init = root / "sbin" / "init"
    init.write_text(BUSYBOX_INIT)
    init.chmod(0o755)
    part = workdir / "part.img"
    part_mib = size_mib - 1
    subprocess.run(
        [mkfs, "-q", "-F", "-t", "ext4", "-d", str(root), str(part), f"{part_mib}M"],
        check=True,
        capture_output=True,
    )
    with dest.open("wb") as disk:
        disk.write(mbr(part_mib * (1 << 20) // SECTOR))
        disk.write(b"\0" * (PART_START * SECTOR - SECTOR))
        with part.open("rb") as src:
            shutil.copyfileobj(src, disk)
    return dest
