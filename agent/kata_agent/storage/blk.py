"""``blk``: a virtio-blk disk on PCI, named by its PCI path (``bb/dd``) or by a /dev node."""

from __future__ import annotations

from kata_agent.storage.base import DriverContext, block_plan
from kata_agent.storage.options import check_text, dev_node
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("blk",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    check_text(spec.source, "source")

    def find() -> str:
        if spec.source.startswith("/"):
            return ctx.finder.wait_node(dev_node(spec.source, ctx.finder.dev_root, "source"),
                                        "source")
        return ctx.finder.pci_block(spec.source, "source")

    return block_plan(spec, ctx, find)
