"""``ephemeral``: a tmpfs in guest memory (the sandbox's shm, emptyDir volumes)."""

from __future__ import annotations

from kata_agent.engine.errors import SpecError
from kata_agent.storage.base import DriverContext, fs_options
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("ephemeral",)


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    if spec.source not in ("tmpfs", "shm"):
        raise SpecError(f"ephemeral source must be 'tmpfs' or 'shm', not {spec.source!r}",
                        field="source")
    if spec.fstype not in ("", "tmpfs"):
        raise SpecError(f"ephemeral storage is tmpfs, not {spec.fstype!r}", field="fstype")
    flags, propagation, data = fs_options(spec)
    return MountPlan(source=spec.source, fstype="tmpfs", flags=flags, propagation=propagation,
                     data=",".join(data))
