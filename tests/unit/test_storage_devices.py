"""Device passthrough: resolving Device requests and rewriting the OCI spec's devices."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kata_agent.engine.errors import HostError, NotFoundError, SpecError
from kata_agent.storage import DeviceSpec, ResolvedDevice, update_spec_devices
from kata_agent.storage.devices import resolve_device
from kata_agent.storage.discovery import DeviceFinder


class FakeBlockFinder(DeviceFinder):
    """Real sysfs lookups on a fake tree; an existing node counts as block device 252:N,
    N being the length of its name."""

    def block_device(self, node: str, field: str) -> Any:
        if not os.path.exists(node):
            raise NotFoundError(node, field=field)
        return SimpleNamespace(st_mode=stat.S_IFBLK | 0o660,
                               st_rdev=os.makedev(252, len(os.path.basename(node))))


class NoEvents:
    def receive(self, timeout: float) -> bytes | None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def finder(tmp_path: Path) -> FakeBlockFinder:
    (tmp_path / "dev").mkdir()
    return FakeBlockFinder(sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"),
                           hotplug_timeout=0.05, source_factory=NoEvents, arch="x86_64")


def test_resolve_blk_by_pci(finder: FakeBlockFinder, tmp_path: Path) -> None:
    bridge = tmp_path / "sys/devices/pci0000:00/0000:00:02.0"
    (bridge / "pci_bus/0000:01").mkdir(parents=True)
    (bridge / "0000:01:03.0/virtio5/block/vdd").mkdir(parents=True)
    (tmp_path / "dev/vdd").write_text("")
    r = resolve_device(finder, DeviceSpec("blk", "/dev/xvdb", id="02/03"))
    assert r == ResolvedDevice("/dev/xvdb", str(tmp_path / "dev/vdd"), 252, 3)


def test_resolve_scsi(finder: FakeBlockFinder, tmp_path: Path) -> None:
    (tmp_path / "sys/bus/scsi/devices/0:0:0:1/block/sdab").mkdir(parents=True)
    (tmp_path / "dev/sdab").write_text("")
    r = resolve_device(finder, DeviceSpec("scsi", "/dev/sdx", id="0:1"))
    assert (r.path, r.major, r.minor) == (str(tmp_path / "dev/sdab"), 252, 4)


def test_resolve_by_vm_path(finder: FakeBlockFinder, tmp_path: Path) -> None:
    (tmp_path / "dev/pmem0").write_text("")
    r = resolve_device(finder, DeviceSpec("nvdimm", "/dev/pmem", vm_path="/dev/pmem0"))
    assert r.path == str(tmp_path / "dev/pmem0") and r.minor == 5


@pytest.mark.parametrize(("spec", "field"), [
    (DeviceSpec("vfio", "/dev/x", id="1"), "type"),
    (DeviceSpec("blk", "dev/x", id="02/01"), "container_path"),
    (DeviceSpec("blk", "/dev/../x", id="02/01"), "container_path"),
    (DeviceSpec("mmioblk", "/dev/x"), "vm_path"),
    (DeviceSpec("mmioblk", "/dev/x", vm_path="/etc/shadow"), "vm_path"),
    (DeviceSpec("blk", "/dev/x", id="2/1"), "id"),
    (DeviceSpec("blk-ccw", "/dev/x", id="0.0.0001"), "id"),
])
def test_resolve_rejects(finder: FakeBlockFinder, spec: DeviceSpec, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        resolve_device(finder, spec)
    assert ei.value.field == field


def test_resolve_missing_node_times_out(finder: FakeBlockFinder) -> None:
    with pytest.raises(HostError):
        resolve_device(finder, DeviceSpec("mmioblk", "/dev/x", vm_path="/dev/vdq"))


SPEC: dict[str, Any] = {
    "linux": {
        "devices": [
            {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0},
            {"path": "/dev/xvdb", "type": "b", "major": 8, "minor": 16},
        ],
        "resources": {"devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rw"},
            {"allow": True, "type": "b", "major": 8, "minor": 16, "access": "rw"},
        ]},
    },
}


def test_update_spec_devices_rewrites_entries_and_rules() -> None:
    spec = copy.deepcopy(SPEC)
    out = update_spec_devices(spec, [ResolvedDevice("/dev/xvda", "/dev/vda", 252, 0)])
    assert out is spec
    assert spec["linux"]["devices"][0] == {"path": "/dev/xvda", "type": "b", "major": 252,
                                           "minor": 0}
    assert spec["linux"]["devices"][1]["major"] == 8
    rules = spec["linux"]["resources"]["devices"]
    assert (rules[1]["major"], rules[1]["minor"]) == (252, 0)
    assert (rules[2]["major"], rules[2]["minor"]) == (8, 16)
    assert "major" not in rules[0]


def test_update_spec_devices_swapped_numbers_not_rewritten_twice() -> None:
    # Guest numbers of the first device equal the host numbers of the second.
    spec = copy.deepcopy(SPEC)
    update_spec_devices(spec, [ResolvedDevice("/dev/xvda", "/dev/vda", 8, 16),
                               ResolvedDevice("/dev/xvdb", "/dev/vdb", 8, 0)])
    devs = spec["linux"]["devices"]
    assert [(d["major"], d["minor"]) for d in devs] == [(8, 16), (8, 0)]
    rules = spec["linux"]["resources"]["devices"]
    assert [(r.get("major"), r.get("minor")) for r in rules] == [(None, None), (8, 16), (8, 0)]


def test_update_spec_devices_missing_entry() -> None:
    spec = copy.deepcopy(SPEC)
    with pytest.raises(NotFoundError) as ei:
        update_spec_devices(spec, [ResolvedDevice("/dev/nope", "/dev/vda", 252, 0)])
    assert ei.value.field == "linux.devices"
    with pytest.raises(NotFoundError):
        update_spec_devices({"linux": {}}, [ResolvedDevice("/dev/x", "/dev/vda", 1, 1)])
    assert update_spec_devices({}, []) == {}
