"""``virtio-fs``: a virtiofsd share mounted by its tag."""

from __future__ import annotations

from kata_agent.engine.errors import SpecError
from kata_agent.storage.base import DriverContext, check_tag, fs_options
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("virtio-fs",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    tag = check_tag(spec.source)
    # Older runtimes send the fstype as "virtio_fs"; the kernel calls it "virtiofs".
    if spec.fstype not in ("", "virtiofs", "virtio_fs"):
        raise SpecError(f"virtio-fs storage cannot mount {spec.fstype!r}", field="fstype")
    flags, propagation, data = fs_options(spec)
    return MountPlan(source=tag, fstype="virtiofs", flags=flags, propagation=propagation,
                     data=",".join(data))
