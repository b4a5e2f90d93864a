"""cgroup v2 for real. The cgroup2 hierarchy is mounted on a fresh directory so that
``open_cgroup`` sees a pure-v2 root, as in the guest. What can be checked depends on the
controllers the host delegates to cgroup2 (on a hybrid host often few or none): the core
files (procs, freeze, kill, events), the BPF device program and cpu.stat always work."""

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
from kata_agent.engine.cgroups import CgroupV2, detect, open_cgroup
from kata_agent.engine.errors import SpecError
from kata_agent.engine.resources import LinuxResources

from tests.agent_process import wait_for

PARENT = "kata-tests-v2"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[str]:
    mnt = tmp_path / "cg2"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("host capability missing: mount -t cgroup2")
    try:
        yield str(mnt)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mnt / PARENT)
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def cg(root: str) -> Iterator[CgroupV2]:
    cid = f"t{uuid.uuid4().hex[:12]}"
    c = open_cgroup(f"/{PARENT}/{cid}", cid, root=root)
    assert isinstance(c, CgroupV2)
    c.create()
    yield c
    for pid in c.procs():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: c.procs() == [])
    c.destroy()


def spawn_in(c: CgroupV2, *argv: str) -> subprocess.Popen[bytes]:
    procs = os.path.join(c.paths()[""], "cgroup.procs")
    return subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{procs}"; exec "$@"', "sh", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_detects_pure_v2(root: str) -> None:
    assert detect(root) == (2, root)


PROBE = ("import os, sys\n"
         "for p in sys.argv[1:]:\n"
         "    try:\n"
         "        os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)); print(p, 0)\n"
         "    except OSError as e:\n"
         "        print(p, e.errno)\n")


def probe_devices(c: CgroupV2) -> dict[str, int]:
    proc = spawn_in(c, sys.executable, "-c", PROBE, "/dev/null", "/dev/zero", "/dev/kmsg")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return {k: int(v) for k, v in (line.split() for line in out.decode().splitlines())}


def test_bpf_device_program(cg: CgroupV2) -> None:
    # create() installed the default policy: standard nodes only
    assert probe_devices(cg) == {"/dev/null": 0, "/dev/zero": 0, "/dev/kmsg": errno.EPERM}
    cg.apply(LinuxResources.from_oci({"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "r"}]}))
    # the update replaced the program
    assert probe_devices(cg) == {"/dev/null": 0, "/dev/zero": 0, "/dev/kmsg": 0}
    cg.apply(LinuxResources.from_oci({"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "access": "r"},
        {"allow": False, "type": "c", "major": 1, "minor": 11, "access": "r"}]}))
    # a later deny wins over an earlier allow; the standard nodes stay usable (as runc,
    # they are appended after the spec's rules)
    assert probe_devices(cg) == {"/dev/null": 0, "/dev/zero": 0, "/dev/kmsg": errno.EPERM}


def test_processes_freeze_kill_destroy(cg: CgroupV2) -> None:
    d = cg.paths()[""]
    child = spawn_in(cg, "sleep", "60")
    try:
        wait_for(lambda: child.pid in cg.procs())
        cg.freeze()
        assert cg.is_frozen()
        assert "frozen 1" in Path(d, "cgroup.events").read_text()
        cg.thaw()
        assert not cg.is_frozen()
        cg.kill_all(signal.SIGTERM)  # freeze, signal, thaw
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    child = spawn_in(cg, "sleep", "60")
    try:
        wait_for(lambda: child.pid in cg.procs())
        cg.kill_all(signal.SIGKILL)  # cgroup.kill where the kernel has it
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    wait_for(lambda: cg.procs() == [])
    s = cg.stats()
    assert s.cpu.cpu_usage.total_usage > 0  # cpu.stat is always there
    cg.destroy()
    assert not os.path.exists(d)


def test_controllers_the_host_delegates(cg: CgroupV2) -> None:
    d = cg.paths()[""]
    controllers = Path(d, "cgroup.controllers").read_text().split()
    with pytest.raises(SpecError):
        cg.apply(LinuxResources.from_oci({"unified": {"rdma.max": "mlx4_0 hca_handle=2"}}))
    if "hugetlb" not in controllers and "memory" not in controllers:
        pytest.skip("host capability missing: memory or hugetlb controller on cgroup2")
    if "hugetlb" in controllers and Path(d, "hugetlb.2MB.max").exists():
        cg.apply(LinuxResources.from_oci({
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
            "unified": {"hugetlb.2MB.rsvd.max": str(8 << 20)}}))
        assert Path(d, "hugetlb.2MB.max").read_text().strip() == str(4 << 20)
        assert Path(d, "hugetlb.2MB.rsvd.max").read_text().strip() == str(8 << 20)
        assert cg.stats().hugetlb["2MB"].usage == 0
    if "memory" in controllers:
        cg.apply(LinuxResources.from_oci({"memory": {"limit": 32 << 20}}))
        assert Path(d, "memory.max").read_text().strip() == str(32 << 20)


def test_favordynmods_set_and_put_back_on_the_real_cgroup2_root() -> None:
    from kata_agent import cgroup_tuning

    def options() -> tuple[str, ...]:
        found = cgroup_tuning.find_cgroup2(Path("/proc/self/mountinfo").read_text())
        if found is None:
            pytest.skip("host capability missing: a cgroup2 mount")
        return found.super_options

    before = options()
    if cgroup_tuning.OPTION in before:
        pytest.skip("host capability missing: a cgroup2 root without favordynmods to set")
    undo = cgroup_tuning.favor_dynamic_changes()
    if undo is None:
        pytest.skip("host capability missing: favordynmods (kernel 6.0 or later)")
    try:
        assert cgroup_tuning.OPTION in options()
    finally:
        undo()
    assert options() == before
