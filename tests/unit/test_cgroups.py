"""cgroup v1/v2 backends against a tmpdir standing in for cgroupfs (files pre-created).

The real kernel paths are covered in tests/privileged/test_cgroups*.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from kata_agent.engine.cgroups import CgroupV1, CgroupV2, base, detect, devices_bpf, open_cgroup
from kata_agent.engine.cgroups import v1 as v1mod
from kata_agent.engine.cgroups import v2 as v2mod
from kata_agent.engine.cgroups.base import container_path
from kata_agent.engine.cgroups.stats import parse_blkio, parse_nested_keyed
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.resources import LinuxResources

from .test_resources import FULL

V1_FILES: dict[str, dict[str, str]] = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.soft_limit_in_bytes": "", "memory.kmem.limit_in_bytes": "",
        "memory.kmem.tcp.limit_in_bytes": "", "memory.swappiness": "60\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        "memory.use_hierarchy": "1\n", "memory.usage_in_bytes": "1048576\n",
        "memory.max_usage_in_bytes": "2097152\n", "memory.failcnt": "4\n",
        "memory.memsw.usage_in_bytes": "1148576\n", "memory.memsw.max_usage_in_bytes": "0\n",
        "memory.memsw.failcnt": "0\n", "memory.kmem.usage_in_bytes": "4096\n",
        "memory.kmem.max_usage_in_bytes": "8192\n", "memory.kmem.failcnt": "0\n",
        "memory.kmem.tcp.usage_in_bytes": "0\n", "memory.kmem.tcp.max_usage_in_bytes": "0\n",
        "memory.kmem.tcp.failcnt": "0\n",
        "memory.stat": "cache 12288\nrss 4096\ntotal_cache 16384\ntotal_rss 8192\n",
    },
    "cpu,cpuacct": {
        "cpu.shares": "1024\n", "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n",
        "cpu.rt_period_us": "1000000\n", "cpu.rt_runtime_us": "0\n", "cpu.idle": "0\n",
        "cpu.cfs_burst_us": "0\n",
        "cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n",
        "cpuacct.usage": "123456789\n", "cpuacct.usage_percpu": "100 200 \n",
        "cpuacct.usage_percpu_sys": "10 20\n", "cpuacct.usage_percpu_user": "90 180\n",
        "cpuacct.stat": "user 7\nsystem 3\n",
    },
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
    "pids": {"pids.max": "max\n", "pids.current": "3\n"},
    "blkio": {
        "blkio.weight": "", "blkio.leaf_weight": "", "blkio.weight_device": "",
        "blkio.leaf_weight_device": "", "blkio.throttle.read_bps_device": "",
        "blkio.throttle.write_bps_device": "", "blkio.throttle.read_iops_device": "",
        "blkio.throttle.write_iops_device": "",
        "blkio.throttle.io_service_bytes_recursive":
            "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Total 12288\n"
            "Total 12288\n",
        "blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 2\nTotal 3\n",
    },
    "hugetlb": {
        "hugetlb.2MB.limit_in_bytes": "", "hugetlb.2MB.usage_in_bytes": "2097152\n",
        "hugetlb.2MB.max_usage_in_bytes": "4194304\n", "hugetlb.2MB.failcnt": "1\n",
    },
    "devices": {"devices.allow": "", "devices.deny": ""},
    "freezer": {"freezer.state": "THAWED\n"},
    "net_cls": {"net_cls.classid": ""},
    "net_prio": {"net_prio.ifpriomap": ""},
}


def _write_files(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.procs").write_text("")
    for name, text in files.items():
        (d / name).write_text(text)


def make_v1(root: Path, path: str) -> None:
    for mount, files in V1_FILES.items():
        m = root / mount
        _write_files(m, files)
        (m / "tasks").write_text("")
        if mount == "cpuset":
            (m / "cpuset.cpus").write_text("0-3\n")
            (m / "cpuset.mems").write_text("0\n")
        d = m
        for part in path.strip("/").split("/"):
            d = d / part
            _write_files(d, files)
    os.symlink("cpu,cpuacct", root / "cpu")
    os.symlink("cpu,cpuacct", root / "cpuacct")
    (root / "systemd").mkdir()
    (root / "systemd" / "tasks").write_text("")


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every cgroup write (name, value) while still writing the files."""
    log: list[tuple[str, str]] = []
    real = base.write_file

    def rec(directory: str, name: str, value: str) -> None:
        log.append((name, value))
        real(directory, name, value)

    monkeypatch.setattr(v1mod, "write_file", rec)
    monkeypatch.setattr(v2mod, "write_file", rec)
    return log


