"""Container resource statistics, shaped like libcontainer's cgroups.Stats.

Parsers for the cgroup file formats (flat keyed, nested keyed, per-cpu lists, blkio
tables) are shared by the v1 and v2 backends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from types import MappingProxyType


def _empty() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ThrottlingData:
    periods: int = 0
    throttled_periods: int = 0
    throttled_time: int = 0  # nanoseconds


@dataclass(frozen=True, slots=True)
class CpuUsage:
    total_usage: int = 0  # nanoseconds
    percpu_usage: tuple[int, ...] = ()
    percpu_usage_in_kernelmode: tuple[int, ...] = ()
    percpu_usage_in_usermode: tuple[int, ...] = ()
    usage_in_kernelmode: int = 0
    usage_in_usermode: int = 0


@dataclass(frozen=True, slots=True)
class CpuStats:
    cpu_usage: CpuUsage = CpuUsage()
    throttling_data: ThrottlingData = ThrottlingData()


@dataclass(frozen=True, slots=True)
class MemoryData:
    usage: int = 0
    max_usage: int = 0
    failcnt: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class MemoryStats:
    cache: int = 0
    usage: MemoryData = MemoryData()
    swap_usage: MemoryData = MemoryData()
    kernel_usage: MemoryData = MemoryData()
    kernel_tcp_usage: MemoryData = MemoryData()
    use_hierarchy: bool = False
    stats: Mapping[str, int] = dc_field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class PidsStats:
    current: int = 0
    limit: int = 0  # 0: no limit


@dataclass(frozen=True, slots=True)
class BlkioStatEntry:
    major: int
    minor: int
    op: str
    value: int


@dataclass(frozen=True, slots=True)
class BlkioStats:
    io_service_bytes_recursive: tuple[BlkioStatEntry, ...] = ()
    io_serviced_recursive: tuple[BlkioStatEntry, ...] = ()
    io_queued_recursive: tuple[BlkioStatEntry, ...] = ()
    io_service_time_recursive: tuple[BlkioStatEntry, ...] = ()
    io_wait_time_recursive: tuple[BlkioStatEntry, ...] = ()
    io_merged_recursive: tuple[BlkioStatEntry, ...] = ()
    io_time_recursive: tuple[BlkioStatEntry, ...] = ()
    sectors_recursive: tuple[BlkioStatEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class HugetlbStats:
    usage: int = 0
    max_usage: int = 0
    failcnt: int = 0


@dataclass(frozen=True, slots=True)
class CgroupStats:
    cpu: CpuStats = CpuStats()
    memory: MemoryStats = MemoryStats()
    pids: PidsStats = PidsStats()
    blkio: BlkioStats = BlkioStats()
    hugetlb: Mapping[str, HugetlbStats] = dc_field(
        default_factory=lambda: MappingProxyType({})
    )


def parse_int(text: str) -> int:
    """A single-value file; "max" reads as 0 (no limit) like libcontainer."""
    t = text.strip()
    if t in ("max", ""):
        return 0
    return int(t)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Lines of "key value" (memory.stat, cpu.stat, memory.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_nested_keyed(text: str) -> dict[str, dict[str, int]]:
    """Lines of "name k1=v1 k2=v2" (io.stat)."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        fields: dict[str, int] = {}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            if sep:
                try:
                    fields[k] = int(v)
                except ValueError:
                    continue
        out[parts[0]] = fields
    return out


def parse_int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split())


def parse_blkio(text: str) -> tuple[BlkioStatEntry, ...]:
    """v1 blkio tables: "maj:min Op value" lines plus a "Total value" line (skipped);
    files without an op column ("maj:min value") get op "" (sectors, io_time)."""
    out: list[BlkioStatEntry] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        maj, _, mnr = parts[0].partition(":")
        try:
            if len(parts) == 3:
                out.append(BlkioStatEntry(int(maj), int(mnr), parts[1], int(parts[2])))
            elif len(parts) == 2:
                out.append(BlkioStatEntry(int(maj), int(mnr), "", int(parts[1])))
        except ValueError:
            continue
    return tuple(out)
