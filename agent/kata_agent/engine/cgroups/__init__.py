"""Container cgroups: v1 (one hierarchy per controller), v2 (unified) and hybrid hosts.

``open_cgroup`` looks at what is mounted under the root and returns the backend to use:
v2 when the root itself is a cgroup2 mount, v1 when controllers live on v1 hierarchies
(on hybrid hosts the controller-less ``unified`` mount is left alone), and v2 on
``<root>/unified`` when no v1 controller exists at all.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..errors import HostError
from .base import Cgroup, container_path
from .v1 import CgroupV1, find_hierarchies
from .v2 import CgroupV2

if TYPE_CHECKING:
    from .stats import CgroupStats

log = logging.getLogger(__name__)

__all__ = ["Cgroup", "CgroupStats", "CgroupV1", "CgroupV2", "detect", "open_cgroup"]


def __getattr__(name: str) -> Any:
    # The statistics types load when asked for: creating or deleting a cgroup needs none.
    if name == "CgroupStats":
        from .stats import CgroupStats

        return CgroupStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def detect(root: str = "/sys/fs/cgroup") -> tuple[int, str | dict[str, str]]:
    """(2, unified mount) or (1, {controller: hierarchy mount})."""
    if os.path.isfile(os.path.join(root, "cgroup.controllers")):
        return 2, root
    v1 = find_hierarchies(root)
    if v1:
        return 1, v1
    unified = os.path.join(root, "unified")
    if os.path.isfile(os.path.join(unified, "cgroup.controllers")):
        return 2, unified
    raise HostError(f"no cgroup hierarchy under {root}")


def open_cgroup(cgroups_path: str, container_id: str, *, root: str = "/sys/fs/cgroup",
                version: int | None = None) -> Cgroup:
    """The cgroup of one container; ``version`` forces a backend (tests, hybrid hosts)."""
    path = container_path(cgroups_path, container_id)
    if version == 2 and not os.path.isfile(os.path.join(root, "cgroup.controllers")):
        unified = os.path.join(root, "unified")
        if os.path.isfile(os.path.join(unified, "cgroup.controllers")):
            return CgroupV2(unified, path)
        raise HostError(f"no cgroup2 mount at {root}")
    if version == 2:
        return CgroupV2(root, path)
    found_version, where = detect(root)
    if version == 1 and found_version != 1:
        raise HostError(f"no cgroup v1 hierarchy under {root}")
    if isinstance(where, dict):
        log.debug("cgroup v1 path=%s controllers=%s", path, ",".join(sorted(where)))
        return CgroupV1(where, path)
    log.debug("cgroup v2 path=%s mount=%s", path, where)
    return CgroupV2(where, path)