def read(d: str, name: str) -> str:
    return Path(d, name).read_text()


# --- paths and detection --------------------------------------------------------------


def test_container_path_rules() -> None:
    assert container_path("", "c1") == "/kata/c1"
    assert container_path("pods/p1", "c1") == "/kata/pods/p1"
    assert container_path("/kubepods//pod1/c1/", "c1") == "/kubepods/pod1/c1"
    assert container_path("system.slice:cri:abc", "c1") == "/system.slice/cri-abc.scope"
    assert (container_path("kubepods-besteffort.slice:cri:x", "c")
            == "/kubepods.slice/kubepods-besteffort.slice/cri-x.scope")
    for bad in ("/a/../../etc", "..", "/a/./b", "a:b", "x\0y"):
        with pytest.raises(SpecError) as ei:
            container_path(bad, "c1")
        assert ei.value.field == "linux.cgroupsPath"
    for bad_id in ("../x", "a/b", "", ".x"):
        with pytest.raises(SpecError):
            container_path("", bad_id)


def test_detect_v1_hybrid_and_v2(tmp_path: Path) -> None:
    make_v1(tmp_path, "/kata/c1")
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    version, where = detect(str(tmp_path))
    assert version == 1 and isinstance(where, dict)
    assert where["cpu"] == where["cpuacct"] == str(tmp_path / "cpu,cpuacct")
    assert "systemd" not in where
    cg = open_cgroup("", "c1", root=str(tmp_path))
    assert isinstance(cg, CgroupV1) and cg.version == 1
    assert cg.paths()["memory"] == str(tmp_path / "memory/kata/c1")
    # forced v2 on a hybrid host goes to the unified mount
    cg2 = open_cgroup("", "c1", root=str(tmp_path), version=2)
    assert isinstance(cg2, CgroupV2) and cg2.paths()[""] == str(tmp_path / "unified/kata/c1")

    pure = tmp_path / "pure"
    pure.mkdir()
    (pure / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect(str(pure)) == (2, str(pure))
    assert open_cgroup("/x/y", "c1", root=str(pure)).paths()[""] == str(pure / "x/y")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HostError):
        detect(str(empty))


# --- v1 -------------------------------------------------------------------------------


@pytest.fixture
def v1(tmp_path: Path) -> CgroupV1:
    make_v1(tmp_path, "/kata/c1")
    cg = open_cgroup("", "c1", root=str(tmp_path))
    assert isinstance(cg, CgroupV1)
    return cg


def test_v1_create_fills_cpuset_and_default_devices(
        v1: CgroupV1, writes: list[tuple[str, str]]) -> None:
    v1.create()
    p = v1.paths()
    assert read(p["cpuset"], "cpuset.cpus") == "0-3"
    assert read(p["cpuset"], "cpuset.mems") == "0"
    assert read(str(Path(p["cpuset"]).parent), "cpuset.cpus") == "0-3"
    dev = [w for w in writes if w[0].startswith("devices.")]
    assert dev[0] == ("devices.deny", "a")
    assert ("devices.allow", "c 1:3 rwm") in dev and ("devices.allow", "c 136:* rwm") in dev
    assert ("devices.allow", "c *:* m") in dev


