"""Real mounts through the storage manager: tmpfs, local directories, overlay, an ext4
image on a loop device, and a real uevent from the kernel."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError, NotFoundError, SpecError
from kata_agent.storage import DeviceSpec, StorageManager, StorageSpec, uevent
from kata_agent.storage.discovery import DeviceFinder


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_under(prefix: Path) -> list[tuple[str, str, str, str]]:
    """(mount point, fstype, mount options, super options) of mounts below ``prefix``."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            target = _unescape(fields[4])
            fstype, _source, super_opts = right.split()[:3]
            if target == str(prefix) or target.startswith(str(prefix) + "/"):
                out.append((target, fstype, fields[5], super_opts))
    return out


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "run/kata-containers"
    r.mkdir(parents=True)
    yield r
    left = mounts_under(tmp_path)
    sysc = sc.Syscalls()
    for target, *_ in reversed(left):
        sysc.umount2(target, sc.MNT_DETACH)
    assert left == [], f"left mounted: {left}"


@pytest.fixture
def mgr(root: Path) -> StorageManager:
    return StorageManager(sc.Syscalls(), hotplug_timeout=5, allowed_roots=(str(root),))


def test_ephemeral_tmpfs_refcount(mgr: StorageManager, root: Path) -> None:
    mp = root / "sandbox/shm"
    spec = StorageSpec("ephemeral", "shm", str(mp), "tmpfs", ("nosuid", "nodev", "size=1m"))
    h1 = mgr.add(spec)
    h2 = mgr.add(spec)
    (m,) = mounts_under(mp)
    assert m[1] == "tmpfs" and "nosuid" in m[2] and "nodev" in m[2] and "size=1024k" in m[3]
    (mp / "f").write_text("x")
    mgr.remove(h1)
    assert len(mounts_under(mp)) == 1 and (mp / "f").read_text() == "x"
    mgr.remove(h2)
    assert mounts_under(mp) == []
    assert not mp.exists()


def test_local_dir_mode_and_owner(mgr: StorageManager, root: Path) -> None:
    mp = root / "sandbox/local/vol"
    h = mgr.add(StorageSpec("local", "local", str(mp), "",
                            ("mode=0750", "uid=1234", "fsgid=4321")))
    st = os.stat(mp)
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert mounts_under(mp) == []
    mgr.remove(h)
    assert not mp.exists()


def test_overlay_of_tmpfs_dirs(mgr: StorageManager, root: Path) -> None:
    base = root / "layers"
    hb = mgr.add(StorageSpec("ephemeral", "tmpfs", str(base), "tmpfs", ("size=4m",)))
    for d in ("lower1", "lower2", "upper", "work"):
        (base / d).mkdir()
    (base / "lower1/a").write_text("from lower1")
    (base / "lower2/a").write_text("hidden")
    (base / "lower2/b").write_text("from lower2")
    merged = root / "merged"
    ho = mgr.add(StorageSpec("overlay", "overlay", str(merged), "overlay", (
        f"lowerdir={base}/lower1:{base}/lower2", f"upperdir={base}/upper",
        f"workdir={base}/work", "nodev")))
    assert [m[1] for m in mounts_under(merged)] == ["overlay"]
    assert (merged / "a").read_text() == "from lower1"
    assert (merged / "b").read_text() == "from lower2"
    (merged / "c").write_text("new")
    assert (base / "upper/c").read_text() == "new"
    mgr.remove(ho)
    mgr.remove(hb)
    assert not merged.exists() and not base.exists()


def test_overlay_symlinked_layer_stays_inside(mgr: StorageManager, root: Path) -> None:
    os.symlink("/etc", root / "evil")
    with pytest.raises(NotFoundError) as ei:
        mgr.add(StorageSpec("overlay", "overlay", str(root / "m"), "", (
            f"lowerdir={root}/evil",)))
    assert ei.value.field == "options.lowerdir[0]"
    assert mounts_under(root) == []


@pytest.mark.parametrize("mp", ["/etc", "/proc/kata", "relative/dir", "ROOT/../escape",
                                "ROOT"])
def test_bad_mount_points_rejected(mgr: StorageManager, root: Path, mp: str) -> None:
    before = mounts_under(Path("/etc")) + mounts_under(Path("/proc"))
    with pytest.raises(SpecError) as ei:
        mgr.add(StorageSpec("ephemeral", "tmpfs", mp.replace("ROOT", str(root))))
    assert ei.value.field == "mount_point"
    assert mounts_under(Path("/etc")) + mounts_under(Path("/proc")) == before
    assert mounts_under(root.parent.parent) == []


