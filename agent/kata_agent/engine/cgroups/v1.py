"""cgroup v1: one directory per controller hierarchy."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import HostError, SpecError
from ..resources import (
    DEFAULT_ALLOWED_DEVICES,
    BlockIO,
    Cpu,
    DeviceRule,
    HugepageLimit,
    InterfacePriority,
    LinuxResources,
    Memory,
)
from .base import (
    FREEZE_TIMEOUT,
    Cgroup,
    read_file,
    read_optional,
    read_pids,
    remove_tree,
    sys_write_best_effort,
    wait_until,
    write_file,
)

if TYPE_CHECKING:
    from .stats import (
        BlkioStatEntry,
        BlkioStats,
        CgroupStats,
        CpuStats,
        HugetlbStats,
        MemoryData,
        MemoryStats,
        PidsStats,
    )

log = logging.getLogger(__name__)

CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio",
    "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc",
})

_HUGETLB_FILE = re.compile(r"^hugetlb\.([0-9]+[KMGTP]B)\.limit_in_bytes$")


def find_hierarchies(root: str) -> dict[str, str]:
    """controller -> mount directory, from the directories under ``root``
    ("cpu,cpuacct" serves both; alias symlinks are skipped)."""
    found: dict[str, str] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        raise HostError(f"list {root}: {e.strerror}", errno=e.errno or 0) from e
    for entry in entries:
        d = os.path.join(root, entry)
        if os.path.islink(d) or not os.path.isfile(os.path.join(d, "tasks")):
            continue
        for ctrl in entry.split(","):
            if ctrl in CONTROLLERS:
                found[ctrl] = d
    return found


def _neg_to_unlimited(v: int) -> str:
    return "-1" if v < 0 else str(v)


class CgroupV1(Cgroup):
    version = 1

    def __init__(self, hierarchies: Mapping[str, str], path: str) -> None:
        self._mounts = dict(hierarchies)
        self._path = path
        self._dirs = {c: os.path.join(m, path.lstrip("/")) for c, m in self._mounts.items()}

    # --- layout -------------------------------------------------------------------------

    def paths(self) -> Mapping[str, str]:
        return MappingProxyType(dict(self._dirs))

    def _unique_dirs(self) -> list[str]:
        return sorted(set(self._dirs.values()))

    def _dir(self, ctrl: str) -> str | None:
        return self._dirs.get(ctrl)

    def create(self) -> None:
        for d in self._unique_dirs():
            os.makedirs(d, exist_ok=True)
        cpuset = self._mounts.get("cpuset")
        if cpuset is not None:
            self._fill_cpuset(cpuset)
        devices = self._dir("devices")
        if devices is not None:
            self._write_devices(devices, ())
        log.info("cgroup created version=1 path=%s", self._path)

    def _fill_cpuset(self, mount: str) -> None:
        # A new cpuset cgroup starts with empty cpus/mems and refuses tasks until filled.
        parent = mount
        for part in [p for p in self._path.split("/") if p]:
            child = os.path.join(parent, part)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if read_file(child, name).strip() == "":
                    write_file(child, name, read_file(parent, name).strip())
            parent = child

    # --- resources ----------------------------------------------------------------------

    def apply(self, res: LinuxResources) -> None:
        if res.unified:
            raise SpecError("unified resources need cgroup v2", field="linux.resources.unified")
        if res.memory is not None:
            self._with("memory", lambda d: self._apply_memory(d, res.memory))
        if res.cpu is not None:
            cpu = res.cpu
            self._with("cpu", lambda d: self._apply_cpu(d, cpu))
            if cpu.cpus or cpu.mems:
                self._with("cpuset", lambda d: self._apply_cpuset(d, cpu))
        if res.pids is not None:
            limit = res.pids.limit
            self._with("pids", lambda d: write_file(d, "pids.max",
                                                    str(limit) if limit > 0 else "max"))
        if res.block_io is not None:
            bio = res.block_io
            self._with("blkio", lambda d: self._apply_blkio(d, bio))
        if res.hugepage_limits:
            huge = res.hugepage_limits
            self._with("hugetlb", lambda d: self._apply_hugetlb(d, huge))
        if res.network is not None:
            net = res.network
            if net.class_id is not None:
                self._with("net_cls", lambda d: write_file(d, "net_cls.classid",
                                                           str(net.class_id)))
            if net.priorities:
                self._with("net_prio", lambda d: self._apply_net_prio(d, net.priorities))
        if res.devices:
            self._with("devices", lambda d: self._write_devices(d, res.devices))

    def _with(self, ctrl: str, fn: Callable[[str], None]) -> None:
        d = self._dir(ctrl)
        if d is None:
            log.warning("cgroup controller not mounted, setting skipped controller=%s", ctrl)
            return
        fn(d)

    def _apply_memory(self, d: str, m: Memory | None) -> None:
        from .stats import parse_int

        assert m is not None
        if m.check_before_update and m.limit is not None and m.limit > 0:
            usage = parse_int(read_file(d, "memory.usage_in_bytes"))
            if usage > m.limit:
                raise HostError(f"memory usage {usage} is above the new limit {m.limit}",
                                errno=errno.EBUSY)
        self._set_memory_and_swap(d, m.limit, m.swap)
        if m.reservation is not None:
            write_file(d, "memory.soft_limit_in_bytes", _neg_to_unlimited(m.reservation))
        if m.kernel is not None:
            sys_write_best_effort(d, "memory.kmem.limit_in_bytes",
                                  _neg_to_unlimited(m.kernel), "kernel memory limits deprecated")
        if m.kernel_tcp is not None:
            write_file(d, "memory.kmem.tcp.limit_in_bytes", _neg_to_unlimited(m.kernel_tcp))
        if m.swappiness is not None:
            write_file(d, "memory.swappiness", str(m.swappiness))
        if m.disable_oom_killer:
            write_file(d, "memory.oom_control", "1")
        if m.use_hierarchy is not None:
            sys_write_best_effort(d, "memory.use_hierarchy", "1" if m.use_hierarchy else "0",
                                  "use_hierarchy deprecated")

    def _set_memory_and_swap(self, d: str, limit: int | None, swap: int | None) -> None:
        from .stats import parse_int

        has_swap = os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))
        if swap is not None and swap != 0 and not has_swap:
            log.warning("swap accounting unavailable, memory+swap limit skipped")
            swap = None
        if limit is None or limit == 0:
            if swap:
                write_file(d, "memory.memsw.limit_in_bytes", _neg_to_unlimited(swap))
            return
        if not swap:
            write_file(d, "memory.limit_in_bytes", _neg_to_unlimited(limit))
            return
        # memsw must stay >= limit at every step: raise memsw first when growing.
        current = parse_int(read_file(d, "memory.limit_in_bytes"))
        if swap < 0 or limit < 0 or current < limit:
            write_file(d, "memory.memsw.limit_in_bytes", _neg_to_unlimited(swap))
            write_file(d, "memory.limit_in_bytes", _neg_to_unlimited(limit))
        else:
            write_file(d, "memory.limit_in_bytes", _neg_to_unlimited(limit))
            write_file(d, "memory.memsw.limit_in_bytes", _neg_to_unlimited(swap))

    def _apply_cpu(self, d: str, c: Cpu) -> None:
        from .stats import parse_int

        if c.shares:
            write_file(d, "cpu.shares", str(c.shares))
            got = parse_int(read_file(d, "cpu.shares"))
            if got != c.shares:
                raise HostError(f"cpu.shares {c.shares} was clamped to {got}", errno=errno.ERANGE)
        # The realtime period must be set before the runtime that has to fit in it.
        if c.realtime_period:
            write_file(d, "cpu.rt_period_us", str(c.realtime_period))
        if c.realtime_runtime is not None and c.realtime_runtime != 0:
            write_file(d, "cpu.rt_runtime_us", str(c.realtime_runtime))
        if c.period:
            try:
                write_file(d, "cpu.cfs_period_us", str(c.period))
            except HostError as e:
                # A shorter period can conflict with the current quota: set quota first.
                if e.errno != errno.EINVAL or not c.quota:
                    raise
                write_file(d, "cpu.cfs_quota_us", str(c.quota))
        if c.quota:
            write_file(d, "cpu.cfs_quota_us", str(c.quota))
        if c.burst is not None:
            write_file(d, "cpu.cfs_burst_us", str(c.burst))
        if c.idle is not None:
            write_file(d, "cpu.idle", str(c.idle))

    def _apply_hugetlb(self, d: str, limits: tuple[HugepageLimit, ...]) -> None:
        for h in limits:
            write_file(d, f"hugetlb.{h.page_size}.limit_in_bytes", str(h.limit))

    def _apply_net_prio(self, d: str, prios: tuple[InterfacePriority, ...]) -> None:
        for p in prios:
            write_file(d, "net_prio.ifpriomap", f"{p.name} {p.priority}")

    def _apply_cpuset(self, d: str, c: Cpu) -> None:
        if c.cpus:
            write_file(d, "cpuset.cpus", c.cpus)
        if c.mems:
            write_file(d, "cpuset.mems", c.mems)

    def _apply_blkio(self, d: str, b: BlockIO) -> None:
        bfq = os.path.exists(os.path.join(d, "blkio.bfq.weight"))
        weight_file = "blkio.bfq.weight" if bfq else "blkio.weight"
        wdev_file = "blkio.bfq.weight_device" if bfq else "blkio.weight_device"
        if b.weight is not None:
            write_file(d, weight_file, str(b.weight))
        if b.leaf_weight is not None:
            write_file(d, "blkio.leaf_weight", str(b.leaf_weight))
        for w in b.weight_device:
            if w.weight is not None:
                write_file(d, wdev_file, f"{w.major}:{w.minor} {w.weight}")
            if w.leaf_weight is not None:
                write_file(d, "blkio.leaf_weight_device", f"{w.major}:{w.minor} {w.leaf_weight}")
        for name, devs in (
            ("blkio.throttle.read_bps_device", b.throttle_read_bps_device),
            ("blkio.throttle.write_bps_device", b.throttle_write_bps_device),
            ("blkio.throttle.read_iops_device", b.throttle_read_iops_device),
            ("blkio.throttle.write_iops_device", b.throttle_write_iops_device),
        ):
            for t in devs:
                write_file(d, name, f"{t.major}:{t.minor} {t.rate}")

    def _write_devices(self, d: str, rules: tuple[DeviceRule, ...]) -> None:
        # Start from nothing, then the spec's rules in order, then the devices every
        # container needs (as runc).
        write_file(d, "devices.deny", "a")
        for r in (*rules, *DEFAULT_ALLOWED_DEVICES):
            write_file(d, "devices.allow" if r.allow else "devices.deny", r.cgroup_v1_string())

    # --- processes ----------------------------------------------------------------------

    def add_process(self, pid: int) -> None:
        for d in self._unique_dirs():
            write_file(d, "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for d in self._unique_dirs():
            pids.update(read_pids(d))
        return sorted(pids)

    def _freezer(self) -> str:
        d = self._dir("freezer")
        if d is None:
            raise HostError("freezer controller not mounted", errno=errno.ENOTSUP)
        return d

    def _state(self) -> str:
        return read_file(self._freezer(), "freezer.state").strip()

    def freeze(self) -> None:
        d = self._freezer()
        write_file(d, "freezer.state", "FROZEN")
        try:
            wait_until(lambda: self._state() == "FROZEN", FREEZE_TIMEOUT, "freezer FROZEN",
                       nudge=lambda: write_file(d, "freezer.state", "FROZEN"))
        except HostError:
            write_file(d, "freezer.state", "THAWED")
            raise

    def thaw(self) -> None:
        d = self._freezer()
        write_file(d, "freezer.state", "THAWED")
        wait_until(lambda: self._state() == "THAWED", FREEZE_TIMEOUT, "freezer THAWED",
                   nudge=lambda: write_file(d, "freezer.state", "THAWED"))

    def is_frozen(self) -> bool:
        return self._state() == "FROZEN"

    def kill_all(self, sig: int) -> None:
        if self._dir("freezer") is not None:
            self._signal_frozen(sig)
            return
        for pid in self.procs():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue

    def destroy(self) -> None:
        for d in self._unique_dirs():
            remove_tree(d)
        log.info("cgroup destroyed version=1 path=%s", self._path)

    # --- statistics ---------------------------------------------------------------------

    def oom_kill_count(self) -> int:
        from .stats import parse_flat_keyed

        d = self._dir("memory")
        if d is None:
            return 0
        text = read_optional(d, "memory.oom_control") or ""
        return parse_flat_keyed(text).get("oom_kill", 0)

    def stats(self) -> CgroupStats:
        from .stats import CgroupStats, HugetlbStats

        hugetlb: dict[str, HugetlbStats] = {}
        hd = self._dir("hugetlb")
        if hd is not None:
            for name in sorted(os.listdir(hd)):
                m = _HUGETLB_FILE.match(name)
                if m:
                    size = m.group(1)
                    hugetlb[size] = HugetlbStats(
                        usage=_int(hd, f"hugetlb.{size}.usage_in_bytes"),
                        max_usage=_int(hd, f"hugetlb.{size}.max_usage_in_bytes"),
                        failcnt=_int(hd, f"hugetlb.{size}.failcnt"),
                    )
        return CgroupStats(
            cpu=self._cpu_stats(),
            memory=self._memory_stats(),
            pids=self._pids_stats(),
            blkio=self._blkio_stats(),
            hugetlb=MappingProxyType(hugetlb),
        )

    def _cpu_stats(self) -> CpuStats:
        from .stats import CpuStats, CpuUsage, ThrottlingData, parse_flat_keyed, parse_int_list

        throttling = ThrottlingData()
        cd = self._dir("cpu")
        if cd is not None:
            st = parse_flat_keyed(read_optional(cd, "cpu.stat") or "")
            throttling = ThrottlingData(
                periods=st.get("nr_periods", 0),
                throttled_periods=st.get("nr_throttled", 0),
                throttled_time=st.get("throttled_time", 0),
            )
        usage = CpuUsage()
        ad = self._dir("cpuacct")
        if ad is not None:
            # cpuacct.stat is in USER_HZ ticks; libcontainer reports nanoseconds.
            ticks = parse_flat_keyed(read_optional(ad, "cpuacct.stat") or "")
            hz = os.sysconf("SC_CLK_TCK") or 100
            ns_per_tick = 1_000_000_000 // hz
            usage = CpuUsage(
                total_usage=_int(ad, "cpuacct.usage"),
                percpu_usage=parse_int_list(read_optional(ad, "cpuacct.usage_percpu") or ""),
                percpu_usage_in_kernelmode=parse_int_list(
                    read_optional(ad, "cpuacct.usage_percpu_sys") or ""),
                percpu_usage_in_usermode=parse_int_list(
                    read_optional(ad, "cpuacct.usage_percpu_user") or ""),
                usage_in_kernelmode=ticks.get("system", 0) * ns_per_tick,
                usage_in_usermode=ticks.get("user", 0) * ns_per_tick,
            )
        return CpuStats(cpu_usage=usage, throttling_data=throttling)

    def _memory_stats(self) -> MemoryStats:
        from .stats import MemoryData, MemoryStats, parse_flat_keyed

        d = self._dir("memory")
        if d is None:
            return MemoryStats()

        def data(prefix: str) -> MemoryData:
            return MemoryData(
                usage=_int(d, f"{prefix}.usage_in_bytes"),
                max_usage=_int(d, f"{prefix}.max_usage_in_bytes"),
                failcnt=_int(d, f"{prefix}.failcnt"),
                limit=_int(d, f"{prefix}.limit_in_bytes"),
            )

        st = parse_flat_keyed(read_optional(d, "memory.stat") or "")
        return MemoryStats(
            cache=st.get("total_cache", st.get("cache", 0)),
            usage=data("memory"),
            swap_usage=data("memory.memsw"),
            kernel_usage=data("memory.kmem"),
            kernel_tcp_usage=data("memory.kmem.tcp"),
            use_hierarchy=_int(d, "memory.use_hierarchy") == 1,
            stats=MappingProxyType(st),
        )

    def _pids_stats(self) -> PidsStats:
        from .stats import PidsStats

        d = self._dir("pids")
        if d is None:
            return PidsStats()
        return PidsStats(current=_int(d, "pids.current"), limit=_int(d, "pids.max"))

    def _blkio_stats(self) -> BlkioStats:
        from .stats import BlkioStats, parse_blkio

        d = self._dir("blkio")
        if d is None:
            return BlkioStats()

        def table(name: str) -> tuple[BlkioStatEntry, ...]:
            # CFQ files first; kernels with only BFQ/throttling expose other names.
            for prefix in ("blkio.", "blkio.bfq.", "blkio.throttle."):
                text = read_optional(d, f"{prefix}{name}")
                if text is not None:
                    return parse_blkio(text)
            return ()

        return BlkioStats(
            io_service_bytes_recursive=table("io_service_bytes_recursive"),
            io_serviced_recursive=table("io_serviced_recursive"),
            io_queued_recursive=table("io_queued_recursive"),
            io_service_time_recursive=table("io_service_time_recursive"),
            io_wait_time_recursive=table("io_wait_time_recursive"),
            io_merged_recursive=table("io_merged_recursive"),
            io_time_recursive=table("time_recursive"),
            sectors_recursive=table("sectors_recursive"),
        )


def _int(d: str, name: str) -> int:
    from .stats import parse_int

    text = read_optional(d, name)
    if text is None:
        return 0
    try:
        return parse_int(text)
    except ValueError:
        return 0
