"""Disk image from a small tree: DAX layout on disk, a clean ext4 at 3 MiB, identical rebuilds."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "image-build"))

from kata_image import disk, nsdax  # noqa: E402

EPOCH = 1_700_000_000
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
    reason="host capability missing: e2fsprogs (mke2fs, debugfs)")


def small_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("kata\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "kata-agent").write_text("#!/usr/bin/python3 -Iu\n")
    (root / "usr" / "bin" / "kata-agent").chmod(0o755)
    (root / "init").symlink_to("/usr/lib/systemd/systemd")


def test_layout_on_disk_and_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "root"
    small_tree(root)
    img = tmp_path / "rootfs.img"
    layout = disk.write_disk_image(root, img, "seed", EPOCH)
    data = img.read_bytes()
    assert len(data) == layout.image_size == 128 * MIB
    assert data[510:512] == b"\x55\xaa"
    assert data[4096:4112] == b"NVDIMM_PFN_INFO\0"
    assert data[4096:8192] == nsdax.pfn_info_block()
    assert data[2 * MIB + 510:2 * MIB + 512] == b"\x55\xaa"
    (outer_start,) = struct.unpack_from("<I", data, 446 + 8)
    (inner_start,) = struct.unpack_from("<I", data, 2 * MIB + 446 + 8)
    assert outer_start * 512 == 3 * MIB == 2 * MIB + inner_start * 512
    # The ext4 superblock magic sits 1024 + 56 bytes into the partition.
    assert data[3 * MIB + 1024 + 56:3 * MIB + 1024 + 58] == b"\x53\xef"

    spec = f"{img}?offset={3 * MIB}"
    fsck = subprocess.run(["e2fsck", "-fn", spec], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", spec],
                         capture_output=True, text=True, check=True)
    assert cat.stdout == "kata\n"
    stat = subprocess.run(["debugfs", "-R", "stat /usr/bin/kata-agent", spec],
                          capture_output=True, text=True, check=True).stdout
    assert "Mode:  0755" in stat and "User:     0" in stat


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "root"
    small_tree(root)
    disk.write_disk_image(root, tmp_path / "a.img", "seed", EPOCH)
    disk.write_disk_image(root, tmp_path / "b.img", "seed", EPOCH)
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    disk.write_disk_image(root, tmp_path / "c.img", "other-seed", EPOCH)
    assert (tmp_path / "a.img").read_bytes() != (tmp_path / "c.img").read_bytes()


def test_size_grows_with_content(tmp_path: Path) -> None:
    usage = disk.TreeUsage(files=10, bytes_in_blocks=200 * MIB)
    assert disk.filesystem_bytes(usage) > 200 * MIB
    assert nsdax.image_size_for(disk.filesystem_bytes(usage)) == 384 * MIB