def test_failed_mount_cleans_up(mgr: StorageManager, root: Path) -> None:
    mp = root / "shared"
    with pytest.raises(HostError):
        mgr.add(StorageSpec("9p", "no-such-tag-here", str(mp), "9p"))
    assert not mp.exists() and mounts_under(root) == []


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[str]:
    if not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("host capability missing: losetup and mkfs.ext4")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("host capability missing: /dev/loop-control")
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from ext4\n")
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(img), "8M"], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("driver", ["mmioblk", "blk"])
def test_block_image_on_loop_device(mgr: StorageManager, root: Path, loop_ext4: str,
                                    driver: str) -> None:
    mp = root / "shared/containers/c1/rootfs"
    spec = StorageSpec(driver, loop_ext4, str(mp), "ext4", ("ro", "noexec"))
    h1 = mgr.add(spec)
    h2 = mgr.add(spec)
    (m,) = mounts_under(mp)
    assert m[1] == "ext4" and m[2].split(",")[0] == "ro" and "noexec" in m[2]
    assert (mp / "hello.txt").read_text() == "hello from ext4\n"
    with pytest.raises(OSError) as ei:
        (mp / "new").write_text("x")
    assert ei.value.errno == errno.EROFS
    mgr.remove(h1)
    assert (mp / "hello.txt").exists()
    mgr.remove(h2)
    assert mounts_under(root) == []


def test_loop_source_must_be_block(mgr: StorageManager, root: Path) -> None:
    with pytest.raises(SpecError) as ei:
        mgr.add(StorageSpec("mmioblk", "/dev/null", str(root / "x"), "ext4"))
    assert ei.value.errno == errno.ENOTBLK and ei.value.field == "source"


def test_device_resolution_of_loop(mgr: StorageManager, loop_ext4: str) -> None:
    r = mgr.resolve_device(DeviceSpec("mmioblk", "/dev/xvda", vm_path=loop_ext4))
    st = os.stat(loop_ext4)
    assert (r.major, r.minor, r.path) == (os.major(st.st_rdev), os.minor(st.st_rdev),
                                          loop_ext4)
    assert r.major == 7


def test_real_uevent_is_seen(loop_ext4: str) -> None:
    name = os.path.basename(loop_ext4)
    trigger = f"/sys/block/{name}/uevent"

    def existing() -> str | None:
        # Subscribed already: ask the kernel to re-announce the device.
        with open(trigger, "w") as f:
            f.write("change")
        return None

    def match(ev: uevent.Uevent) -> str | None:
        if ev.action == "change" and ev.devname == name and ev.subsystem == "block":
            return ev.devpath
        return None

    devpath = uevent.wait_for_device(uevent.NetlinkUeventSource, what=name, timeout=10,
                                     existing=existing, match=match)
    assert devpath.endswith(f"/block/{name}")


LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81


def test_wait_node_sees_hotplugged_loop_device(tmp_path: Path) -> None:
    """A loop device created after the listener subscribed and after sysfs/dev were
    checked is found through its kernel ``add`` uevent."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("host capability missing: /dev/loop-control")
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        number = next(n for n in range(200, 250) if not os.path.exists(f"/dev/loop{n}"))
        created: list[int] = []

        class AddOnFirstReceive(uevent.NetlinkUeventSource):
            def receive(self, timeout: float) -> bytes | None:
                if not created:
                    created.append(fcntl.ioctl(ctl, LOOP_CTL_ADD, number))
                return super().receive(timeout)

        finder = DeviceFinder(hotplug_timeout=10, source_factory=AddOnFirstReceive)
        try:
            node = finder.wait_node(f"/dev/loop{number}", "vm_path")
            assert node == f"/dev/loop{number}" and created == [number]
            st = finder.block_device(node, "vm_path")
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, number)
        finally:
            if created:
                fcntl.ioctl(ctl, LOOP_CTL_REMOVE, number)
    finally:
        os.close(ctl)


FORGE = r"""
import socket, sys
from kata_agent.storage import uevent
src = uevent.NetlinkUeventSource()
tx = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, uevent.NETLINK_KOBJECT_UEVENT)
tx.bind((0, 0))
tx.sendto(b"add@/devices/virtual/block/vdz\0ACTION=add\0DEVPATH=/devices/virtual/block/vdz\0"
          b"SUBSYSTEM=block\0DEVNAME=vdz\0", (0, uevent.KERNEL_GROUP))
got = src.receive(10)
sys.exit(0 if got == b"" else 1)
"""


def test_forged_uevent_from_userspace_is_ignored() -> None:
    """Only the kernel (netlink port 0) is believed. Runs in a fresh network namespace so
    the forged event reaches nobody else."""
    if not shutil.which("unshare"):
        pytest.skip("host capability missing: unshare(1)")
    res = subprocess.run(["unshare", "--net", sys.executable, "-c", FORGE],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
