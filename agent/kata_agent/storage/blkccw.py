"""``blk-ccw``: a virtio-blk disk on the s390x channel subsystem, by bus id."""

from __future__ import annotations

from kata_agent.storage.base import DriverContext, block_plan
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("blk-ccw",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    return block_plan(spec, ctx, lambda: ctx.finder.ccw_block(spec.source, "source"))
