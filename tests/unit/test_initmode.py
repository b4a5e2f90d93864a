"""Agent as PID 1: mount order through a recording fake, the reaper registry, power-off.

The reaper is also exercised for real (fork, orphans, a subreaper) in a separate
interpreter, so it never collects children of the test runner itself.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from kata_agent import initmode

PROC_CGROUPS = """#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t0\t1\t1
cpu\t0\t1\t1
memory\t0\t1\t1
rdma\t0\t1\t0
pids\t0\t1\t1
"""


class FakeSyscalls:
    """Records calls; models which paths exist and which mounts the kernel already made."""

    def __init__(self, *, premounted: tuple[str, ...] = (), readonly_root: bool = False,
                 cmdline: str = "console=ttyS0", fail_mount: str = "") -> None:
        self.calls: list[tuple[object, ...]] = []
        self.existing = {"/proc", "/sys", "/dev", "/run", "/tmp"}
        self.premounted = premounted
        self.readonly_root = readonly_root
        self.cmdline = cmdline
        self.fail_mount = fail_mount
        self.children: list[tuple[int, int]] = []

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        if target == self.fail_mount:
            raise OSError(19, "No such device")
        self.calls.append(("mount", fstype, target, flags, data))

    def mkdir(self, path: str, mode: int) -> None:
        if path in self.existing:
            raise FileExistsError(path)
        self.existing.add(path)
        self.calls.append(("mkdir", path))

    def symlink(self, target: str, link: str) -> None:
        self.calls.append(("symlink", target, link))

    def read_text(self, path: str) -> str:
        if path == "/proc/self/mountinfo":
            lines = ["1 0 0:1 / / rw - rootfs rootfs rw"]
            lines += [f"2 1 0:2 / {t} rw - x x rw" for t in self.premounted]
            return "\n".join(lines) + "\n"
        if path == "/proc/cgroups":
            return PROC_CGROUPS
        if path == "/proc/cmdline":
            return self.cmdline
        raise FileNotFoundError(path)

    def is_readonly(self, path: str) -> bool:
        return self.readonly_root

    def sync(self) -> None:
        self.calls.append(("sync",))

    def reboot(self, command: int) -> None:
        self.calls.append(("reboot", command))

    def waitpid_any(self) -> tuple[int, int]:
        if not self.children:
            raise ChildProcessError(10, "No child processes")
        return self.children.pop(0)

    def getpid(self) -> int:
        return 1

    def mounted(self) -> list[tuple[str, str]]:
        return [(str(c[1]), str(c[2])) for c in self.calls if c[0] == "mount"]


def test_mount_order_hybrid_cgroups() -> None:
    fake = FakeSyscalls()
    initmode.setup_pid1(fake, start_reaper=False)
    assert fake.mounted() == [
        ("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev"), ("devpts", "/dev/pts"),
        ("tmpfs", "/dev/shm"), ("tmpfs", "/run"), ("tmpfs", "/sys/fs/cgroup"),
        ("cgroup", "/sys/fs/cgroup/cpuset"), ("cgroup", "/sys/fs/cgroup/cpu"),
        ("cgroup", "/sys/fs/cgroup/memory"), ("cgroup", "/sys/fs/cgroup/pids"),
        ("cgroup2", "/sys/fs/cgroup/unified"),
    ]
    # Directories are created before mounting on them, existing ones are left alone.
    assert ("mkdir", "/dev/pts") in fake.calls
    assert fake.calls.index(("mkdir", "/dev/pts")) < fake.calls.index(
        next(c for c in fake.calls if c[0] == "mount" and c[2] == "/dev/pts"))
    assert ("mkdir", "/proc") not in fake.calls
    memory = next(c for c in fake.calls if c[0] == "mount" and c[2] == "/sys/fs/cgroup/memory")
    assert memory[4] == "memory"
    proc = next(c for c in fake.calls if c[0] == "mount" and c[2] == "/proc")
    assert isinstance(proc[3], int)
    assert proc[3] & initmode.MS_NOSUID and proc[3] & initmode.MS_NOEXEC
    links = [c[1:] for c in fake.calls if c[0] == "symlink"]
    assert ("/proc/self/fd", "/dev/fd") in links
    assert ("/proc/self/fd/2", "/dev/stderr") in links
    assert not [c for c in fake.calls if c[0] == "reboot"]


def test_unified_cgroups_from_kernel_cmdline() -> None:
    fake = FakeSyscalls(cmdline="console=ttyS0 agent.unified_cgroup_hierarchy=1")
    initmode.setup_pid1(fake, start_reaper=False)
    cgroup = [m for m in fake.mounted() if "cgroup" in m[1]]
    assert cgroup == [("cgroup2", "/sys/fs/cgroup")]


def test_premounted_dev_is_not_mounted_again_and_ro_root_gets_tmp() -> None:
    fake = FakeSyscalls(premounted=("/dev",), readonly_root=True)
    initmode.setup_pid1(fake, unified_cgroups=True, start_reaper=False)
    targets = [t for _, t in fake.mounted()]
    assert "/dev" not in targets
    assert "/dev/pts" in targets
    assert "/tmp" in targets


def test_essential_mount_failure_powers_off() -> None:
    fake = FakeSyscalls(fail_mount="/sys")
    with pytest.raises(SystemExit):
        initmode.setup_pid1(fake, start_reaper=False)
    assert fake.calls[-2:] == [("sync",), ("reboot", initmode.RB_POWER_OFF)]
    assert ("sysfs", "/sys") not in fake.mounted()


def test_optional_cgroup_failure_is_tolerated() -> None:
    fake = FakeSyscalls(fail_mount="/sys/fs/cgroup/memory")
    initmode.setup_pid1(fake, start_reaper=False)
    assert ("cgroup", "/sys/fs/cgroup/pids") in fake.mounted()
    assert not [c for c in fake.calls if c[0] == "reboot"]


def test_run_as_init_powers_off_on_return_and_on_exception() -> None:
    fake = FakeSyscalls()
    with pytest.raises(SystemExit):
        initmode.run_as_init(lambda: 0, fake)
    assert fake.calls == [("sync",), ("reboot", initmode.RB_POWER_OFF)]

    def boom() -> int:
        raise RuntimeError("no channel")

    fake = FakeSyscalls()
    with pytest.raises(SystemExit):
        initmode.run_as_init(boom, fake)
    assert fake.calls[-1] == ("reboot", initmode.RB_POWER_OFF)


def test_v1_controllers_only_enabled() -> None:
    assert initmode.v1_controllers(PROC_CGROUPS) == ["cpuset", "cpu", "memory", "pids"]


def test_is_pid1_uses_syscalls() -> None:
    assert initmode.is_pid1(FakeSyscalls())
    assert not initmode.is_pid1()  # the test runner is not PID 1


def test_reaper_keeps_registered_status_and_files_orphans() -> None:
    fake = FakeSyscalls()
    reaper = initmode.Reaper()
    reaper._syscalls = fake  # drive reap_once by hand: no thread
    reaper.register(100)
    fake.children = [(200, 9), (100, 3 << 8)]
    assert reaper.reap_once() and reaper.reap_once()
    assert not reaper.reap_once()  # no children left
    assert reaper.wait(100, timeout=0) == 3 << 8
    assert reaper.reaped_orphans == 1
    with pytest.raises(ValueError):
        reaper.wait(100, timeout=0)  # a status is handed out once


def test_reaper_status_before_registration_is_kept() -> None:
    reaper = initmode.Reaper()
    reaper.record(300, 0)  # the child exited before its owner registered it
    reaper.register(300)
    assert reaper.wait(300, timeout=0) == 0


def test_reaper_wait_times_out_for_running_child() -> None:
    reaper = initmode.Reaper()
    reaper.register(400)
    assert reaper.wait(400, timeout=0.01) is None
    reaper.unregister(400)
    with pytest.raises(ValueError):
        reaper.wait(400, timeout=0)


def test_unclaimed_statuses_are_bounded() -> None:
    reaper = initmode.Reaper()
    for pid in range(initmode.UNCLAIMED_LIMIT + 10):
        reaper.record(pid + 1, 0)
    reaper.register(1)  # the oldest was dropped
    assert reaper.wait(1, timeout=0) is None


REAL_REAPER = textwrap.dedent("""
    import os, sys, prctl
    from kata_agent import initmode
    prctl.set_child_subreaper(True)  # orphans come to us, as they would to PID 1
    r = initmode.Reaper()
    r.start()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    r.register(pid)
    status = r.wait(pid, timeout=30)
    assert status is not None and os.waitstatus_to_exitcode(status) == 7, status
    # A grandchild orphaned by its parent is reaped without anyone registering it.
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os._exit(0)
        os._exit(0)
    r.register(middle)
    assert r.wait(middle, timeout=30) == 0
    import time
    deadline = time.monotonic() + 30
    while r.reaped_orphans < 1 and time.monotonic() < deadline:
        r._wake.set()
        with r._cond:
            r._cond.wait(0.05)
    assert r.reaped_orphans == 1, r.reaped_orphans
    # The reaper did not steal: a direct waitpid finds nothing left to collect.
    try:
        os.waitpid(-1, os.WNOHANG)
        raise AssertionError("a child was left unreaped")
    except ChildProcessError:
        pass
    print("REAPER-OK")
""")


def test_real_reaper_in_separate_process() -> None:
    pytest.importorskip("prctl")
    proc = subprocess.run([sys.executable, "-c", REAL_REAPER], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "REAPER-OK" in proc.stdout


def test_libc_layer_raises_oserror_with_errno() -> None:
    real = initmode.LibcSyscalls()
    with pytest.raises(OSError) as info:
        real.mount("none", "/nonexistent-kata-init-target", "nosuchfs-kata", 0, "")
    assert info.value.errno in (errno.EPERM, errno.ENODEV, errno.ENOENT)
    assert real.getpid() == os.getpid()
    assert real.is_readonly("/proc/self") in (True, False)
    assert "Name:" in real.read_text("/proc/self/status")
