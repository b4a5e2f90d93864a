"""Rootfs setup with the syscall layer recording instead of mounting."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from kata_agent.engine import mounts
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.spec import Device, Mount


class FakeSyscalls(sc.Syscalls):
    """Records calls; /proc/self/fd/N arguments are resolved to the path they name."""

    def __init__(self, *, pivot_errno: int = 0, fs_type: int = 0) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.pivot_errno = pivot_errno
        self.fs_type = fs_type

    @staticmethod
    def _res(p: str | None) -> str | None:
        if p is not None and p.startswith("/proc/self/fd/"):
            return os.readlink(p)
        return p

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        self.calls.append(("mount", self._res(source), self._res(target), fstype, flags,
                           data or ""))

    def umount2(self, target: str, flags: int) -> None:
        self.calls.append(("umount2", target, flags))

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self.calls.append(("pivot_root", new_root, put_old))
        if self.pivot_errno:
            raise OSError(self.pivot_errno, "pivot_root")

    def chroot(self, path: str) -> None:
        self.calls.append(("chroot", path, os.getcwd()))

    def fstatfs_type(self, fd: int) -> int:
        return self.fs_type

    def mounts(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "mount"]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    (r / "bin").mkdir(parents=True)
    return r


def _mount_all(fake: FakeSyscalls, root: Path, ms: list[Mount], **kw: Any) -> None:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        mounts.mount_all(fake, fd, ms, cgroup_paths=kw.get("cgroup_paths", {}),
                         cgroup_version=kw.get("cgroup_version", 1),
                         in_user_ns=kw.get("in_user_ns", False))
    finally:
        os.close(fd)


def test_option_parsing() -> None:
    o = mounts.MountOptions.parse(["ro", "nosuid", "rw", "noexec", "rslave", "mode=755",
                                   "size=1k"])
    assert o.flags == sc.MS_NOSUID | sc.MS_NOEXEC
    assert o.propagation == (sc.MS_SLAVE | sc.MS_REC,)
    assert o.data == "mode=755,size=1k"
    assert mounts.MountOptions.parse(["rbind", "ro"]).flags == sc.MS_BIND | sc.MS_REC | \
        sc.MS_RDONLY


def test_mounts_in_spec_order_onto_rootfs_paths(rootfs: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("x")
    hostdir = tmp_path / "data"
    hostdir.mkdir()
    ms = [
        Mount("/proc", "proc", "proc"),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "mode=755")),
        Mount("/etc/hosts", "bind", str(hostfile), ("bind", "ro")),
        Mount("/data", "bind", str(hostdir), ("rbind", "rprivate")),
    ]
    fake = FakeSyscalls()
    _mount_all(fake, rootfs, ms)
    got = fake.mounts()
    assert got[0] == ("mount", "proc", str(rootfs / "proc"), "proc", 0, "")
    assert got[1] == ("mount", "tmpfs", str(rootfs / "dev"), "tmpfs", sc.MS_NOSUID, "mode=755")
    assert got[2][1:5] == (str(hostfile), str(rootfs / "etc" / "hosts"), None, sc.MS_BIND)
    assert got[3][2] == str(rootfs / "etc" / "hosts")
    assert got[3][4] & (sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND) == \
        sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND
    assert got[4][1:5] == (str(hostdir), str(rootfs / "data"), None, sc.MS_BIND | sc.MS_REC)
    assert got[5] == ("mount", None, str(rootfs / "data"), None, sc.MS_PRIVATE | sc.MS_REC, "")
    assert len(got) == 6
    assert (rootfs / "etc" / "hosts").is_file() and (rootfs / "data").is_dir()


def test_mount_target_symlink_cannot_escape(rootfs: Path, tmp_path: Path) -> None:
    host = tmp_path / "hostdir"
    host.mkdir()
    os.symlink(str(host), rootfs / "evil")
    os.symlink("../../../../..", rootfs / "up")
    fake = FakeSyscalls()
    _mount_all(fake, rootfs, [Mount("/evil", "tmpfs", "tmpfs"),
                              Mount("/up/x", "tmpfs", "tmpfs")])
    targets = [c[2] for c in fake.mounts()]
    assert targets == [str(rootfs) + str(host), str(rootfs / "x")]
    assert list(host.iterdir()) == []


@pytest.mark.parametrize(("dest", "mtype"), [("/proc", "tmpfs"), ("/proc/sys", "tmpfs"),
                                             ("/proc/self", "bind")])
def test_nothing_but_procfs_over_proc(rootfs: Path, dest: str, mtype: str) -> None:
    fake = FakeSyscalls()
    with pytest.raises(SpecError) as ei:
        _mount_all(fake, rootfs, [Mount("/tmp", "tmpfs", "tmpfs"),
                                  Mount(dest, mtype, "/tmp", ("bind",) if mtype == "bind"
                                        else ())])
    assert ei.value.field == "mounts[1].destination"
    assert len(fake.mounts()) == 1


def test_missing_bind_source_names_field(rootfs: Path) -> None:
    with pytest.raises(SpecError) as ei:
        _mount_all(FakeSyscalls(), rootfs, [Mount("/x", "bind", "/no/such/dir", ("bind",))])
    assert ei.value.field == "mounts[0].source"


def test_cgroup_v1_is_tmpfs_with_controller_binds(rootfs: Path, tmp_path: Path) -> None:
    cpu = tmp_path / "cg" / "cpu"
    cpu.mkdir(parents=True)
    fake = FakeSyscalls()
    _mount_all(fake, rootfs, [Mount("/sys/fs/cgroup", "cgroup", "cgroup", ("ro", "nosuid"))],
               cgroup_paths={"cpu": str(cpu)}, cgroup_version=1)
    got = fake.mounts()
    assert got[0][3] == "tmpfs" and got[0][2] == str(rootfs / "sys/fs/cgroup")
    assert got[1][1:3] == (str(cpu), str(rootfs / "sys/fs/cgroup/cpu"))
    assert got[-1][4] & sc.MS_RDONLY


def test_cgroup_v2_mounts_cgroup2(rootfs: Path) -> None:
    fake = FakeSyscalls()
    _mount_all(fake, rootfs, [Mount("/sys/fs/cgroup", "cgroup", "cgroup")], cgroup_version=2)
    assert [c[3] for c in fake.mounts()] == ["cgroup2"]


def test_devices_in_user_ns_are_bind_mounts(rootfs: Path) -> None:
    fake = FakeSyscalls()
    fd = os.open(rootfs, os.O_PATH)
    try:
        mounts.create_devices(fake, fd, [Device("/dev/fuse", "c", 10, 229)], defaults=True,
                              in_user_ns=True)
    finally:
        os.close(fd)
    sources = [c[1] for c in fake.mounts()]
    assert sources == ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                       "/dev/tty", "/dev/fuse"]
    assert fake.mounts()[0][2] == str(rootfs / "dev" / "null")
    assert os.readlink(rootfs / "dev" / "ptmx") == "pts/ptmx"
    assert os.readlink(rootfs / "dev" / "fd") == "/proc/self/fd"
    assert os.readlink(rootfs / "dev" / "stderr") == "/proc/self/fd/2"


def test_masking_refuses_a_fake_dev_null(rootfs: Path) -> None:
    (rootfs / "dev").mkdir()
    (rootfs / "dev" / "null").write_text("not a device")
    (rootfs / "secret").write_text("s")
    fake = FakeSyscalls()
    fd = os.open(rootfs, os.O_PATH)
    try:
        with pytest.raises(HostError, match="not the null device"):
            mounts.masked_paths(fake, fd, ["/secret"])
    finally:
        os.close(fd)
    assert fake.mounts() == []


def test_readonly_paths_bind_then_remount(rootfs: Path) -> None:
    (rootfs / "ro").mkdir()
    fake = FakeSyscalls()
    fd = os.open(rootfs, os.O_PATH)
    try:
        mounts.readonly_paths(fake, fd, ["/ro", "/missing"])
    finally:
        os.close(fd)
    got = fake.mounts()
    assert len(got) == 2
    assert got[0][1:3] == (str(rootfs / "ro"), str(rootfs / "ro"))
    assert got[1][4] & (sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND) == \
        sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND


def test_sysctls_only_through_procfs(rootfs: Path) -> None:
    knob = rootfs / "proc" / "sys" / "kernel" / "shmmax"
    knob.parent.mkdir(parents=True)
    knob.write_text("0")
    fd = os.open(rootfs, os.O_PATH)
    try:
        with pytest.raises(HostError, match="not on procfs"):
            mounts.apply_sysctls(FakeSyscalls(fs_type=0xEF53), fd, {"kernel.shmmax": "5"})
        assert knob.read_text() == "0"
        mounts.apply_sysctls(FakeSyscalls(fs_type=mounts.PROC_SUPER_MAGIC), fd,
                             {"kernel.shmmax": "5"})
        assert knob.read_text() == "5"
    finally:
        os.close(fd)


@pytest.mark.parametrize(("prop", "flags"), [("", sc.MS_SLAVE | sc.MS_REC),
                                             ("private", sc.MS_PRIVATE),
                                             ("rshared", sc.MS_SHARED | sc.MS_REC)])
def test_prepare_root_propagation(rootfs: Path, prop: str, flags: int) -> None:
    fake = FakeSyscalls()
    mounts.prepare_root(fake, str(rootfs), prop)
    got = fake.mounts()
    assert got[0] == ("mount", None, "/", None, flags, "")
    assert got[-1] == ("mount", str(rootfs), str(rootfs), None, sc.MS_BIND | sc.MS_REC, "")
    if flags & sc.MS_SHARED:
        assert got[1][4] == sc.MS_SLAVE | sc.MS_REC


def test_switch_root_pivots_and_detaches(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    fake = FakeSyscalls()
    mounts.switch_root(fake, str(rootfs), no_pivot=False)
    names = [c[0] for c in fake.calls]
    assert names == ["pivot_root", "mount", "umount2"]
    assert fake.calls[0] == ("pivot_root", ".", ".")
    assert fake.calls[2] == ("umount2", ".", sc.MNT_DETACH)


def test_switch_root_falls_back_to_move_on_initramfs(rootfs: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    fake = FakeSyscalls(pivot_errno=errno.EINVAL)
    mounts.switch_root(fake, str(rootfs), no_pivot=False)
    assert [c[0] for c in fake.calls] == ["pivot_root", "mount", "chroot"]
    assert fake.calls[1][2:5] == ("/", None, sc.MS_MOVE)
    assert fake.calls[1][1] == "."
    assert fake.calls[2] == ("chroot", ".", str(rootfs))  # moved and chrooted from inside


def test_switch_root_other_errors_fail(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    with pytest.raises(HostError) as ei:
        mounts.switch_root(FakeSyscalls(pivot_errno=errno.EPERM), str(rootfs), no_pivot=False)
    assert ei.value.errno == errno.EPERM


def test_device_modes() -> None:
    assert stat.S_ISCHR(stat.S_IFCHR | 0o666)
    assert mounts.needs_default_devices([Mount("/dev", "tmpfs", "tmpfs")])
    assert not mounts.needs_default_devices([Mount("/dev", "bind", "/dev", ("rbind",))])


def test_symlink_to_proc_cannot_hide_a_mount(rootfs: Path) -> None:
    (rootfs / "proc").mkdir()
    os.symlink("/proc", rootfs / "myproc")
    fake = FakeSyscalls()
    with pytest.raises(SpecError) as ei:
        _mount_all(fake, rootfs, [Mount("/myproc", "tmpfs", "tmpfs")])
    assert ei.value.field == "mounts[0].destination"
    assert fake.mounts() == []


@pytest.mark.parametrize("key", ["net.x//..//..//sysrq-trigger", "net..x", "net.", "net.x/."])
def test_sysctl_keys_cannot_walk(rootfs: Path, key: str) -> None:
    fd = os.open(rootfs, os.O_PATH)
    try:
        with pytest.raises(SpecError) as ei:
            mounts.apply_sysctls(FakeSyscalls(fs_type=mounts.PROC_SUPER_MAGIC), fd, {key: "1"})
    finally:
        os.close(fd)
    assert ei.value.field == f"linux.sysctl.{key}"


def test_sysctl_slash_means_dot() -> None:
    from kata_agent.engine.spec import sysctl_path

    assert sysctl_path("net.ipv4.conf.eth0/100.forwarding") == \
        "net/ipv4/conf/eth0.100/forwarding"
