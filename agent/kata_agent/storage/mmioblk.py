"""``mmioblk``: a virtio-mmio disk whose /dev node the host predicted (``/dev/vdb``)."""

from __future__ import annotations

from kata_agent.storage.base import DriverContext, block_plan
from kata_agent.storage.options import dev_node
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("mmioblk",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    node = dev_node(spec.source, ctx.finder.dev_root, "source")
    return block_plan(spec, ctx, lambda: ctx.finder.wait_node(node, "source"))
