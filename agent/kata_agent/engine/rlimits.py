"""POSIX resource limits (``process.rlimits``)."""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import HostError, SpecError

log = logging.getLogger(__name__)

# Every RLIMIT_* Linux defines, by the numbers of asm-generic/resource.h.
RLIMITS: Mapping[str, int] = {
    "RLIMIT_CPU": 0,
    "RLIMIT_FSIZE": 1,
    "RLIMIT_DATA": 2,
    "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5,
    "RLIMIT_NPROC": 6,
    "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8,
    "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10,
    "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12,
    "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14,
    "RLIMIT_RTTIME": 15,
}

UINT64_MAX = (1 << 64) - 1


def _to_py(v: int) -> int:
    # OCI writes "unlimited" as 2^64-1; Python's resource module spells it RLIM_INFINITY.
    return resource.RLIM_INFINITY if v == UINT64_MAX else v


@dataclass(frozen=True, slots=True)
class Rlimit:
    type: str
    soft: int
    hard: int

    @property
    def number(self) -> int:
        return RLIMITS[self.type]

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Rlimit:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        typ = d.get("type")
        if not isinstance(typ, str) or typ not in RLIMITS:
            raise SpecError(f"unknown rlimit type {typ!r}", field=f"{field}.type")
        vals: dict[str, int] = {}
        for key in ("soft", "hard"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= UINT64_MAX:
                raise SpecError("must be an unsigned 64-bit integer", field=f"{field}.{key}")
            vals[key] = v
        if vals["soft"] > vals["hard"]:
            raise SpecError("soft limit above hard limit", field=f"{field}.soft")
        return cls(type=typ, soft=vals["soft"], hard=vals["hard"])

    @classmethod
    def list_from_oci(cls, items: Any, field: str = "process.rlimits") -> tuple[Rlimit, ...]:
        """The whole array; each type may appear once."""
        if items is None:
            return ()
        if not isinstance(items, list) or len(items) > len(RLIMITS):
            raise SpecError("must be an array of at most one entry per type", field=field)
        out = tuple(cls.from_oci(x, f"{field}[{i}]") for i, x in enumerate(items))
        seen: set[str] = set()
        for i, r in enumerate(out):
            if r.type in seen:
                raise SpecError(f"duplicate rlimit {r.type}", field=f"{field}[{i}].type")
            seen.add(r.type)
        return out


def apply_rlimits(rlimits: Sequence[Rlimit]) -> None:
    """setrlimit for each entry in the calling process (the container init)."""
    for r in rlimits:
        try:
            resource.setrlimit(r.number, (_to_py(r.soft), _to_py(r.hard)))
        except (OSError, ValueError) as e:
            err = e.errno if isinstance(e, OSError) and e.errno else 22
            raise HostError(f"setrlimit {r.type} soft={r.soft} hard={r.hard}: {e}",
                            errno=err) from e
        log.debug("rlimit set type=%s soft=%d hard=%d", r.type, r.soft, r.hard)
