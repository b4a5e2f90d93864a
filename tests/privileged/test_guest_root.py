"""Guest operations that need root: the real /dev/random ioctl, clock permission, ownership."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from kata_agent.guest import CopyFileRequest, GuestDetailsRequest, GuestOps, OnlineCPUMemRequest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child that first enters a new user namespace: it keeps every capability inside
# that namespace and none in the initial one, which is where CAP_SYS_TIME and
# CAP_SYS_ADMIN (RNDRESEEDCRNG) are checked.
_IN_USERNS = """
import sys, time
from kata_agent.engine.syscalls import CLONE_NEWUSER, Syscalls
from kata_agent.engine.errors import HostError
from kata_agent.guest import GuestOps
try:
    Syscalls().unshare(CLONE_NEWUSER)
except OSError as err:
    print("unshare", err.errno)
    sys.exit(3)
ops = GuestOps()
try:
    {call}
except HostError as err:
    print("errno", err.errno, str(err).split(" ")[0])
    sys.exit(0)
print("succeeded")
"""


def _in_userns(call: str) -> str:
    out = subprocess.run([sys.executable, "-c", _IN_USERNS.format(call=call)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode == 3:
        pytest.skip(f"host capability missing: unprivileged user namespaces ({out.stdout})")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_reseed_random_dev_as_root() -> None:
    # Writes mix into the pool without crediting entropy; the ioctl reseeds the CRNG.
    GuestOps().reseed_random_dev(os.urandom(256))


def test_reseed_issues_the_ioctl() -> None:
    # Without CAP_SYS_ADMIN the write still succeeds and the ioctl is refused: proof that
    # the ioctl is made on the real device.
    out = _in_userns("ops.reseed_random_dev(b'0123456789abcdef')")
    assert out == f"errno {errno.EPERM} reseed"


def test_set_guest_datetime_reaches_clock_settime() -> None:
    # The real syscall without changing the host clock: the value is "now" and the kernel
    # refuses it for lack of CAP_SYS_TIME in the initial user namespace.
    call = "t = time.time_ns(); ops.set_guest_datetime(t // 10**9, (t // 1000) % 10**6)"
    assert _in_userns(call) == f"errno {errno.EPERM} set"


def test_copy_file_owner_and_mode_as_root(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    ops = GuestOps(shared_dir=root)
    ops.copy_file(CopyFileRequest(path=f"{root}/sbx/etc/hosts", file_size=5, file_mode=0o4755,
                                  dir_mode=0o700, uid=1234, gid=5678, offset=0, data=b"hosts"))
    st = os.stat(root / "sbx/etc/hosts")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o755  # setuid masked off
    assert (root / "sbx/etc/hosts").read_bytes() == b"hosts"


def test_real_sysfs_details_and_memory_onlining() -> None:
    memory = Path("/sys/devices/system/memory")
    if not (memory / "block_size_bytes").exists():
        pytest.skip("host capability missing: memory hotplug sysfs (block_size_bytes)")
    ops = GuestOps(online_max_tries=1)
    details = ops.guest_details(GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True))
    assert details.mem_block_size_bytes == int((memory / "block_size_bytes").read_text(), 16)
    assert details.mem_block_size_bytes > 0
    assert details.support_mem_hotplug_probe == (
        (memory / "probe").exists() and not ops._acpi_memory_hotplug())
    blocks = [b / "online" for b in memory.glob("memory[0-9]*") if (b / "online").exists()]
    if any(b.read_text().strip() == "0" for b in blocks):
        pytest.skip("host has offline memory blocks: this test does not change host state")
    # A walk over the real tree: every block is online, nothing is written.
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=0, cpu_only=False))
    for block in memory.glob("memory[0-9]*"):
        if (block / "online").exists():
            assert (block / "online").read_text().strip() == "1", block
    assert ops.online_cpus() == Path("/sys/devices/system/cpu/online").read_text().strip()
