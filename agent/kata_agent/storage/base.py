"""What every storage driver receives, and the shape of a driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kata_agent.engine.errors import SpecError
from kata_agent.storage.discovery import DeviceFinder
from kata_agent.storage.options import (
    FORBIDDEN_FLAGS,
    check_fstype,
    dev_name_ok,
    parse_mount_options,
)
from kata_agent.storage.spec import MountPlan, StorageSpec


@dataclass(frozen=True, slots=True)
class DriverContext:
    finder: DeviceFinder
    allowed_roots: tuple[str, ...]


Driver = Callable[[StorageSpec, DriverContext], MountPlan]


def check_tag(tag: str, field: str = "source") -> str:
    """A virtio mount tag (9p, virtio-fs): short and plain."""
    if not dev_name_ok(tag):
        raise SpecError(f"invalid mount tag {tag!r}", field=field)
    return tag


def fs_options(spec: StorageSpec) -> tuple[int, int, list[str]]:
    """Parse ``spec.options`` and refuse flags that would not create a new filesystem."""
    flags, propagation, data = parse_mount_options(spec.options)
    if flags & FORBIDDEN_FLAGS:
        # bind/remount/move would act on an existing guest path instead of a new mount.
        raise SpecError("bind, rbind, remount and move are not allowed for storage",
                        field="options")
    return flags, propagation, data


def block_plan(spec: StorageSpec, ctx: DriverContext, find: Callable[[], str]) -> MountPlan:
    """The mount of a filesystem on the block device ``find()`` returns. The request is
    validated before ``find`` waits for any hotplug."""
    fstype = check_fstype(spec.fstype)
    flags, propagation, data = fs_options(spec)
    node = find()
    ctx.finder.block_device(node, "source")
    return MountPlan(source=node, fstype=fstype, flags=flags, propagation=propagation,
                     data=",".join(data))
