"""``local``: a plain directory in the guest, shared by the sandbox's containers.

Options: ``mode=0777`` (octal), ``uid=N``, ``gid=N``, and ``fsgid=N`` (group N plus the
set-group-id bit, so files created inside inherit the group).
"""

from __future__ import annotations

import stat

from kata_agent.storage.base import DriverContext
from kata_agent.storage.options import check_list, parse_id, parse_mode, split_kv
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("local",)
DEFAULT_MODE = 0o755


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    check_list(spec.options, "options")
    kv = split_kv(spec.options)
    mode = parse_mode(kv["mode"], "options.mode") if "mode" in kv else DEFAULT_MODE
    uid = parse_id(kv["uid"], "options.uid") if "uid" in kv else None
    gid = parse_id(kv["gid"], "options.gid") if "gid" in kv else None
    if "fsgid" in kv:
        gid = parse_id(kv["fsgid"], "options.fsgid")
        mode |= stat.S_ISGID
    return MountPlan(source="local", fstype="", mount=False, dir_mode=mode, uid=uid, gid=gid)
