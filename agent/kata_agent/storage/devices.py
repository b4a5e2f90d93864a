"""Devices passed into containers (agent.proto ``Device``): find the guest node of each
and rewrite the OCI spec's ``linux.devices`` (and the matching device cgroup rules) with
the guest's major:minor, which the host cannot predict."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from kata_agent.engine.errors import NotFoundError, SpecError
from kata_agent.storage.discovery import DeviceFinder
from kata_agent.storage.options import check_abs_path, check_list, check_text, dev_node
from kata_agent.storage.spec import DeviceSpec, ResolvedDevice

DEVICE_TYPES = ("blk", "blk-ccw", "mmioblk", "nvdimm", "scsi")
MAX_DEVICES = 128


def _vm_node(spec: DeviceSpec, finder: DeviceFinder) -> str:
    if not spec.vm_path:
        raise SpecError(f"{spec.type} device needs vm_path", field="vm_path")
    return finder.wait_node(dev_node(spec.vm_path, finder.dev_root, "vm_path"), "vm_path")


def resolve_device(finder: DeviceFinder, spec: DeviceSpec) -> ResolvedDevice:
    """The guest block device the host means by ``spec``, waiting for hotplug."""
    if spec.type not in DEVICE_TYPES:
        raise SpecError(f"unknown device type {spec.type!r}", field="type")
    check_abs_path(spec.container_path, "container_path")
    check_text(spec.id, "id")
    check_list(spec.options, "options")
    if spec.type == "blk":
        node = finder.pci_block(spec.id, "id") if spec.id else _vm_node(spec, finder)
    elif spec.type == "scsi":
        node = finder.scsi_block(spec.id, "id")
    elif spec.type == "blk-ccw":
        node = finder.ccw_block(spec.id, "id")
    else:  # mmioblk, nvdimm: the host predicted the node name
        node = _vm_node(spec, finder)
    st = finder.block_device(node, "vm_path")
    return ResolvedDevice(container_path=spec.container_path, path=node,
                          major=os.major(st.st_rdev), minor=os.minor(st.st_rdev))


def update_spec_devices(spec: dict[str, Any], resolved: Sequence[ResolvedDevice]
                        ) -> dict[str, Any]:
    """Set major/minor of each ``linux.devices`` entry whose ``path`` is a resolved
    device's container_path, and move ``linux.resources.devices`` rules that named the
    host's numbers to the guest's. Changes ``spec`` in place and returns it."""
    linux = spec.get("linux")
    devices = linux.get("devices") if isinstance(linux, dict) else None
    if not isinstance(devices, list) or not devices:
        if resolved:
            raise NotFoundError("the spec has no linux.devices to update",
                                field="linux.devices")
        return spec
    assert isinstance(linux, dict)
    resources = linux.get("resources")
    rules = resources.get("devices") if isinstance(resources, dict) else None
    rules = rules if isinstance(rules, list) else []
    # Match everything against the original numbers first, so a device that takes the
    # host numbers of another one cannot be rewritten twice.
    changes: list[tuple[dict[str, Any], list[dict[str, Any]], ResolvedDevice]] = []
    for r in resolved:
        entry = next((d for d in devices
                      if isinstance(d, dict) and d.get("path") == r.container_path), None)
        if entry is None:
            raise NotFoundError(f"no linux.devices entry with path {r.container_path!r}",
                                field="linux.devices")
        old = (entry.get("major"), entry.get("minor"))
        matching = [rule for rule in rules if isinstance(rule, dict) and None not in old
                    and (rule.get("major"), rule.get("minor")) == old]
        changes.append((entry, matching, r))
    for entry, matching, r in changes:
        entry["major"], entry["minor"] = r.major, r.minor
        for rule in matching:
            rule["major"], rule["minor"] = r.major, r.minor
    return spec
