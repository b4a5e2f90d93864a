"""Golden bytes of the disk image structures: PFN info block, both MBRs, the layout."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "image-build"))

from kata_image import nsdax

MIB = 1 << 20


def test_pfn_info_block_fields_at_kernel_offsets() -> None:
    block = nsdax.pfn_info_block()
    assert len(block) == 4096
    assert block[0:16] == b"NVDIMM_PFN_INFO\x00"
    assert block[16:48] == bytes(32)  # uuid, parent_uuid: zero for a label-less namespace
    assert struct.unpack_from("<I", block, 48) == (0,)  # flags
    assert struct.unpack_from("<HH", block, 52) == (0, 2)  # version major, minor
    assert struct.unpack_from("<QQ", block, 56) == (2 * MIB, 0)  # dataoff, npfns
    assert struct.unpack_from("<IIII", block, 72) == (1, 0, 0, 2 * MIB)  # mode RAM, pads, align
    assert block[88:4088] == bytes(4000)


def test_pfn_info_block_golden_checksum() -> None:
    # Cross-checked against a C implementation of the kernel's nd_fletcher64.
    assert nsdax.pfn_info_block()[4088:].hex() == "303894e32b035b68"


def test_fletcher64_definition() -> None:
    data = struct.pack("<4I", 1, 2, 3, 0xFFFFFFFF)
    lo = (1 + 2 + 3 + 0xFFFFFFFF) & 0xFFFFFFFF
    hi = (1 + 3 + 6 + lo) & 0xFFFFFFFF
    assert nsdax.fletcher64(data) == (hi << 32) | lo
    with pytest.raises(ValueError):
        nsdax.fletcher64(b"abc")


def test_checksum_of_block_with_zeroed_sum_matches_stored() -> None:
    block = nsdax.pfn_info_block(dataoff=4 * MIB, align=MIB)
    stored = struct.unpack_from("<Q", block, 4088)[0]
    assert nsdax.fletcher64(block[:4088] + bytes(8)) == stored
    assert struct.unpack_from("<Q", block, 56)[0] == 4 * MIB


@pytest.mark.parametrize(("dataoff", "align"), [(0, 2 * MIB), (2 * MIB + 1, 2 * MIB),
                                                (2 * MIB, 3 * MIB)])
def test_pfn_info_block_rejects_bad_layout(dataoff: int, align: int) -> None:
    with pytest.raises(ValueError):
        nsdax.pfn_info_block(dataoff=dataoff, align=align)


def test_outer_mbr_golden() -> None:
    sector = nsdax.DaxLayout(256 * MIB).outer_mbr(0x12345678)
    assert len(sector) == 512
    assert sector[:440] == bytes(440)  # no boot code
    assert sector[440:446] == bytes.fromhex("785634120000")
    # active=0, CHS(6144)=h97 s34 c0, type 0x83, CHS(524287)=h162 s2 c32, LBA 6144, 518144 sectors
    assert sector[446:462] == bytes.fromhex("00612200" "83a20220" "00180000" "00e80700")
    assert sector[462:510] == bytes(48)
    assert sector[510:] == b"\x55\xaa"


def test_inner_mbr_golden() -> None:
    sector = nsdax.DaxLayout(256 * MIB).inner_mbr(0x12345678)
    # LBA 2048 (1 MiB into the data area) = CHS h32 s33 c0; end 520191 = h97 s1 c32.
    assert sector[446:462] == bytes.fromhex("00202100" "83610120" "00080000" "00e80700")
    assert sector[510:] == b"\x55\xaa"


def test_both_tables_point_at_the_same_bytes() -> None:
    layout = nsdax.DaxLayout(384 * MIB)
    outer = layout.outer_mbr(1)
    inner = layout.inner_mbr(1)
    outer_lba, outer_len = struct.unpack_from("<II", outer, 446 + 8)
    inner_lba, inner_len = struct.unpack_from("<II", inner, 446 + 8)
    assert outer_lba * 512 == 3 * MIB == layout.root_offset
    assert nsdax.DAX_DATA_OFFSET + inner_lba * 512 == outer_lba * 512
    assert outer_len == inner_len == (384 - 3) * MIB // 512
    assert outer_lba * 512 + outer_len * 512 == layout.image_size


def test_header_writes_offsets() -> None:
    writes = nsdax.DaxLayout(128 * MIB).header_writes(7)
    assert [(off, len(data)) for off, data in writes] == [(0, 512), (4096, 4096), (2 * MIB, 512)]


def test_image_size_rounds_to_128_mib() -> None:
    assert nsdax.image_size_for(1) == 128 * MIB
    assert nsdax.image_size_for(125 * MIB) == 128 * MIB
    assert nsdax.image_size_for(125 * MIB + 1) == 256 * MIB
    with pytest.raises(ValueError):
        nsdax.DaxLayout(3 * MIB)


def test_partition_entry_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        nsdax.Partition(0, 10).entry()
    with pytest.raises(ValueError):
        nsdax.Partition(1, 1 << 32).entry()
    with pytest.raises(ValueError):
        nsdax.mbr([nsdax.Partition(1, 1)] * 5, 0)


def test_chs_caps_beyond_1023_cylinders() -> None:
    entry = nsdax.Partition(2048, 40_000_000).entry()
    assert entry[1:4] == bytes.fromhex("202100")
    assert entry[5:8] == b"\xfe\xff\xff"
