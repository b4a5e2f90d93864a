"""Disk image without loop devices: ext4 written by mke2fs at an offset, tables by nsdax."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .common import round_up, run
from .nsdax import MIB, DaxLayout, image_size_for

log = logging.getLogger(__name__)

BLOCK = 4096
INODE_SIZE = 256
# Room beyond the files: journal, directories, metadata and some free space for the guest.
SLACK_BYTES = 48 * MIB
SLACK_RATIO = 1.15
# ext4 reserved blocks for root, as Kata's image builder sets.
RESERVED_PERCENT = 3

KERNEL_ARGS_VIRTIO = "root=/dev/vda1 rootfstype=ext4 ro"
KERNEL_ARGS_PMEM = (
    "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro rootfstype=ext4 ro"
)


@dataclass(frozen=True, slots=True)
class TreeUsage:
    files: int
    bytes_in_blocks: int  # file and symlink bytes rounded to whole blocks


def measure(root: Path) -> TreeUsage:
    count = 0
    used = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            count += 1
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            used += round_up(max(st.st_size, 1), BLOCK)
    return TreeUsage(count, used)


def filesystem_bytes(usage: TreeUsage) -> int:
    inodes = usage.files * INODE_SIZE * 2
    return round_up(int(usage.bytes_in_blocks * SLACK_RATIO) + inodes + SLACK_BYTES, MIB)


def stable_uuid(seed: str, purpose: str) -> uuid.UUID:
    """A UUID that depends only on the build inputs, so images are reproducible."""
    return uuid.UUID(bytes=hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:16], version=4)


def write_disk_image(root: Path, dest: Path, seed: str, epoch: int) -> DaxLayout:
    """ext4 of root at 3 MiB of dest, MBR #1 at 0, PFN info at 4 KiB, MBR #2 at 2 MiB."""
    usage = measure(root)
    layout = DaxLayout(image_size_for(filesystem_bytes(usage)))
    fs_uuid = stable_uuid(seed, "ext4")
    hash_seed = stable_uuid(seed, "htree")
    disk_id = int.from_bytes(stable_uuid(seed, "mbr").bytes[:4], "little")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with tmp.open("wb") as f:
        f.truncate(layout.image_size)
    log.info("step=disk size_mib=%d files=%d", layout.image_size // MIB, usage.files)
    fake_time = {"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)}
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE),
         "-m", str(RESERVED_PERCENT), "-L", "kata-root", "-U", str(fs_uuid),
         "-E", f"offset={layout.root_offset},root_owner=0:0,hash_seed={hash_seed},nodiscard",
         "-d", str(root), str(tmp), str(layout.root_size // BLOCK)],
        env=fake_time)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for offset, data in layout.header_writes(disk_id):
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    return layout
