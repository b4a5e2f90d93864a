"""cgroup v2: one directory in the unified hierarchy."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import HostError, SpecError
from ..resources import (
    DEFAULT_ALLOWED_DEVICES,
    BlockIO,
    Cpu,
    DeviceRule,
    LinuxResources,
    Memory,
)
from . import devices_bpf
from .base import (
    FREEZE_TIMEOUT,
    Cgroup,
    read_file,
    read_optional,
    read_pids,
    remove_tree,
    wait_until,
    write_file,
)

if TYPE_CHECKING:
    from .stats import (
        BlkioStatEntry,
        BlkioStats,
        CgroupStats,
        HugetlbStats,
    )

log = logging.getLogger(__name__)

_HUGETLB_FILE = re.compile(r"^hugetlb\.([0-9]+[KMGTP]B)\.max$")


def cpu_shares_to_weight(shares: int) -> int:
    """cpu.shares [2, 262144] -> cpu.weight [1, 10000], the linear map runc uses."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio.weight [10, 1000] -> io.weight [1, 10000], as runc."""
    if weight == 0:
        return 0
    return 1 + (weight - 10) * 9999 // 990


def memory_swap_to_v2(swap: int | None, limit: int | None) -> str | None:
    """OCI swap is memory+swap; memory.swap.max is swap alone. None: leave unchanged."""
    if swap is None or swap == 0:
        return None
    if swap == -1:
        return "max"
    if limit is None or limit == 0:
        raise SpecError("a swap limit needs a memory limit on cgroup v2",
                        field="linux.resources.memory.swap")
    if limit == -1:
        raise SpecError("a swap limit with an unlimited memory limit is meaningless",
                        field="linux.resources.memory.swap")
    if swap < limit:
        raise SpecError(f"swap (memory+swap) {swap} is below the memory limit {limit}",
                        field="linux.resources.memory.swap")
    return str(swap - limit)


def _max(v: int) -> str:
    return "max" if v < 0 else str(v)