def test_v1_apply_writes_every_file(v1: CgroupV1, writes: list[tuple[str, str]]) -> None:
    res = LinuxResources.from_oci({**FULL, "unified": {}})
    v1.apply(res)
    p = v1.paths()
    mem = p["memory"]
    assert read(mem, "memory.limit_in_bytes") == "33554432"
    assert read(mem, "memory.memsw.limit_in_bytes") == "67108864"
    # coming down from unlimited: the limit first, so memsw >= limit at every step
    names = [w[0] for w in writes]
    assert names.index("memory.limit_in_bytes") < names.index("memory.memsw.limit_in_bytes")
    assert read(mem, "memory.soft_limit_in_bytes") == "16777216"
    assert read(mem, "memory.kmem.limit_in_bytes") == "-1"
    assert read(mem, "memory.kmem.tcp.limit_in_bytes") == "1048576"
    assert read(mem, "memory.swappiness") == "10"
    assert read(mem, "memory.oom_control") == "1"
    assert read(mem, "memory.use_hierarchy") == "1"
    cpu = p["cpu"]
    assert read(cpu, "cpu.shares") == "512"
    assert read(cpu, "cpu.cfs_quota_us") == "50000"
    assert read(cpu, "cpu.cfs_period_us") == "100000"
    assert read(cpu, "cpu.cfs_burst_us") == "1000"
    assert read(cpu, "cpu.rt_period_us") == "1000000"
    assert read(cpu, "cpu.rt_runtime_us") == "950000"
    assert names.index("cpu.rt_period_us") < names.index("cpu.rt_runtime_us")
    assert read(cpu, "cpu.idle") == "1"
    assert read(p["cpuset"], "cpuset.cpus") == "0-1,3"
    assert read(p["cpuset"], "cpuset.mems") == "0"
    assert read(p["pids"], "pids.max") == "16"
    blk = p["blkio"]
    assert read(blk, "blkio.weight") == "500"
    assert read(blk, "blkio.leaf_weight") == "300"
    assert read(blk, "blkio.weight_device") == "8:0 600"
    assert read(blk, "blkio.leaf_weight_device") == "8:0 100"
    assert read(blk, "blkio.throttle.read_bps_device") == "8:0 1048576"
    assert read(blk, "blkio.throttle.write_bps_device") == "8:0 2097152"
    assert read(blk, "blkio.throttle.read_iops_device") == "8:16 100"
    assert read(blk, "blkio.throttle.write_iops_device") == "8:16 200"
    assert read(p["hugetlb"], "hugetlb.2MB.limit_in_bytes") == "4194304"
    assert read(p["net_cls"], "net_cls.classid") == "1048577"
    assert read(p["net_prio"], "net_prio.ifpriomap") == "eth0 5"
    dev = [w for w in writes if w[0].startswith("devices.")]
    assert dev[:4] == [("devices.deny", "a"), ("devices.deny", "a"),
                       ("devices.allow", "c 10:200 rw"), ("devices.allow", "b 8:* m")]


def test_v1_memory_shrink_lowers_limit_before_memsw(
        v1: CgroupV1, writes: list[tuple[str, str]]) -> None:
    mem = v1.paths()["memory"]
    Path(mem, "memory.limit_in_bytes").write_text("1073741824\n")
    v1.apply(LinuxResources.from_oci({"memory": {"limit": 1 << 20, "swap": 2 << 20}}))
    names = [w[0] for w in writes]
    assert names == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v1_memory_grow_raises_memsw_first(
        v1: CgroupV1, writes: list[tuple[str, str]]) -> None:
    mem = v1.paths()["memory"]
    Path(mem, "memory.limit_in_bytes").write_text("1048576\n")
    v1.apply(LinuxResources.from_oci({"memory": {"limit": 8 << 20, "swap": 16 << 20}}))
    assert [w[0] for w in writes] == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    v1.apply(LinuxResources.from_oci({"memory": {"limit": 8 << 20, "swap": -1}}))
    assert writes[-2:] == [("memory.memsw.limit_in_bytes", "-1"),
                           ("memory.limit_in_bytes", str(8 << 20))]


def test_v1_pids_unlimited_and_bfq_weight(v1: CgroupV1) -> None:
    v1.apply(LinuxResources.from_oci({"pids": {"limit": -1}}))
    assert read(v1.paths()["pids"], "pids.max") == "max"
    blk = v1.paths()["blkio"]
    Path(blk, "blkio.bfq.weight").write_text("100\n")
    Path(blk, "blkio.bfq.weight_device").write_text("")
    v1.apply(LinuxResources.from_oci({"blockIO": {
        "weight": 700, "weightDevice": [{"major": 8, "minor": 0, "weight": 20}]}}))
    assert read(blk, "blkio.bfq.weight") == "700"
    assert read(blk, "blkio.bfq.weight_device") == "8:0 20"


def test_v1_rejects_unified_and_reports_missing_files(v1: CgroupV1) -> None:
    with pytest.raises(SpecError) as ei:
        v1.apply(LinuxResources.from_oci({"unified": {"memory.high": "1"}}))
    assert ei.value.field == "linux.resources.unified"
    with pytest.raises(HostError) as he:
        v1.apply(LinuxResources.from_oci({"hugepageLimits": [{"pageSize": "1GB", "limit": 0}]}))
    assert "hugetlb.1GB.limit_in_bytes" in str(he.value)


