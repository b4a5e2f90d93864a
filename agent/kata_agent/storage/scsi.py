"""``scsi``: a virtio-scsi disk at ``id:lun`` on the single SCSI host."""

from __future__ import annotations

from kata_agent.storage.base import DriverContext, block_plan
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("scsi",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    return block_plan(spec, ctx, lambda: ctx.finder.scsi_block(spec.source, "source"))
