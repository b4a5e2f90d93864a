"""On-disk structures of the Kata disk image: MBR partition tables and the NVDIMM PFN info block.

Layout of the image (offsets in bytes, MiB = 1 << 20):

    0          MBR #1: one Linux partition from 3 MiB to the end (read as /dev/vda)
    4 KiB      PFN info block "NVDIMM_PFN_INFO": data starts at 2 MiB, 2 MiB aligned
    2 MiB      MBR #2: one Linux partition from 1 MiB (of the data area) to the end
    3 MiB      ext4 root filesystem: /dev/vda1 and /dev/pmem0p1 are the same bytes

With an NVDIMM the kernel's pfn driver reads the info block at 4 KiB of the namespace and
exposes the data area (from 2 MiB) as /dev/pmem0, whose own table is MBR #2. A plain block
device ignores the info block and reads MBR #1. Both tables point at the same sectors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
MIB = 1 << 20
PFN_INFO_OFFSET = 4096
PFN_INFO_SIZE = 4096
DAX_DATA_OFFSET = 2 * MIB  # dataoff: the pmem device starts here
DAX_ALIGNMENT = 2 * MIB  # huge-page alignment of the mapping
INNER_PARTITION_START = 1 * MIB  # relative to the data area
ROOT_PARTITION_START = DAX_DATA_OFFSET + INNER_PARTITION_START  # 3 MiB in the file
IMAGE_ALIGNMENT = 128 * MIB  # NVDIMM backing files are sized in these steps

PFN_SIGNATURE = b"NVDIMM_PFN_INFO\0"
PFN_MODE_RAM = 1  # the struct page array lives in guest RAM, not on the device
PFN_VERSION_MAJOR = 0
PFN_VERSION_MINOR = 2  # fields up to and including `align` are meaningful

MBR_TYPE_LINUX = 0x83
MBR_BOOT_SIGNATURE = b"\x55\xaa"
MBR_TABLE_OFFSET = 446
MBR_DISK_ID_OFFSET = 440

# struct nd_pfn_sb, little endian, 4096 bytes: signature, uuid, parent_uuid, flags,
# version_major, version_minor, dataoff, npfns, mode, start_pad, end_trunc, align,
# padding, checksum.
_PFN_HEAD = struct.Struct("<16s16s16sIHHQQIIII")
_PFN_PADDING = PFN_INFO_SIZE - _PFN_HEAD.size - 8
assert _PFN_HEAD.size == 88 and _PFN_PADDING == 4000


def fletcher64(data: bytes) -> int:
    """The nvdimm checksum: Fletcher over little-endian 32-bit words, sums kept mod 2**32."""
    if len(data) % 4:
        raise ValueError("fletcher64 needs a multiple of 4 bytes")
    lo = 0
    hi = 0
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFF
    return (hi << 32) | lo


def pfn_info_block(dataoff: int = DAX_DATA_OFFSET, align: int = DAX_ALIGNMENT) -> bytes:
    """The 4 KiB info block written at PFN_INFO_OFFSET; the checksum covers it with a zero sum."""
    if dataoff <= 0 or dataoff % PFN_INFO_SIZE or align <= 0 or align & (align - 1):
        raise ValueError(f"bad PFN layout dataoff={dataoff} align={align}")
    head = _PFN_HEAD.pack(
        PFN_SIGNATURE, bytes(16), bytes(16), 0, PFN_VERSION_MAJOR, PFN_VERSION_MINOR,
        dataoff, 0, PFN_MODE_RAM, 0, 0, align,
    )
    body = head + bytes(_PFN_PADDING)
    return body + struct.pack("<Q", fletcher64(body + bytes(8)))


def _chs(lba: int) -> bytes:
    """Cylinder/head/sector of an LBA with the usual 255x63 geometry, capped at 1023/254/63."""
    heads, sectors = 255, 63
    cylinder = lba // (heads * sectors)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head = (lba // sectors) % heads
    sector = lba % sectors + 1
    return bytes((head, ((cylinder >> 2) & 0xC0) | sector, cylinder & 0xFF))


@dataclass(frozen=True, slots=True)
class Partition:
    start_lba: int
    sectors: int
    kind: int = MBR_TYPE_LINUX
    bootable: bool = False

    def entry(self) -> bytes:
        if self.start_lba <= 0 or self.sectors <= 0 or self.start_lba + self.sectors > 1 << 32:
            raise ValueError(f"partition out of MBR range: {self}")
        return (
            bytes((0x80 if self.bootable else 0x00,))
            + _chs(self.start_lba)
            + bytes((self.kind,))
            + _chs(self.start_lba + self.sectors - 1)
            + struct.pack("<II", self.start_lba, self.sectors)
        )


def mbr(partitions: list[Partition], disk_id: int) -> bytes:
    """A 512-byte master boot record with no boot code."""
    if len(partitions) > 4:
        raise ValueError("an MBR holds at most 4 primary partitions")
    table = b"".join(p.entry() for p in partitions).ljust(64, b"\0")
    head = bytes(MBR_DISK_ID_OFFSET) + struct.pack("<I", disk_id) + b"\0\0"
    sector = head + table + MBR_BOOT_SIGNATURE
    assert len(sector) == SECTOR
    return sector


@dataclass(frozen=True, slots=True)
class DaxLayout:
    """Offsets of a DAX-capable image of a given total size."""

    image_size: int

    def __post_init__(self) -> None:
        if self.image_size % MIB or self.image_size <= ROOT_PARTITION_START + MIB:
            raise ValueError(f"image size {self.image_size} must be whole MiB above 4 MiB")

    @property
    def root_offset(self) -> int:
        return ROOT_PARTITION_START

    @property
    def root_size(self) -> int:
        return self.image_size - ROOT_PARTITION_START

    def outer_mbr(self, disk_id: int) -> bytes:
        return mbr([Partition(ROOT_PARTITION_START // SECTOR, self.root_size // SECTOR)], disk_id)

    def inner_mbr(self, disk_id: int) -> bytes:
        return mbr([Partition(INNER_PARTITION_START // SECTOR, self.root_size // SECTOR)], disk_id)

    def header_writes(self, disk_id: int) -> list[tuple[int, bytes]]:
        """(offset, bytes) to write over a file already holding the filesystem at 3 MiB."""
        return [
            (0, self.outer_mbr(disk_id)),
            (PFN_INFO_OFFSET, pfn_info_block()),
            (DAX_DATA_OFFSET, self.inner_mbr(disk_id)),
        ]


def image_size_for(fs_bytes: int) -> int:
    """Smallest 128 MiB multiple holding the 3 MiB header area and the filesystem."""
    total = ROOT_PARTITION_START + fs_bytes
    return (total + IMAGE_ALIGNMENT - 1) // IMAGE_ALIGNMENT * IMAGE_ALIGNMENT
