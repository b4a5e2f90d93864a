"""``nvdimm``: a persistent-memory disk ``/dev/pmemN``, mounted with DAX by default."""

from __future__ import annotations

import re

from kata_agent.engine.errors import SpecError
from kata_agent.storage.base import DriverContext, block_plan
from kata_agent.storage.options import dev_node
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("nvdimm",)
_PMEM_RE = re.compile(r"^/dev/pmem[0-9]{1,4}$")


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    if not _PMEM_RE.match(spec.source):
        raise SpecError(f"{spec.source!r} is not a /dev/pmemN device", field="source")
    node = dev_node(spec.source, ctx.finder.dev_root, "source")
    base = block_plan(spec, ctx, lambda: ctx.finder.wait_node(node, "source"))
    words = [w for w in base.data.split(",") if w]
    # Pages of the image are mapped straight from host memory unless the host said otherwise.
    if not any(w == "dax" or w.startswith("dax=") for w in words):
        words.append("dax")
    return MountPlan(source=base.source, fstype=base.fstype, flags=base.flags,
                     propagation=base.propagation, data=",".join(words))
