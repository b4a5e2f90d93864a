"""Process capabilities: the five OCI sets, validated and applied with capset/prctl."""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import lowlevel
from .errors import HostError, SpecError

log = logging.getLogger(__name__)

# Every capability Linux 6.1 knows (include/uapi/linux/capability.h).
CAPABILITIES: Mapping[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
MAX_CAPS_PER_SET = 64


def last_cap() -> int:
    """The highest capability number the running kernel supports."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def to_mask(names: frozenset[str], limit: int) -> int:
    """Bit mask of ``names``; capabilities above ``limit`` are left out (as runc)."""
    mask = 0
    for n in names:
        bit = CAPABILITIES[n]
        if bit <= limit:
            mask |= 1 << bit
    return mask


@dataclass(frozen=True, slots=True)
class Capabilities:
    bounding: frozenset[str] = frozenset()
    effective: frozenset[str] = frozenset()
    inheritable: frozenset[str] = frozenset()
    permitted: frozenset[str] = frozenset()
    ambient: frozenset[str] = frozenset()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str = "process.capabilities") -> Capabilities:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        sets: dict[str, frozenset[str]] = {}
        for key in _SETS:
            raw = d.get(key)
            if raw is None:
                sets[key] = frozenset()
                continue
            if not isinstance(raw, list) or len(raw) > MAX_CAPS_PER_SET:
                raise SpecError("must be an array of capability names", field=f"{field}.{key}")
            for i, name in enumerate(raw):
                if not isinstance(name, str) or name.upper() not in CAPABILITIES:
                    raise SpecError(f"unknown capability {name!r}", field=f"{field}.{key}[{i}]")
            sets[key] = frozenset(n.upper() for n in raw)
        return cls(**sets)


def keep_caps_for_setuid() -> None:
    """Keep the permitted set across the coming setuid() away from uid 0."""
    try:
        lowlevel.prctl(lowlevel.PR_SET_KEEPCAPS, 1)
    except OSError as e:
        raise HostError(f"prctl(PR_SET_KEEPCAPS): {e.strerror}", errno=e.errno or 0) from e


def apply_capabilities(caps: Capabilities) -> None:
    """Set all five sets in the calling thread (the container init, after setuid).

    Order matters: regain the effective set from what setuid left permitted (so
    CAP_SETPCAP can drop the bounding set), drop the bounding set, set
    effective/permitted/inheritable, then the ambient set, which needs its capabilities
    to be permitted and inheritable already.
    """
    limit = last_cap()
    try:
        _eff, perm, inh = lowlevel.capget()
        lowlevel.capset(perm, perm, inh)
        bounding = to_mask(caps.bounding, limit)
        for bit in range(limit + 1):
            if not bounding & (1 << bit) and lowlevel.prctl(lowlevel.PR_CAPBSET_READ, bit) == 1:
                lowlevel.prctl(lowlevel.PR_CAPBSET_DROP, bit)
        lowlevel.capset(
            to_mask(caps.effective, limit),
            to_mask(caps.permitted, limit),
            to_mask(caps.inheritable, limit),
        )
        try:
            lowlevel.prctl(lowlevel.PR_CAP_AMBIENT, lowlevel.PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError as e:
            if e.errno != errno.EINVAL or caps.ambient:
                raise  # EINVAL: kernel without ambient capabilities, fine when none asked.
        raisable = caps.permitted & caps.inheritable
        for name in sorted(caps.ambient):
            bit = CAPABILITIES[name]
            if name not in raisable:
                # The kernel refuses (EPERM) an ambient capability that is not both
                # permitted and inheritable; like runc, skip it instead of failing.
                log.warning("ambient capability skipped cap=%s reason=not-inheritable", name)
            elif bit <= limit:
                lowlevel.prctl(lowlevel.PR_CAP_AMBIENT, lowlevel.PR_CAP_AMBIENT_RAISE, bit)
        lowlevel.prctl(lowlevel.PR_SET_KEEPCAPS, 0)
    except OSError as e:
        raise HostError(f"apply capabilities: {e.strerror}", errno=e.errno or 0) from e
    log.debug("capabilities applied effective=%s", ",".join(sorted(caps.effective)))
