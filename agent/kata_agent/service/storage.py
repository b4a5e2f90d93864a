"""RPC-edge converters: agent.proto ``Storage`` / ``Device`` -> storage dataclasses.

The repeated fields are bounded here, before anything below the edge sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kata_agent.engine.errors import SpecError
from kata_agent.storage.devices import MAX_DEVICES
from kata_agent.storage.options import MAX_OPTIONS, check_list, check_text
from kata_agent.storage.spec import DeviceSpec, StorageSpec

MAX_STORAGES = 128


def storage_from_pb(msg: Any, field: str = "storage") -> StorageSpec:
    for name in ("driver", "source", "fstype", "mount_point"):
        check_text(getattr(msg, name), f"{field}.{name}")
    return StorageSpec(
        driver=msg.driver, source=msg.source, fstype=msg.fstype, mount_point=msg.mount_point,
        options=check_list(list(msg.options), f"{field}.options", limit=MAX_OPTIONS),
        driver_options=check_list(list(msg.driver_options), f"{field}.driver_options",
                                  limit=MAX_OPTIONS),
    )


def storages_from_pb(msgs: Sequence[Any], field: str = "storages") -> list[StorageSpec]:
    if len(msgs) > MAX_STORAGES:
        raise SpecError(f"{len(msgs)} storages, at most {MAX_STORAGES}", field=field)
    return [storage_from_pb(m, f"{field}[{i}]") for i, m in enumerate(msgs)]


def device_from_pb(msg: Any, field: str = "device") -> DeviceSpec:
    for name in ("id", "type", "vm_path", "container_path"):
        check_text(getattr(msg, name), f"{field}.{name}")
    return DeviceSpec(
        type=msg.type, id=msg.id, vm_path=msg.vm_path, container_path=msg.container_path,
        options=check_list(list(msg.options), f"{field}.options", limit=MAX_OPTIONS),
    )


def devices_from_pb(msgs: Sequence[Any], field: str = "devices") -> list[DeviceSpec]:
    if len(msgs) > MAX_DEVICES:
        raise SpecError(f"{len(msgs)} devices, at most {MAX_DEVICES}", field=field)
    return [device_from_pb(m, f"{field}[{i}]") for i, m in enumerate(msgs)]
