"""``9p``: a virtio-9p share (the sandbox's ``kataShared`` directory)."""

from __future__ import annotations

from kata_agent.engine.errors import SpecError
from kata_agent.storage.base import DriverContext, check_tag, fs_options
from kata_agent.storage.options import split_kv
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("9p",)
MIN_MSIZE = 4096
MAX_MSIZE = 1 << 26


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    tag = check_tag(spec.source)
    if spec.fstype not in ("", "9p"):
        raise SpecError(f"9p storage cannot mount {spec.fstype!r}", field="fstype")
    flags, propagation, data = fs_options(spec)
    kv = split_kv(data)
    if kv.get("trans", "virtio") != "virtio":
        raise SpecError("only trans=virtio is supported", field="options")
    if kv.get("version", "9p2000.L") != "9p2000.L":
        raise SpecError("only version=9p2000.L is supported", field="options")
    if "msize" in kv:
        msize = kv["msize"]
        if not msize.isdigit() or not MIN_MSIZE <= int(msize) <= MAX_MSIZE:
            raise SpecError(f"msize {msize!r} outside {MIN_MSIZE}..{MAX_MSIZE}",
                            field="options")
    rest = [d for d in data if d.partition("=")[0] not in ("trans", "version")]
    words = ["trans=virtio", "version=9p2000.L", *rest]
    return MountPlan(source=tag, fstype="9p", flags=flags, propagation=propagation,
                     data=",".join(words))
