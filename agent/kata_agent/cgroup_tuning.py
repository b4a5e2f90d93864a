"""Cheaper cgroup moves in a guest that creates containers all day: ``favordynmods``.

Every container create and exec moves a process into a cgroup, which takes the kernel's
global cgroup_threadgroup_rwsem for writing; by default each such write waits for an RCU
grace period (milliseconds). With ``favordynmods`` set on a cgroup root (kernel 6.0+), the
lock stays in its slow-reader mode for good: moves become cheap, fork and exit pay a few
atomic operations. The setting is global, so the agent sets it on the cgroup2 root only
when asked (the guest's unit does; init mode mounts with it) and puts back what it found
when it stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kata_agent.engine import syscalls as sc
from kata_agent.engine.mounts import SET_FLAGS

log = logging.getLogger(__name__)

OPTION = "favordynmods"
# Per-mount flags a plain MS_REMOUNT would otherwise reset.
_MOUNT_FLAG_WORDS = ("ro", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime",
                     "strictatime", "nosymfollow")


@dataclass(frozen=True, slots=True)
class Cgroup2Mount:
    path: str
    mount_flags: int
    super_options: tuple[str, ...]


def find_cgroup2(mountinfo: str) -> Cgroup2Mount | None:
    """The first cgroup2 mount in a /proc/self/mountinfo text."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3 or tail[0] != "cgroup2":
            continue
        flags = 0
        for word in fields[5].split(","):
            if word in _MOUNT_FLAG_WORDS:
                flags |= SET_FLAGS[word]
        path = fields[4].replace("\\040", " ")
        opts = tuple(o for o in tail[2].split(",") if o not in ("rw", "ro"))
        return Cgroup2Mount(path, flags, opts)
    return None


def favor_dynamic_changes(syscalls: sc.Syscalls | None = None,
                          mountinfo_path: str = "/proc/self/mountinfo"
                          ) -> Callable[[], None] | None:
    """Set favordynmods on the cgroup2 root; returns how to undo it (None: nothing was
    changed, because it was set already, there is no cgroup2 or the kernel refused)."""
    syscalls = syscalls or sc.Syscalls()
    try:
        with open(mountinfo_path) as f:
            found = find_cgroup2(f.read())
    except OSError as e:
        log.warning("event=cgroup_tuning_skipped error=%s", e)
        return None
    if found is None:
        log.info("event=cgroup_tuning_skipped reason=no-cgroup2")
        return None
    if OPTION in found.super_options:
        return None

    def remount(options: tuple[str, ...]) -> None:
        syscalls.mount(None, found.path, None, sc.MS_REMOUNT | found.mount_flags,
                       ",".join(options))

    try:
        remount((*found.super_options, OPTION))
    except OSError as e:
        log.warning("event=cgroup_tuning_refused path=%s error=%s", found.path, e)
        return None
    log.info("event=cgroup_tuning option=%s path=%s", OPTION, found.path)

    def undo() -> None:
        try:
            remount(found.super_options)
        except OSError as e:
            log.warning("event=cgroup_tuning_undo_failed path=%s error=%s", found.path, e)

    return undo
