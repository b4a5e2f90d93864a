from __future__ import annotations

from typing import Any

import pytest
from kata_agent.engine.errors import SpecError
from kata_agent.engine.resources import (
    DEFAULT_ALLOWED_DEVICES,
    DeviceRule,
    LinuxResources,
    parse_cpu_list,
)

FULL: dict[str, Any] = {
    "devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "wr"},
        {"allow": True, "type": "b", "major": 8, "access": "m"},
    ],
    "memory": {
        "limit": 33554432, "reservation": 16777216, "swap": 67108864, "kernel": -1,
        "kernelTCP": 1048576, "swappiness": 10, "disableOOMKiller": True,
        "useHierarchy": True, "checkBeforeUpdate": False,
    },
    "cpu": {
        "shares": 512, "quota": 50000, "burst": 1000, "period": 100000,
        "realtimeRuntime": 950000, "realtimePeriod": 1000000, "cpus": "0-1,3", "mems": "0",
        "idle": 1,
    },
    "pids": {"limit": 16},
    "blockIO": {
        "weight": 500, "leafWeight": 300,
        "weightDevice": [{"major": 8, "minor": 0, "weight": 600, "leafWeight": 100}],
        "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
        "throttleWriteBpsDevice": [{"major": 8, "minor": 0, "rate": 2097152}],
        "throttleReadIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}],
        "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 200}],
    },
    "hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}],
    "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]},
    "unified": {"memory.high": "30000000", "io.bfq.weight": "50"},
}


def test_full_resources_parse_every_field() -> None:
    r = LinuxResources.from_oci(FULL)
    assert r.devices[0] == DeviceRule(allow=False, type="a", major=-1, minor=-1, access="rwm")
    assert r.devices[1] == DeviceRule(allow=True, type="c", major=10, minor=200, access="rw")
    assert r.devices[2].minor == -1 and r.devices[2].access == "m"
    assert r.memory is not None and r.memory.limit == 33554432 and r.memory.swap == 67108864
    assert r.memory.kernel == -1 and r.memory.kernel_tcp == 1048576
    assert r.memory.swappiness == 10 and r.memory.disable_oom_killer is True
    assert r.memory.use_hierarchy is True and r.memory.check_before_update is False
    assert r.cpu is not None and r.cpu.shares == 512 and r.cpu.quota == 50000
    assert r.cpu.period == 100000 and r.cpu.realtime_runtime == 950000
    assert r.cpu.realtime_period == 1000000 and r.cpu.cpus == "0-1,3" and r.cpu.idle == 1
    assert r.cpu.burst == 1000 and r.cpu.mems == "0"
    assert r.pids is not None and r.pids.limit == 16
    assert r.block_io is not None and r.block_io.weight == 500 and r.block_io.leaf_weight == 300
    assert r.block_io.weight_device[0].leaf_weight == 100
    assert r.block_io.throttle_write_iops_device[0].rate == 200
    assert r.block_io.throttle_read_bps_device[0].rate == 1048576
    assert r.hugepage_limits[0].page_size == "2MB"
    assert r.network is not None and r.network.class_id == 1048577
    assert r.network.priorities[0].name == "eth0"
    assert dict(r.unified) == {"memory.high": "30000000", "io.bfq.weight": "50"}


def test_empty_is_empty() -> None:
    assert LinuxResources.from_oci({}) == LinuxResources.EMPTY
    assert LinuxResources.EMPTY.devices == () and LinuxResources.EMPTY.memory is None