def test_v1_check_before_update(v1: CgroupV1) -> None:
    with pytest.raises(HostError) as ei:
        v1.apply(LinuxResources.from_oci(
            {"memory": {"limit": 4096, "checkBeforeUpdate": True}}))
    assert "above the new limit" in str(ei.value)


def test_v1_missing_controller_is_skipped(tmp_path: Path) -> None:
    make_v1(tmp_path, "/kata/c1")
    cg = CgroupV1({"memory": str(tmp_path / "memory")}, "/kata/c1")
    cg.apply(LinuxResources.from_oci({"pids": {"limit": 5}, "memory": {"limit": 1 << 20}}))
    assert read(cg.paths()["memory"], "memory.limit_in_bytes") == "1048576"
    assert read(str(tmp_path / "pids/kata/c1"), "pids.max") == "max\n"


def test_v1_processes_and_freezer(v1: CgroupV1) -> None:
    v1.add_process(4242)
    for d in set(v1.paths().values()):
        assert read(d, "cgroup.procs") == "4242"
    assert v1.procs() == [4242]
    v1.freeze()
    assert v1.is_frozen()
    v1.thaw()
    assert not v1.is_frozen()
    assert read(v1.paths()["freezer"], "freezer.state") == "THAWED"


def test_v1_freeze_times_out_and_thaws(v1: CgroupV1, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v1mod, "FREEZE_TIMEOUT", 0.2)
    d = v1.paths()["freezer"]
    real = base.write_file

    def stuck(directory: str, name: str, value: str) -> None:
        real(directory, name, "FREEZING" if value == "FROZEN" else value)

    monkeypatch.setattr(v1mod, "write_file", stuck)
    with pytest.raises(HostError):
        v1.freeze()
    assert read(d, "freezer.state") == "THAWED"


