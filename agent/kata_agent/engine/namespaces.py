"""Linux namespaces of a container: which to create, which to join, in what order.

A new pid namespace only applies to children of the caller, so the process that unshares is
an intermediate one that forks the container init afterwards (runc's nsexec stages). A new
user namespace is created first and mapped by the parent before anything else is unshared,
so that the other namespaces are owned by it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.spec import IDMapping, Linux

log = logging.getLogger(__name__)

FLAGS: Mapping[str, int] = {
    "user": sc.CLONE_NEWUSER,
    "cgroup": sc.CLONE_NEWCGROUP,
    "ipc": sc.CLONE_NEWIPC,
    "uts": sc.CLONE_NEWUTS,
    "network": sc.CLONE_NEWNET,
    "pid": sc.CLONE_NEWPID,
    "mount": sc.CLONE_NEWNS,
    "time": sc.CLONE_NEWTIME,
}
# Name of each namespace under /proc/<pid>/ns/.
PROC_NAMES: Mapping[str, str] = {
    "user": "user", "cgroup": "cgroup", "ipc": "ipc", "uts": "uts", "network": "net",
    "pid": "pid", "mount": "mnt", "time": "time",
}
# Join the user namespace first (it grants the rights to join the rest) and the mount
# namespace last (its root replaces ours, so later paths would resolve inside it).
JOIN_ORDER: Sequence[str] = ("user", "cgroup", "ipc", "uts", "network", "pid", "time", "mount")


@dataclass(frozen=True, slots=True)
class NamespacePlan:
    """``join``: (type, path) pairs in join order; ``new``: unshare flags after the user ns."""

    join: tuple[tuple[str, str], ...]
    new_user: bool
    new_flags: int

    @classmethod
    def for_create(cls, linux: Linux) -> NamespacePlan:
        join: list[tuple[str, str]] = []
        flags = 0
        for t in JOIN_ORDER:
            ns = linux.namespace(t)
            if ns is None:
                continue
            if ns.path:
                join.append((t, ns.path))
            elif t != "user":
                flags |= FLAGS[t]
        user = linux.namespace("user")
        return cls(join=tuple(join), new_user=user is not None and not user.path,
                   new_flags=flags)

    @classmethod
    def for_exec(cls, init_pid: int, types: Sequence[str]) -> NamespacePlan:
        """Join every namespace the container init has that differs from ours."""
        join = []
        for t in JOIN_ORDER:
            if t not in types:
                continue
            path = f"/proc/{init_pid}/ns/{PROC_NAMES[t]}"
            mine = f"/proc/self/ns/{PROC_NAMES[t]}"
            try:
                if os.stat(path).st_ino == os.stat(mine).st_ino:
                    continue  # setns into our own user ns fails with EINVAL
            except FileNotFoundError:
                continue
            join.append((t, path))
        return cls(join=tuple(join), new_user=False, new_flags=0)

    @property
    def new_pid(self) -> bool:
        return bool(self.new_flags & sc.CLONE_NEWPID)


def open_join_fds(plan: NamespacePlan) -> list[tuple[str, int]]:
    """Open every namespace to join before joining any (a joined mount namespace changes
    what the later paths would mean)."""
    out: list[tuple[str, int]] = []
    try:
        for t, path in plan.join:
            try:
                out.append((t, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
            except OSError as e:
                raise SpecError(f"cannot open namespace {path!r}: {e.strerror}",
                                field=f"linux.namespaces[{t}].path", errno=e.errno or 0) from e
    except BaseException:
        for _, fd in out:
            os.close(fd)
        raise
    return out


def join(syscalls: sc.Syscalls, fds: Sequence[tuple[str, int]]) -> None:
    for t, fd in fds:
        try:
            syscalls.setns(fd, FLAGS[t])
        except OSError as e:
            raise HostError(f"setns into {t} namespace failed: {e.strerror}",
                            errno=e.errno or 0) from e
        finally:
            os.close(fd)


def unshare(syscalls: sc.Syscalls, flags: int) -> None:
    if not flags:
        return
    try:
        syscalls.unshare(flags)
    except OSError as e:
        raise HostError(f"unshare({flags:#x}) failed: {e.strerror}", errno=e.errno or 0) from e


def id_map_text(maps: Sequence[IDMapping]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)


def write_id_maps(pid: int, linux: Linux) -> None:
    """Write uid_map/gid_map of a process that just unshared its user namespace (done by
    the parent: a process cannot map ids it does not own from inside)."""
    base = f"/proc/{pid}"
    uid_maps = linux.uid_mappings
    gid_maps = linux.gid_mappings
    try:
        if gid_maps:
            with open(f"{base}/gid_map", "w") as f:
                f.write(id_map_text(gid_maps))
        if uid_maps:
            with open(f"{base}/uid_map", "w") as f:
                f.write(id_map_text(uid_maps))
    except OSError as e:
        raise HostError(f"writing id maps of pid {pid}: {e.strerror}", errno=e.errno or 0) from e
    log.debug("event=id_maps_written pid=%d uid_maps=%d gid_maps=%d", pid, len(uid_maps),
              len(gid_maps))