class CgroupV2(Cgroup):
    version = 2

    def __init__(self, mount: str, path: str) -> None:
        self._mount = mount
        self._path = path
        self._dir = os.path.join(mount, path.lstrip("/"))

    def paths(self) -> Mapping[str, str]:
        return MappingProxyType({"": self._dir})

    # --- layout -------------------------------------------------------------------------

    def create(self) -> None:
        parent = self._mount
        for part in [p for p in self._path.split("/") if p]:
            self._enable_controllers(parent)
            child = os.path.join(parent, part)
            try:
                os.mkdir(child, 0o755)
            except FileExistsError:
                pass
            except OSError as e:
                raise HostError(f"mkdir {child}: {e.strerror}", errno=e.errno or 0) from e
            parent = child
        try:
            devices_bpf.attach(self._dir, DEFAULT_ALLOWED_DEVICES)
        except HostError as e:
            log.warning("default device policy not installed path=%s error=%s", self._dir, e)
        log.info("cgroup created version=2 path=%s", self._path)

    def _enable_controllers(self, d: str) -> None:
        available = (read_optional(d, "cgroup.controllers") or "").split()
        enabled = set((read_optional(d, "cgroup.subtree_control") or "").split())
        for ctrl in available:
            if ctrl in enabled:
                continue
            try:
                write_file(d, "cgroup.subtree_control", f"+{ctrl}")
            except HostError as e:
                # Some controllers refuse (threaded subtree, processes in an inner node).
                log.warning("controller not enabled dir=%s controller=%s error=%s", d, ctrl, e)

    def _has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self._dir, name))

    def _controllers(self) -> set[str]:
        return set((read_optional(self._dir, "cgroup.controllers") or "").split())

    # --- resources ----------------------------------------------------------------------

    def apply(self, res: LinuxResources) -> None:
        d = self._dir
        if res.memory is not None:
            self._apply_memory(d, res.memory)
        if res.cpu is not None:
            self._apply_cpu(d, res.cpu)
        if res.pids is not None:
            write_file(d, "pids.max", str(res.pids.limit) if res.pids.limit > 0 else "max")
        if res.block_io is not None:
            self._apply_io(d, res.block_io)
        for h in res.hugepage_limits:
            write_file(d, f"hugetlb.{h.page_size}.max", str(h.limit))
        if res.network is not None and (res.network.class_id is not None
                                        or res.network.priorities):
            log.warning("net_cls/net_prio do not exist on cgroup v2, settings skipped")
        self._apply_unified(d, res.unified)
        if res.devices:
            self._apply_devices(res.devices)

    def _apply_memory(self, d: str, m: Memory) -> None:
        from .stats import parse_int

        swap = memory_swap_to_v2(m.swap, m.limit)
        if m.check_before_update and m.limit is not None and m.limit > 0:
            usage = parse_int(read_file(d, "memory.current"))
            if usage > m.limit:
                raise HostError(f"memory usage {usage} is above the new limit {m.limit}",
                                errno=errno.EBUSY)
        if swap is not None:
            if self._has("memory.swap.max"):
                write_file(d, "memory.swap.max", swap)
            else:
                log.warning("swap accounting unavailable, swap limit skipped")
        if m.limit is not None and m.limit != 0:
            write_file(d, "memory.max", _max(m.limit))
        if m.reservation is not None and m.reservation != 0:
            write_file(d, "memory.low", _max(m.reservation))
        for name, val in (("kernel", m.kernel), ("kernelTCP", m.kernel_tcp),
                          ("swappiness", m.swappiness),
                          ("disableOOMKiller", m.disable_oom_killer)):
            if val:
                log.warning("memory.%s has no cgroup v2 equivalent, skipped", name)

    def _apply_cpu(self, d: str, c: Cpu) -> None:
        if c.realtime_runtime or c.realtime_period:
            raise HostError("realtime cpu limits are not supported on cgroup v2",
                            errno=errno.ENOTSUP)
        if c.shares:
            write_file(d, "cpu.weight", str(cpu_shares_to_weight(c.shares)))
        if c.quota or c.period:
            if c.quota:
                quota = "max" if c.quota < 0 else str(c.quota)
            else:
                # Only the period changes: keep the quota already in force.
                quota = (read_optional(d, "cpu.max") or "max").split()[0]
            value = quota if not c.period else f"{quota} {c.period}"
            write_file(d, "cpu.max", value)
        if c.burst is not None:
            write_file(d, "cpu.max.burst", str(c.burst))
        if c.idle is not None:
            write_file(d, "cpu.idle", str(c.idle))
        if c.cpus:
            write_file(d, "cpuset.cpus", c.cpus)
        if c.mems:
            write_file(d, "cpuset.mems", c.mems)

    def _apply_io(self, d: str, b: BlockIO) -> None:
        bfq = self._has("io.bfq.weight")
        if b.weight is not None:
            if bfq:
                write_file(d, "io.bfq.weight", str(b.weight))
            else:
                write_file(d, "io.weight", str(blkio_weight_to_io_weight(b.weight)))
        if b.leaf_weight is not None:
            log.warning("blockIO.leafWeight has no cgroup v2 equivalent, skipped")
        for w in b.weight_device:
            if w.weight is None:
                continue
            if bfq:
                write_file(d, "io.bfq.weight", f"{w.major}:{w.minor} {w.weight}")
            else:
                write_file(d, "io.weight",
                           f"{w.major}:{w.minor} {blkio_weight_to_io_weight(w.weight)}")
        for key, devs in (
            ("rbps", b.throttle_read_bps_device),
            ("wbps", b.throttle_write_bps_device),
            ("riops", b.throttle_read_iops_device),
            ("wiops", b.throttle_write_iops_device),
        ):
            for t in devs:
                rate = "max" if t.rate == 0 else str(t.rate)
                write_file(d, "io.max", f"{t.major}:{t.minor} {key}={rate}")

    def _apply_unified(self, d: str, unified: Mapping[str, str]) -> None:
        if not unified:
            return
        controllers = self._controllers()
        for key, value in unified.items():
            ctrl = key.split(".", 1)[0]
            if not self._has(key):
                if ctrl not in controllers:
                    raise SpecError(f"controller {ctrl!r} is not available",
                                    field=f"linux.resources.unified.{key}")
                raise SpecError(f"no cgroup file {key!r}", field=f"linux.resources.unified.{key}")
            write_file(d, key, value)

    def _apply_devices(self, rules: tuple[DeviceRule, ...]) -> None:
        # Explicit rules must be enforced: failing to install them is an error.
        devices_bpf.attach(self._dir, (*rules, *DEFAULT_ALLOWED_DEVICES))

    # --- processes ----------------------------------------------------------------------

    def add_process(self, pid: int) -> None:
        write_file(self._dir, "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        return read_pids(self._dir)

    def _events(self) -> dict[str, int]:
        from .stats import parse_flat_keyed

        return parse_flat_keyed(read_file(self._dir, "cgroup.events"))

    def freeze(self) -> None:
        if not self._has("cgroup.freeze"):
            raise HostError("cgroup.freeze not available (kernel < 5.2)", errno=errno.ENOTSUP)
        write_file(self._dir, "cgroup.freeze", "1")
        try:
            wait_until(lambda: self._events().get("frozen") == 1, FREEZE_TIMEOUT,
                       "cgroup frozen")
        except HostError:
            write_file(self._dir, "cgroup.freeze", "0")
            raise

    def thaw(self) -> None:
        if not self._has("cgroup.freeze"):
            raise HostError("cgroup.freeze not available (kernel < 5.2)", errno=errno.ENOTSUP)
        write_file(self._dir, "cgroup.freeze", "0")
        wait_until(lambda: self._events().get("frozen") == 0, FREEZE_TIMEOUT, "cgroup thawed")

    def is_frozen(self) -> bool:
        return self._events().get("frozen") == 1

    def kill_all(self, sig: int) -> None:
        if sig == signal.SIGKILL and self._has("cgroup.kill"):
            write_file(self._dir, "cgroup.kill", "1")
            return
        self._signal_frozen(sig)

    def destroy(self) -> None:
        remove_tree(self._dir)
        log.info("cgroup destroyed version=2 path=%s", self._path)

    # --- statistics ---------------------------------------------------------------------

    def oom_kill_count(self) -> int:
        from .stats import parse_flat_keyed

        text = read_optional(self._dir, "memory.events") or ""
        return parse_flat_keyed(text).get("oom_kill", 0)

    def stats(self) -> CgroupStats:
        from .stats import (
            CgroupStats,
            CpuStats,
            CpuUsage,
            HugetlbStats,
            MemoryData,
            MemoryStats,
            PidsStats,
            ThrottlingData,
            parse_flat_keyed,
        )

        d = self._dir
        cpu = parse_flat_keyed(read_optional(d, "cpu.stat") or "")
        mem = parse_flat_keyed(read_optional(d, "memory.stat") or "")
        events = parse_flat_keyed(read_optional(d, "memory.events") or "")
        usage = _int(d, "memory.current")
        swap_usage = _int(d, "memory.swap.current")
        hugetlb: dict[str, HugetlbStats] = {}
        for name in sorted(os.listdir(d)):
            m = _HUGETLB_FILE.match(name)
            if m:
                size = m.group(1)
                hev = parse_flat_keyed(read_optional(d, f"hugetlb.{size}.events") or "")
                hugetlb[size] = HugetlbStats(
                    usage=_int(d, f"hugetlb.{size}.current"),
                    max_usage=_int(d, f"hugetlb.{size}.current"),
                    failcnt=hev.get("max", 0),
                )
        return CgroupStats(
            cpu=CpuStats(
                cpu_usage=CpuUsage(
                    total_usage=cpu.get("usage_usec", 0) * 1000,
                    usage_in_kernelmode=cpu.get("system_usec", 0) * 1000,
                    usage_in_usermode=cpu.get("user_usec", 0) * 1000,
                ),
                throttling_data=ThrottlingData(
                    periods=cpu.get("nr_periods", 0),
                    throttled_periods=cpu.get("nr_throttled", 0),
                    throttled_time=cpu.get("throttled_usec", 0) * 1000,
                ),
            ),
            memory=MemoryStats(
                cache=mem.get("file", 0),
                usage=MemoryData(
                    usage=usage,
                    max_usage=_int(d, "memory.peak"),
                    failcnt=events.get("max", 0),
                    limit=_int(d, "memory.max"),
                ),
                # libcontainer reports memory+swap here, as v1's memsw did.
                swap_usage=MemoryData(
                    usage=usage + swap_usage,
                    limit=_int(d, "memory.swap.max"),
                ),
                use_hierarchy=True,
                stats=MappingProxyType(mem),
            ),
            pids=PidsStats(current=_int(d, "pids.current"), limit=_int(d, "pids.max")),
            blkio=self._io_stats(d),
            hugetlb=MappingProxyType(hugetlb),
        )

    def _io_stats(self, d: str) -> BlkioStats:
        from .stats import BlkioStatEntry, BlkioStats, parse_nested_keyed

        io = parse_nested_keyed(read_optional(d, "io.stat") or "")
        service_bytes: list[BlkioStatEntry] = []
        serviced: list[BlkioStatEntry] = []
        for dev, fields in io.items():
            maj, _, mnr = dev.partition(":")
            try:
                major, minor = int(maj), int(mnr)
            except ValueError:
                continue
            for op, bkey, ikey in (("Read", "rbytes", "rios"), ("Write", "wbytes", "wios"),
                                   ("Discard", "dbytes", "dios")):
                if bkey in fields:
                    service_bytes.append(BlkioStatEntry(major, minor, op, fields[bkey]))
                if ikey in fields:
                    serviced.append(BlkioStatEntry(major, minor, op, fields[ikey]))
        return BlkioStats(io_service_bytes_recursive=tuple(service_bytes),
                          io_serviced_recursive=tuple(serviced))


def _int(d: str, name: str) -> int:
    from .stats import parse_int

    text = read_optional(d, name)
    if text is None:
        return 0
    try:
        return parse_int(text)
    except ValueError:
        return 0