def test_v1_stats_parse_files(v1: CgroupV1) -> None:
    s = v1.stats()
    assert s.memory.usage.usage == 1048576 and s.memory.usage.max_usage == 2097152
    assert s.memory.usage.failcnt == 4
    assert s.memory.usage.limit == 9223372036854771712
    assert s.memory.swap_usage.usage == 1148576
    assert s.memory.kernel_usage.max_usage == 8192
    assert s.memory.cache == 16384 and s.memory.stats["rss"] == 4096
    assert s.memory.use_hierarchy
    assert s.cpu.cpu_usage.total_usage == 123456789
    assert s.cpu.cpu_usage.percpu_usage == (100, 200)
    assert s.cpu.cpu_usage.percpu_usage_in_kernelmode == (10, 20)
    hz = os.sysconf("SC_CLK_TCK")
    assert s.cpu.cpu_usage.usage_in_usermode == 7 * (1_000_000_000 // hz)
    assert s.cpu.throttling_data.periods == 10
    assert s.cpu.throttling_data.throttled_periods == 2
    assert s.cpu.throttling_data.throttled_time == 5000
    assert s.pids.current == 3 and s.pids.limit == 0
    by_op = {e.op: e.value for e in s.blkio.io_service_bytes_recursive}
    assert by_op["Read"] == 4096 and by_op["Write"] == 8192 and by_op["Total"] == 12288
    assert len(s.blkio.io_service_bytes_recursive) == 5  # the cgroup-wide "Total" is left out
    assert len(s.blkio.io_serviced_recursive) == 2
    assert s.hugetlb["2MB"].usage == 2097152 and s.hugetlb["2MB"].failcnt == 1
    assert v1.oom_kill_count() == 3


def test_v1_kill_all_signals_every_task(v1: CgroupV1, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    Path(v1.paths()["memory"], "cgroup.procs").write_text("11\n12\n")
    v1.kill_all(signal.SIGTERM)
    assert sent == [(11, signal.SIGTERM), (12, signal.SIGTERM)]
    assert not v1.is_frozen()


# --- v2 -------------------------------------------------------------------------------

V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids\n",
    "cgroup.subtree_control": "", "cgroup.freeze": "0\n", "cgroup.kill": "",
    "cgroup.events": "populated 1\nfrozen 0\n",
    "memory.max": "max\n", "memory.low": "0\n", "memory.swap.max": "max\n",
    "memory.current": "2097152\n", "memory.peak": "3145728\n", "memory.swap.current": "4096\n",
    "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 2\n",
    "memory.stat": "anon 1024\nfile 8192\nkernel 512\n", "memory.high": "max\n",
    "cpu.weight": "100\n", "cpu.max": "max 100000\n", "cpu.max.burst": "0\n", "cpu.idle": "0\n",
    "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n"
                "nr_throttled 1\nthrottled_usec 20\n",
    "cpuset.cpus": "", "cpuset.mems": "",
    "pids.max": "max\n", "pids.current": "2\n",
    "io.weight": "default 100\n", "io.max": "",
    "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
               "253:1 rbytes=10 wbytes=0 rios=3 wios=0\n",
    "hugetlb.2MB.max": "max\n", "hugetlb.2MB.current": "2097152\n",
    "hugetlb.2MB.events": "max 7\n",
}


@pytest.fixture
def v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupV2:
    for d in (tmp_path, tmp_path / "kata", tmp_path / "kata" / "c1"):
        _write_files(d, V2_FILES)
    # The BPF device program is tested on its own and for real (privileged tests).
    attached: list[tuple[str, int]] = []
    monkeypatch.setattr(devices_bpf, "attach",
                        lambda d, rules: attached.append((d, len(rules))))
    cg = open_cgroup("", "c1", root=str(tmp_path))
    assert isinstance(cg, CgroupV2)
    cg.attached = attached  # type: ignore[attr-defined]
    return cg


def test_v2_conversions() -> None:
    assert v2mod.cpu_shares_to_weight(2) == 1
    assert v2mod.cpu_shares_to_weight(1024) == 39
    assert v2mod.cpu_shares_to_weight(262144) == 10000
    assert v2mod.blkio_weight_to_io_weight(10) == 1
    assert v2mod.blkio_weight_to_io_weight(1000) == 10000
    assert v2mod.blkio_weight_to_io_weight(500) == 4950
    assert v2mod.memory_swap_to_v2(None, 5) is None
    assert v2mod.memory_swap_to_v2(-1, 5) == "max"
    assert v2mod.memory_swap_to_v2(300, 100) == "200"
    for swap, limit in ((50, 100), (100, None), (100, -1)):
        with pytest.raises(SpecError):
            v2mod.memory_swap_to_v2(swap, limit)


def test_v2_create_enables_controllers(v2: CgroupV2, writes: list[tuple[str, str]]) -> None:
    v2.create()
    enabled = [v for n, v in writes if n == "cgroup.subtree_control"]
    # root and /kata get every available controller, the leaf none
    assert enabled.count("+memory") == 2 and enabled.count("+pids") == 2
    assert v2.attached == [(v2.paths()[""], 11)]  # type: ignore[attr-defined]


def test_v2_apply_writes_converted_values(v2: CgroupV2) -> None:
    res = LinuxResources.from_oci({
        "memory": {"limit": 100 << 20, "swap": 150 << 20, "reservation": 50 << 20},
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "burst": 10, "idle": 0,
                "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 20},
        "blockIO": {
            "weight": 500,
            "weightDevice": [{"major": 8, "minor": 0, "weight": 1000}],
            "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}],
            "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 0}],
        },
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}],
        "unified": {"memory.high": "90000000"},
        "devices": [{"allow": False, "access": "rwm"}],
    })
    v2.apply(res)
    d = v2.paths()[""]
    assert read(d, "memory.max") == str(100 << 20)
    assert read(d, "memory.swap.max") == str(50 << 20)
    assert read(d, "memory.low") == str(50 << 20)
    assert read(d, "cpu.weight") == "39"
    assert read(d, "cpu.max") == "50000 100000"
    assert read(d, "cpu.max.burst") == "10"
    assert read(d, "cpu.idle") == "0"
    assert read(d, "cpuset.cpus") == "0-1" and read(d, "cpuset.mems") == "0"
    assert read(d, "pids.max") == "20"
    assert read(d, "io.weight") == "8:0 10000"  # last write: the per-device weight
    assert read(d, "io.max") == "8:0 wiops=max"
    assert read(d, "hugetlb.2MB.max") == "4194304"
    assert read(d, "memory.high") == "90000000"
    assert v2.attached == [(d, 12)]  # type: ignore[attr-defined]


