"""cgroup v1 for real: this host's per-controller hierarchies under /sys/fs/cgroup."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kata_agent.engine.cgroups import CgroupV1, detect, open_cgroup
from kata_agent.engine.resources import LinuxResources

from tests.agent_process import wait_for

ROOT = "/sys/fs/cgroup"
PARENT = "kata-tests-v1"


def _need_v1() -> dict[str, str]:
    try:
        version, where = detect(ROOT)
    except Exception:
        pytest.skip("host capability missing: cgroup hierarchy under /sys/fs/cgroup")
    if version != 1 or not isinstance(where, dict):
        pytest.skip("host capability missing: cgroup v1 hierarchies")
    for ctrl in ("memory", "pids", "freezer", "devices", "cpu", "cpuset"):
        if ctrl not in where:
            pytest.skip(f"host capability missing: cgroup v1 {ctrl} controller")
    return where


@pytest.fixture
def cg() -> Iterator[CgroupV1]:
    mounts = _need_v1()
    cid = f"t{uuid.uuid4().hex[:12]}"
    c = open_cgroup(f"/{PARENT}/{cid}", cid, root=ROOT)
    assert isinstance(c, CgroupV1)
    c.create()
    yield c
    for pid in c.procs():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    c.destroy()
    for m in set(mounts.values()):
        try:
            os.rmdir(os.path.join(m, PARENT))
        except OSError as e:  # another test run may still use it
            assert e.errno in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY)


def spawn_in(c: CgroupV1, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv already inside the cgroup: the shell moves itself, then execs."""
    procs = " ".join(os.path.join(d, "cgroup.procs") for d in sorted(set(c.paths().values())))
    script = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
    return subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read(d: str, name: str) -> str:
    return Path(d, name).read_text().strip()


def test_limits_process_stats_freeze_update_destroy(cg: CgroupV1) -> None:
    p = cg.paths()
    cg.apply(LinuxResources.from_oci({
        "memory": {"limit": 32 << 20, "reservation": 16 << 20},
        "pids": {"limit": 16},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
    }))
    assert read(p["memory"], "memory.limit_in_bytes") == str(32 << 20)
    assert read(p["memory"], "memory.soft_limit_in_bytes") == str(16 << 20)
    assert read(p["pids"], "pids.max") == "16"
    assert read(p["cpu"], "cpu.shares") == "512"
    assert read(p["cpu"], "cpu.cfs_quota_us") == "50000"
    assert read(p["cpuset"], "cpuset.cpus") == "0"

    child = subprocess.Popen(["sleep", "60"])
    try:
        cg.add_process(child.pid)
        assert cg.procs() == [child.pid]
        own = Path(f"/proc/{child.pid}/cgroup").read_text()
        assert f":memory:/{PARENT}/" in own and f":pids:/{PARENT}/" in own

        s = cg.stats()
        assert s.pids.current == 1 and s.pids.limit == 16
        assert s.memory.usage.limit == 32 << 20
        assert s.cpu.cpu_usage.total_usage >= 0 and len(s.cpu.cpu_usage.percpu_usage) >= 1

        cg.freeze()
        assert cg.is_frozen() and read(p["freezer"], "freezer.state") == "FROZEN"
        cg.thaw()
        assert not cg.is_frozen()

        cg.apply(LinuxResources.from_oci({"memory": {"limit": 64 << 20}, "pids": {"limit": -1}}))
        assert read(p["memory"], "memory.limit_in_bytes") == str(64 << 20)
        assert read(p["pids"], "pids.max") == "max"

        cg.kill_all(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    wait_for(lambda: cg.procs() == [])
    cg.destroy()
    assert not any(os.path.exists(d) for d in p.values())


FORKER = """
import os, signal, sys
ok = failed = 0
for _ in range(8):
    try:
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        ok += 1
    except BlockingIOError:  # EAGAIN: the pids controller said no
        failed += 1
print(ok, failed, flush=True)
signal.pause()
"""


def test_pids_limit_stops_forks(cg: CgroupV1) -> None:
    cg.apply(LinuxResources.from_oci({"pids": {"limit": 4}}))
    proc = spawn_in(cg, sys.executable, "-c", FORKER)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"3 5\n"  # the forker and three children fit
        assert cg.stats().pids.current == 4
    finally:
        cg.kill_all(signal.SIGKILL)
        proc.wait(timeout=10)


def test_memory_limit_triggers_oom_kill(cg: CgroupV1) -> None:
    has_swap = os.path.exists(os.path.join(cg.paths()["memory"], "memory.memsw.limit_in_bytes"))
    mem: dict[str, int] = {"limit": 32 << 20}
    if has_swap:
        mem["swap"] = 32 << 20
    cg.apply(LinuxResources.from_oci({"memory": mem}))
    proc = spawn_in(cg, sys.executable, "-c", "b = b'x' * (256 << 20)")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert cg.oom_kill_count() >= 1
    s = cg.stats()
    assert s.memory.usage.max_usage > (30 << 20)  # it ran into the limit
    assert s.memory.usage.usage < (32 << 20)


def test_device_policy(cg: CgroupV1) -> None:
    probe = ("import os, sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n"
             "        os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)); print(p, 0)\n"
             "    except OSError as e:\n"
             "        print(p, e.errno)\n")

    def probe_devices() -> dict[str, int]:
        proc = spawn_in(cg, sys.executable, "-c", probe, "/dev/null", "/dev/kmsg")
        out, _ = proc.communicate(timeout=60)
        return {k: int(v) for k, v in (line.split() for line in out.decode().splitlines())}

    assert probe_devices() == {"/dev/null": 0, "/dev/kmsg": errno.EPERM}
    cg.apply(LinuxResources.from_oci({"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "r"}]}))
    assert "c 1:11 r" in read(cg.paths()["devices"], "devices.list")
    assert probe_devices() == {"/dev/null": 0, "/dev/kmsg": 0}


def test_block_io_throttle_and_cpu_extras(cg: CgroupV1) -> None:
    devs = sorted(Path("/sys/block").glob("vd*")) + sorted(Path("/sys/block").glob("sd*"))
    if not devs:
        pytest.skip("host capability missing: a virtio or SCSI block device")
    major, minor = (int(x) for x in (devs[0] / "dev").read_text().split(":"))
    cg.apply(LinuxResources.from_oci({
        "blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}],
                    "throttleWriteIOPSDevice": [{"major": major, "minor": minor,
                                                 "rate": 100}]},
        "cpu": {"idle": 1, "burst": 1000, "quota": 20000, "period": 100000}}))
    blk = cg.paths()["blkio"]
    assert read(blk, "blkio.throttle.read_bps_device") == f"{major}:{minor} {1 << 20}"
    assert read(blk, "blkio.throttle.write_iops_device") == f"{major}:{minor} 100"
    cpu = cg.paths()["cpu"]
    assert read(cpu, "cpu.idle") == "1"
    assert read(cpu, "cpu.cfs_burst_us") == "1000"
    # removing the throttle again: rate 0
    cg.apply(LinuxResources.from_oci({"blockIO": {"throttleReadBpsDevice": [
        {"major": major, "minor": minor, "rate": 0}]}}))
    assert read(blk, "blkio.throttle.read_bps_device") == ""
