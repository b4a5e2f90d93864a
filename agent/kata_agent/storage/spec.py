"""Typed storage and device requests, built once at the RPC edge."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StorageSpec:
    """What the host asks to be mounted (agent.proto ``Storage``)."""

    driver: str
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()
    driver_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to pass into a container (agent.proto ``Device``)."""

    type: str
    container_path: str
    id: str = ""
    vm_path: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MountPlan:
    """What a driver decided: one mount (or, with ``mount=False``, only a directory)."""

    source: str
    fstype: str
    flags: int = 0
    propagation: int = 0
    data: str = ""
    mount: bool = True
    dir_mode: int = 0o755
    uid: int | None = None
    gid: int | None = None
    # O_PATH fds named in ``data`` as /proc/self/fd/N; closed once the mount is done.
    hold_fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MountHandle:
    """One user's reference to a mounted storage; give it back to ``remove``."""

    mount_point: str
    driver: str
    source: str


@dataclass(frozen=True, slots=True)
class ResolvedDevice:
    """A device found in the guest, for the container spec's ``linux.devices``."""

    container_path: str
    path: str
    major: int
    minor: int
    kind: str = "b"