def test_resources_are_frozen() -> None:
    r = LinuxResources.from_oci(FULL)
    with pytest.raises(AttributeError):
        r.memory = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.unified["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"memory": {"limit": "1G"}}, "linux.resources.memory.limit"),
        ({"memory": {"limit": True}}, "linux.resources.memory.limit"),
        ({"memory": {"limit": -2}}, "linux.resources.memory.limit"),
        ({"memory": {"limit": 1 << 63}}, "linux.resources.memory.limit"),
        ({"memory": {"swappiness": 101}}, "linux.resources.memory.swappiness"),
        ({"memory": {"limit": 100, "swap": 50}}, "linux.resources.memory.swap"),
        ({"memory": {"disableOOMKiller": 1}}, "linux.resources.memory.disableOOMKiller"),
        ({"memory": []}, "linux.resources.memory"),
        ({"cpu": {"shares": 1}}, "linux.resources.cpu.shares"),
        ({"cpu": {"quota": 10}}, "linux.resources.cpu.quota"),
        ({"cpu": {"period": 10}}, "linux.resources.cpu.period"),
        ({"cpu": {"cpus": "0-"}}, "linux.resources.cpu.cpus"),
        ({"cpu": {"cpus": "3-1"}}, "linux.resources.cpu.cpus"),
        ({"cpu": {"mems": "a"}}, "linux.resources.cpu.mems"),
        ({"cpu": {"idle": 2}}, "linux.resources.cpu.idle"),
        ({"pids": {}}, "linux.resources.pids.limit"),
        ({"blockIO": {"weight": 5}}, "linux.resources.blockIO.weight"),
        ({"blockIO": {"weight": 1001}}, "linux.resources.blockIO.weight"),
        ({"blockIO": {"weightDevice": [{"major": 8}]}},
         "linux.resources.blockIO.weightDevice[0].minor"),
        ({"blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0}]}},
         "linux.resources.blockIO.throttleReadBpsDevice[0].rate"),
        ({"hugepageLimits": [{"pageSize": "../2MB", "limit": 1}]},
         "linux.resources.hugepageLimits[0].pageSize"),
        ({"network": {"priorities": [{"name": "a/b", "priority": 1}]}},
         "linux.resources.network.priorities[0].name"),
        ({"devices": [{"allow": True, "type": "x"}]}, "linux.resources.devices[0].type"),
        ({"devices": [{"allow": True, "access": "rwx"}]}, "linux.resources.devices[0].access"),
        ({"devices": [{"allow": True, "access": ""}]}, "linux.resources.devices[0].access"),
        ({"devices": [{"type": "c"}]}, "linux.resources.devices[0].allow"),
        ({"devices": [{"allow": True}] * 1025}, "linux.resources.devices"),
        ({"unified": {"../memory.max": "1"}}, "linux.resources.unified.../memory.max"),
        ({"unified": {"memory/max": "1"}}, "linux.resources.unified.memory/max"),
        ({"unified": {"cgroup.procs": "1"}}, "linux.resources.unified.cgroup.procs"),
        ({"unified": {"memory.max": 5}}, "linux.resources.unified.memory.max"),
    ],
)
def test_invalid_fields_are_named(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as ei:
        LinuxResources.from_oci(doc)
    assert ei.value.field == field


def test_swap_unlimited_or_equal_is_accepted() -> None:
    assert LinuxResources.from_oci({"memory": {"limit": 100, "swap": -1}}).memory is not None
    m = LinuxResources.from_oci({"memory": {"limit": 100, "swap": 100}}).memory
    assert m is not None and m.swap == 100


def test_cpu_list_syntax() -> None:
    for ok in ("0", "0-3", "0,2,4-7", ""):
        assert parse_cpu_list(ok, "f") == ok
    for bad in ("-1", "0--1", "1,", " 1", "99999"):
        with pytest.raises(SpecError):
            parse_cpu_list(bad, "f")


def test_device_rule_v1_strings() -> None:
    assert DeviceRule(allow=True).cgroup_v1_string() == "a"
    assert DeviceRule(True, "c", 136, -1, "rwm").cgroup_v1_string() == "c 136:* rwm"
    assert DeviceRule(True, "b", -1, -1, "m").cgroup_v1_string() == "b *:* m"


def test_default_devices_cover_the_standard_nodes() -> None:
    nodes = {(r.type, r.major, r.minor) for r in DEFAULT_ALLOWED_DEVICES}
    for node in [("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                 ("c", 5, 0), ("c", 5, 2), ("c", 136, -1)]:
        assert node in nodes
    assert ("c", 1, 1) not in nodes  # /dev/mem