def test_v2_quota_unlimited_and_bfq(v2: CgroupV2) -> None:
    d = v2.paths()[""]
    v2.apply(LinuxResources.from_oci({"cpu": {"quota": -1, "period": 50000}}))
    assert read(d, "cpu.max") == "max 50000"
    v2.apply(LinuxResources.from_oci({"cpu": {"quota": 20000}}))
    assert read(d, "cpu.max") == "20000"
    v2.apply(LinuxResources.from_oci({"cpu": {"period": 40000}}))
    assert read(d, "cpu.max") == "20000 40000"
    Path(d, "io.bfq.weight").write_text("100\n")
    v2.apply(LinuxResources.from_oci({"blockIO": {"weight": 300}}))
    assert read(d, "io.bfq.weight") == "300"


def test_v2_rejects_what_v2_cannot_do(v2: CgroupV2) -> None:
    with pytest.raises(HostError):
        v2.apply(LinuxResources.from_oci({"cpu": {"realtimeRuntime": 1000}}))
    with pytest.raises(SpecError) as ei:
        v2.apply(LinuxResources.from_oci({"unified": {"rdma.max": "x"}}))
    assert ei.value.field == "linux.resources.unified.rdma.max"
    with pytest.raises(SpecError):
        v2.apply(LinuxResources.from_oci({"unified": {"memory.nonexistent": "1"}}))


def test_v2_freeze_thaw_and_timeout(v2: CgroupV2, monkeypatch: pytest.MonkeyPatch) -> None:
    d = v2.paths()[""]
    Path(d, "cgroup.events").write_text("populated 1\nfrozen 1\n")
    v2.freeze()
    assert read(d, "cgroup.freeze") == "1" and v2.is_frozen()
    monkeypatch.setattr(v2mod, "FREEZE_TIMEOUT", 0.2)
    with pytest.raises(HostError):
        v2.thaw()  # events never report frozen 0
    Path(d, "cgroup.events").write_text("populated 1\nfrozen 0\n")
    with pytest.raises(HostError):
        v2.freeze()
    assert read(d, "cgroup.freeze") == "0"


def test_v2_kill_all_uses_cgroup_kill(v2: CgroupV2) -> None:
    v2.kill_all(signal.SIGKILL)
    assert read(v2.paths()[""], "cgroup.kill") == "1"


def test_v2_stats_parse_files(v2: CgroupV2) -> None:
    s = v2.stats()
    assert s.cpu.cpu_usage.total_usage == 1_500_000
    assert s.cpu.cpu_usage.usage_in_usermode == 1_000_000
    assert s.cpu.cpu_usage.usage_in_kernelmode == 500_000
    assert s.cpu.throttling_data.periods == 4 and s.cpu.throttling_data.throttled_time == 20_000
    assert s.memory.usage.usage == 2097152 and s.memory.usage.max_usage == 3145728
    assert s.memory.usage.failcnt == 5 and s.memory.usage.limit == 0
    assert s.memory.swap_usage.usage == 2097152 + 4096
    assert s.memory.cache == 8192 and s.memory.stats["anon"] == 1024
    assert s.pids.current == 2 and s.pids.limit == 0
    rd = [e for e in s.blkio.io_service_bytes_recursive if e.op == "Read"]
    assert {(e.major, e.minor, e.value) for e in rd} == {(8, 0, 4096), (253, 1, 10)}
    assert s.hugetlb["2MB"].usage == 2097152 and s.hugetlb["2MB"].failcnt == 7
    assert v2.oom_kill_count() == 2


def test_stat_parsers_tolerate_garbage() -> None:
    assert parse_blkio("8:0 Read x\nnonsense\n8:1 5\n")[0].op == ""
    assert parse_nested_keyed("8:0 a=1 b=x c\n") == {"8:0": {"a": 1}}


def test_v1_kill_all_keeps_a_paused_container_paused(
        v1: CgroupV1, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    Path(v1.paths()["memory"], "cgroup.procs").write_text("11\n")
    v1.freeze()
    v1.kill_all(signal.SIGTERM)
    assert sent == [(11, signal.SIGTERM)] and v1.is_frozen()
    v1.kill_all(signal.SIGKILL)
    assert sent[-1] == (11, signal.SIGKILL) and not v1.is_frozen()


def test_container_path_rejects_an_id_with_a_trailing_newline() -> None:
    with pytest.raises(SpecError):
        container_path("", "c1\n")
