"""Typed, validated form of the OCI ``linux.resources`` object.

Values keep OCI semantics: ``None`` means "not set", ``-1`` for memory/pids means
"unlimited". Conversions to cgroup file contents live in ``engine.cgroups``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from types import MappingProxyType
from typing import Any, ClassVar

from .errors import SpecError

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1

# Bounds on repeated fields: a request is untrusted and must not make us write unbounded files.
MAX_DEVICE_RULES = 1024
MAX_BLOCK_DEVICES = 256
MAX_HUGEPAGE_SIZES = 16
MAX_NET_PRIORITIES = 256
MAX_UNIFIED_KEYS = 256
MAX_UNIFIED_VALUE = 4096

_CPU_LIST = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")
_PAGE_SIZE = re.compile(r"^[0-9]+(KB|MB|GB|TB|PB)$")
_UNIFIED_KEY = re.compile(r"^[a-z][a-z0-9_]*\.[A-Za-z0-9_.]+$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def _mapping(d: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise SpecError("must be an object", field=field)
    return d


def _opt_int(d: Mapping[str, Any], key: str, field: str, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError("must be an integer", field=f"{field}.{key}")
    if not lo <= v <= hi:
        raise SpecError(f"{v} out of range [{lo}, {hi}]", field=f"{field}.{key}")
    return v


def _req_int(d: Mapping[str, Any], key: str, field: str, lo: int, hi: int) -> int:
    v = _opt_int(d, key, field, lo, hi)
    if v is None:
        raise SpecError("is required", field=f"{field}.{key}")
    return v


def _opt_bool(d: Mapping[str, Any], key: str, field: str) -> bool | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise SpecError("must be a boolean", field=f"{field}.{key}")
    return v


def _opt_list(d: Mapping[str, Any], key: str, field: str, limit: int) -> list[Any]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise SpecError("must be an array", field=f"{field}.{key}")
    if len(v) > limit:
        raise SpecError(f"more than {limit} entries", field=f"{field}.{key}")
    return v


def parse_cpu_list(text: str, field: str) -> str:
    """Validate the cpuset list syntax ("0-3,5"); returns the text unchanged."""
    if text == "":
        return text
    if not _CPU_LIST.match(text):
        raise SpecError(f"invalid list {text!r}", field=field)
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if int(lo) > 65535 or (hi and (int(hi) > 65535 or int(hi) < int(lo))):
            raise SpecError(f"invalid range {part!r}", field=field)
    return text


@dataclass(frozen=True, slots=True)
class DeviceRule:
    allow: bool
    type: str = "a"  # a, b or c
    major: int = -1  # -1: any
    minor: int = -1
    access: str = "rwm"

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> DeviceRule:
        d = _mapping(d, field)
        allow = _opt_bool(d, "allow", field)
        if allow is None:
            raise SpecError("is required", field=f"{field}.allow")
        typ = d.get("type", "a")
        if typ not in ("a", "b", "c"):
            raise SpecError(f"device type {typ!r} is not a, b or c", field=f"{field}.type")
        major = _opt_int(d, "major", field, -1, INT64_MAX)
        minor = _opt_int(d, "minor", field, -1, INT64_MAX)
        access = d.get("access", "rwm")
        if not isinstance(access, str) or not access or set(access) - set("rwm"):
            raise SpecError(f"access {access!r} must use only r, w, m", field=f"{field}.access")
        # Normalise order and drop repeats so the kernel string is canonical.
        access = "".join(c for c in "rwm" if c in access)
        return cls(
            allow=allow,
            type=typ,
            major=-1 if major is None else major,
            minor=-1 if minor is None else minor,
            access=access,
        )

    def cgroup_v1_string(self) -> str:
        major = "*" if self.major < 0 else str(self.major)
        minor = "*" if self.minor < 0 else str(self.minor)
        if self.type == "a":
            return "a"
        return f"{self.type} {major}:{minor} {self.access}"


def _c(major: int, minor: int) -> DeviceRule:
    return DeviceRule(allow=True, type="c", major=major, minor=minor, access="rwm")


# Devices every container may use whatever the spec says (as runc's AllowedDevices):
# mknod of any node, /dev/null, zero, full, random, urandom, tty, console, ptmx, pts.
DEFAULT_ALLOWED_DEVICES: tuple[DeviceRule, ...] = (
    DeviceRule(allow=True, type="c", access="m"),
    DeviceRule(allow=True, type="b", access="m"),
    _c(1, 3),
    _c(1, 5),
    _c(1, 7),
    _c(1, 8),
    _c(1, 9),
    _c(5, 0),
    _c(5, 1),
    _c(5, 2),
    _c(136, -1),
)


@dataclass(frozen=True, slots=True)
class Memory:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    kernel: int | None = None
    kernel_tcp: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool | None = None
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Memory:
        d = _mapping(d, field)
        m = cls(
            limit=_opt_int(d, "limit", field, -1, INT64_MAX),
            reservation=_opt_int(d, "reservation", field, -1, INT64_MAX),
            swap=_opt_int(d, "swap", field, -1, INT64_MAX),
            kernel=_opt_int(d, "kernel", field, -1, INT64_MAX),
            kernel_tcp=_opt_int(d, "kernelTCP", field, -1, INT64_MAX),
            swappiness=_opt_int(d, "swappiness", field, 0, 100),
            disable_oom_killer=_opt_bool(d, "disableOOMKiller", field),
            use_hierarchy=_opt_bool(d, "useHierarchy", field),
            check_before_update=_opt_bool(d, "checkBeforeUpdate", field),
        )
        # As runc: memory+swap must not be below the memory limit when both are bounded.
        if m.limit and m.limit > 0 and m.swap and m.swap > 0 and m.swap < m.limit:
            raise SpecError(
                f"swap (memory+swap) {m.swap} is below the memory limit {m.limit}",
                field=f"{field}.swap",
            )
        return m


@dataclass(frozen=True, slots=True)
class Cpu:
    shares: int | None = None
    quota: int | None = None
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    idle: int | None = None

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Cpu:
        d = _mapping(d, field)
        shares = _opt_int(d, "shares", field, 0, UINT64_MAX)
        if shares and not 2 <= shares <= 262144:
            raise SpecError(f"{shares} out of range [2, 262144]", field=f"{field}.shares")
        quota = _opt_int(d, "quota", field, -1, INT64_MAX)
        if quota is not None and 0 < quota < 1000:
            raise SpecError("quota below 1000us", field=f"{field}.quota")
        period = _opt_int(d, "period", field, 0, UINT64_MAX)
        if period and not 1000 <= period <= 1_000_000:
            raise SpecError(f"{period} out of range [1000, 1000000]", field=f"{field}.period")
        cpus = d.get("cpus")
        mems = d.get("mems")
        for key, val in (("cpus", cpus), ("mems", mems)):
            if val is not None:
                if not isinstance(val, str):
                    raise SpecError("must be a string", field=f"{field}.{key}")
                parse_cpu_list(val, f"{field}.{key}")
        return cls(
            shares=shares,
            quota=quota,
            burst=_opt_int(d, "burst", field, 0, UINT64_MAX),
            period=period,
            realtime_runtime=_opt_int(d, "realtimeRuntime", field, -1, INT64_MAX),
            realtime_period=_opt_int(d, "realtimePeriod", field, 0, UINT64_MAX),
            cpus=cpus,
            mems=mems,
            idle=_opt_int(d, "idle", field, 0, 1),
        )


@dataclass(frozen=True, slots=True)
class Pids:
    limit: int

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Pids:
        d = _mapping(d, field)
        return cls(limit=_req_int(d, "limit", field, INT64_MIN, INT64_MAX))


@dataclass(frozen=True, slots=True)
class WeightDevice:
    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> WeightDevice:
        d = _mapping(d, field)
        return cls(
            major=_req_int(d, "major", field, 0, UINT32_MAX),
            minor=_req_int(d, "minor", field, 0, UINT32_MAX),
            weight=_opt_int(d, "weight", field, 10, 1000),
            leaf_weight=_opt_int(d, "leafWeight", field, 10, 1000),
        )


@dataclass(frozen=True, slots=True)
class ThrottleDevice:
    major: int
    minor: int
    rate: int

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> ThrottleDevice:
        d = _mapping(d, field)
        return cls(
            major=_req_int(d, "major", field, 0, UINT32_MAX),
            minor=_req_int(d, "minor", field, 0, UINT32_MAX),
            rate=_req_int(d, "rate", field, 0, UINT64_MAX),
        )


@dataclass(frozen=True, slots=True)
class BlockIO:
    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: tuple[WeightDevice, ...] = ()
    throttle_read_bps_device: tuple[ThrottleDevice, ...] = ()
    throttle_write_bps_device: tuple[ThrottleDevice, ...] = ()
    throttle_read_iops_device: tuple[ThrottleDevice, ...] = ()
    throttle_write_iops_device: tuple[ThrottleDevice, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> BlockIO:
        d = _mapping(d, field)

        def throttle(key: str) -> tuple[ThrottleDevice, ...]:
            items = _opt_list(d, key, field, MAX_BLOCK_DEVICES)
            return tuple(
                ThrottleDevice.from_oci(x, f"{field}.{key}[{i}]") for i, x in enumerate(items)
            )

        weight = _opt_int(d, "weight", field, 0, 1000)
        leaf = _opt_int(d, "leafWeight", field, 0, 1000)
        for key, val in (("weight", weight), ("leafWeight", leaf)):
            if val and val < 10:
                raise SpecError(f"{val} out of range [10, 1000]", field=f"{field}.{key}")
        wd = _opt_list(d, "weightDevice", field, MAX_BLOCK_DEVICES)
        return cls(
            weight=weight or None,
            leaf_weight=leaf or None,
            weight_device=tuple(
                WeightDevice.from_oci(x, f"{field}.weightDevice[{i}]") for i, x in enumerate(wd)
            ),
            throttle_read_bps_device=throttle("throttleReadBpsDevice"),
            throttle_write_bps_device=throttle("throttleWriteBpsDevice"),
            throttle_read_iops_device=throttle("throttleReadIOPSDevice"),
            throttle_write_iops_device=throttle("throttleWriteIOPSDevice"),
        )


@dataclass(frozen=True, slots=True)
class HugepageLimit:
    page_size: str  # "2MB", "1GB" as in the hugetlb file names
    limit: int

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> HugepageLimit:
        d = _mapping(d, field)
        size = d.get("pageSize")
        # The size becomes part of a file name: keep it to the kernel's own spelling.
        if not isinstance(size, str) or not _PAGE_SIZE.match(size):
            raise SpecError(f"invalid page size {size!r}", field=f"{field}.pageSize")
        return cls(page_size=size, limit=_req_int(d, "limit", field, 0, UINT64_MAX))


@dataclass(frozen=True, slots=True)
class InterfacePriority:
    name: str
    priority: int

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> InterfacePriority:
        d = _mapping(d, field)
        name = d.get("name")
        if not isinstance(name, str) or not _IFNAME.match(name):
            raise SpecError(f"invalid interface name {name!r}", field=f"{field}.name")
        return cls(name=name, priority=_req_int(d, "priority", field, 0, UINT32_MAX))


@dataclass(frozen=True, slots=True)
class Network:
    class_id: int | None = None
    priorities: tuple[InterfacePriority, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Network:
        d = _mapping(d, field)
        prios = _opt_list(d, "priorities", field, MAX_NET_PRIORITIES)
        return cls(
            class_id=_opt_int(d, "classID", field, 0, UINT32_MAX),
            priorities=tuple(
                InterfacePriority.from_oci(x, f"{field}.priorities[{i}]")
                for i, x in enumerate(prios)
            ),
        )


def validate_unified_key(key: str, field: str) -> None:
    # The key is a file name inside the container's cgroup: no separators, no parent links,
    # and never the files that move processes or change the tree.
    if not _UNIFIED_KEY.match(key) or ".." in key:
        raise SpecError(f"invalid cgroup file name {key!r}", field=field)
    if key.startswith("cgroup."):
        raise SpecError(f"cgroup core file {key!r} may not be set", field=field)


@dataclass(frozen=True, slots=True)
class LinuxResources:
    devices: tuple[DeviceRule, ...] = ()
    memory: Memory | None = None
    cpu: Cpu | None = None
    pids: Pids | None = None
    block_io: BlockIO | None = None
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    network: Network | None = None
    unified: Mapping[str, str] = dc_field(default_factory=lambda: MappingProxyType({}))

    EMPTY: ClassVar[LinuxResources]

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str = "linux.resources") -> LinuxResources:
        d = _mapping(d, field)
        devs = _opt_list(d, "devices", field, MAX_DEVICE_RULES)
        huge = _opt_list(d, "hugepageLimits", field, MAX_HUGEPAGE_SIZES)
        unified_raw = d.get("unified") or {}
        unified_raw = _mapping(unified_raw, f"{field}.unified")
        if len(unified_raw) > MAX_UNIFIED_KEYS:
            raise SpecError(f"more than {MAX_UNIFIED_KEYS} entries", field=f"{field}.unified")
        unified: dict[str, str] = {}
        for k, v in unified_raw.items():
            kf = f"{field}.unified.{k}"
            validate_unified_key(str(k), kf)
            if not isinstance(v, str) or len(v) > MAX_UNIFIED_VALUE:
                raise SpecError("must be a string of at most 4096 bytes", field=kf)
            unified[k] = v

        def sub(key: str) -> Mapping[str, Any] | None:
            v = d.get(key)
            return None if v is None else _mapping(v, f"{field}.{key}")

        mem, cpu, pids, bio, net = (
            sub("memory"),
            sub("cpu"),
            sub("pids"),
            sub("blockIO"),
            sub("network"),
        )
        return cls(
            devices=tuple(
                DeviceRule.from_oci(x, f"{field}.devices[{i}]") for i, x in enumerate(devs)
            ),
            memory=None if mem is None else Memory.from_oci(mem, f"{field}.memory"),
            cpu=None if cpu is None else Cpu.from_oci(cpu, f"{field}.cpu"),
            pids=None if pids is None else Pids.from_oci(pids, f"{field}.pids"),
            block_io=None if bio is None else BlockIO.from_oci(bio, f"{field}.blockIO"),
            hugepage_limits=tuple(
                HugepageLimit.from_oci(x, f"{field}.hugepageLimits[{i}]")
                for i, x in enumerate(huge)
            ),
            network=None if net is None else Network.from_oci(net, f"{field}.network"),
            unified=MappingProxyType(unified),
        )


LinuxResources.EMPTY = LinuxResources()
