"""Storage manager, drivers and option parsing with a recording syscall layer."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import AlreadyExistsError, HostError, NotFoundError, SpecError
from kata_agent.protocol import agent_pb2
from kata_agent.service.storage import devices_from_pb, storages_from_pb
from kata_agent.storage import DRIVERS, StorageManager, StorageSpec
from kata_agent.storage.discovery import DeviceFinder
from kata_agent.storage.options import check_abs_path, parse_mount_options, root_of

_FD_RE = re.compile(r"/proc/self/fd/(\d+)")


def _real(path: str) -> str:
    return _FD_RE.sub(lambda m: os.readlink(m.group(0)), path)


class RecordingSyscalls:
    """Records mount/umount2 with /proc/self/fd/N names turned into the real paths."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_mount: OSError | None = None

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        if self.fail_mount:
            raise self.fail_mount
        self.calls.append(("mount", source, _real(target), fstype, flags,
                           _real(data) if data else data))

    def umount2(self, target: str, flags: int) -> None:
        self.calls.append(("umount2", _real(target), flags))


class FakeBlockFinder(DeviceFinder):
    """Everything real except that any node counts as a block device 254:N."""

    def block_device(self, node: str, field: str) -> os.stat_result:
        return os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 1, 0, 0, 0, 0, 0, 0))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "run/kata-containers"
    r.mkdir(parents=True)
    return r


@pytest.fixture
def fake() -> RecordingSyscalls:
    return RecordingSyscalls()


def manager(fake: RecordingSyscalls, root: Path, **kw: Any) -> StorageManager:
    m = StorageManager(fake, hotplug_timeout=0.1, allowed_roots=(str(root),),  # type: ignore[arg-type]
                       sys_root=str(root.parent / "sys"), dev_root=str(root.parent / "dev"),
                       arch="x86_64", **kw)
    return m


def with_fake_finder(m: StorageManager) -> StorageManager:
    f = m.finder
    ff = FakeBlockFinder(sys_root=f.sys_root, dev_root=f.dev_root, hotplug_timeout=0.1,
                         source_factory=f.source_factory, arch=f.arch)
    m.finder = ff
    object.__setattr__(m._ctx, "finder", ff)
    return m


# -- option parsing ----------------------------------------------------------------------

def test_parse_mount_options_flags_and_data() -> None:
    flags, prop, data = parse_mount_options(
        ["ro", "nosuid", "nodev", "noexec", "sync", "dirsync", "mand", "noatime", "nodiratime",
         "relatime", "strictatime", "size=64m", "rslave", "mode=1777"])
    want = (sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_SYNCHRONOUS
            | sc.MS_DIRSYNC | sc.MS_MANDLOCK | sc.MS_NOATIME | sc.MS_NODIRATIME
            | sc.MS_RELATIME | sc.MS_STRICTATIME)
    assert flags == want
    assert prop == sc.MS_SLAVE | sc.MS_REC
    assert data == ["size=64m", "mode=1777"]


def test_parse_mount_options_splits_joined_words() -> None:
    flags, prop, data = parse_mount_options(["trans=virtio,version=9p2000.L,cache=mmap",
                                             "nodev,ro,,rprivate"])
    assert flags == sc.MS_NODEV | sc.MS_RDONLY
    assert prop == sc.MS_PRIVATE | sc.MS_REC
    assert data == ["trans=virtio", "version=9p2000.L", "cache=mmap"]


def test_parse_mount_options_rw_clears_ro_and_bind_words() -> None:
    assert parse_mount_options(["ro", "rw"])[0] == 0
    assert parse_mount_options(["rbind"])[0] == sc.MS_BIND | sc.MS_REC
    assert parse_mount_options(["private", "unbindable"])[1] == sc.MS_PRIVATE | sc.MS_UNBINDABLE


def test_parse_mount_options_errors_name_the_field() -> None:
    with pytest.raises(SpecError) as ei:
        parse_mount_options(["ro"] * 65)
    assert ei.value.field == "options"
    with pytest.raises(SpecError) as ei:
        parse_mount_options(["a\0b"])
    assert ei.value.field == "options[0]"


@pytest.mark.parametrize("path", ["relative/x", "/a/../b", "/a//b", "/a/", "/a/./b", "", "/.."])
def test_check_abs_path_rejects(path: str) -> None:
    with pytest.raises(SpecError) as ei:
        check_abs_path(path, "mount_point")
    assert ei.value.field == "mount_point"


@pytest.mark.parametrize("path", ["/etc", "/proc/x", "/run/kata-containers",
                                  "/run/kata-containersX/a", "/run", "/"])
def test_root_of_rejects_outside(path: str) -> None:
    with pytest.raises(SpecError) as ei:
        root_of(path, ("/run/kata-containers",), "mount_point")
    assert ei.value.field == "mount_point"


def test_root_of_accepts_inside() -> None:
    assert root_of("/run/kata-containers/shared/containers", ("/x", "/run/kata-containers"),
                   "mount_point") == ("/run/kata-containers", "shared/containers")


# -- manager: dispatch and refcounting ---------------------------------------------------

def test_handlers_list(fake: RecordingSyscalls, root: Path) -> None:
    names = manager(fake, root).handlers()
    assert {"9p", "virtio-fs", "blk", "mmioblk", "scsi", "nvdimm", "ephemeral", "local",
            "overlay", "overlayfs"} <= set(names)
    assert "blk-ccw" not in names
    s390 = StorageManager(fake, hotplug_timeout=1, allowed_roots=(str(root),),  # type: ignore[arg-type]
                          arch="s390x")
    assert "blk-ccw" in s390.handlers()
    assert set(DRIVERS) == set(s390.handlers())


def test_unknown_driver(fake: RecordingSyscalls, root: Path) -> None:
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("nfs", "x", str(root / "a")))
    assert ei.value.field == "driver"


@pytest.mark.parametrize("mp", ["/etc", "relative", "/etc/../run", "ROOT/../../etc", "ROOT",
                                "ROOT/", "ROOT//", "ROOT/a//", "/etc/"])
def test_bad_mount_points_never_mount(fake: RecordingSyscalls, root: Path, mp: str) -> None:
    mp = mp.replace("ROOT", str(root))
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("ephemeral", "tmpfs", mp))
    assert ei.value.field == "mount_point"
    assert fake.calls == []


def test_ephemeral_refcount(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    mp = str(root / "sandbox/shm")
    spec = StorageSpec("ephemeral", "shm", mp, "tmpfs", ("nosuid", "nodev", "size=65536k"))
    h1 = m.add(spec)
    h2 = m.add(spec)
    assert fake.calls == [("mount", "shm", mp, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                           "size=65536k")]
    assert m.users(mp) == 2
    m.remove(h1)
    assert len(fake.calls) == 1 and os.path.isdir(mp)
    m.remove(h2)
    assert fake.calls[1] == ("umount2", mp, sc.UMOUNT_NOFOLLOW)
    assert not os.path.exists(mp)  # we created it, so it goes
    assert m.users(mp) == 0
    with pytest.raises(NotFoundError):
        m.remove(h2)


def test_same_mount_point_other_storage_conflicts(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    mp = str(root / "a")
    m.add(StorageSpec("ephemeral", "tmpfs", mp))
    with pytest.raises(AlreadyExistsError) as ei:
        m.add(StorageSpec("9p", "kataShared", mp))
    assert ei.value.field == "mount_point"
    assert m.users(mp) == 1


def test_propagation_is_a_second_call(fake: RecordingSyscalls, root: Path) -> None:
    mp = str(root / "shared")
    manager(fake, root).add(StorageSpec("9p", "kataShared", mp, "9p", ("rshared",)))
    assert fake.calls[1] == ("mount", None, mp, None, sc.MS_SHARED | sc.MS_REC, None)


@pytest.mark.parametrize("word", ["bind", "rbind", "remount"])
def test_bind_and_remount_refused(fake: RecordingSyscalls, root: Path, word: str) -> None:
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("ephemeral", "tmpfs", str(root / "x"), "",
                                            (word,)))
    assert ei.value.field == "options"
    assert fake.calls == []


def test_mount_failure_rolls_back(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    fake.fail_mount = OSError(errno.ENODEV, "no such fs")
    mp = str(root / "new/dir")
    with pytest.raises(HostError) as ei:
        m.add(StorageSpec("virtio-fs", "kataShared", mp))
    assert ei.value.errno == errno.ENODEV
    assert m.users(mp) == 0 and not os.path.exists(mp)


def test_mount_point_symlink_stays_in_root(fake: RecordingSyscalls, root: Path,
                                           tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), root / "evil")
    m = manager(fake, root)
    m.add(StorageSpec("ephemeral", "tmpfs", str(root / "evil/x")))
    assert not (outside / "x").exists()
    target = fake.calls[0][2]
    assert target.startswith(str(root) + "/")


# -- drivers -----------------------------------------------------------------------------

def test_9p_options(fake: RecordingSyscalls, root: Path) -> None:
    mp = str(root / "shared")
    manager(fake, root).add(StorageSpec("9p", "kataShared", mp, "9p",
                                        ("nodev", "trans=virtio", "version=9p2000.L",
                                         "msize=8192", "cache=mmap")))
    assert fake.calls == [("mount", "kataShared", mp, "9p", sc.MS_NODEV,
                           "trans=virtio,version=9p2000.L,msize=8192,cache=mmap")]


def test_9p_sandbox_share_as_the_1x_runtime_sends_it(fake: RecordingSyscalls,
                                                      root: Path) -> None:
    m = manager(fake, root)
    spec = StorageSpec("9p", "kataShared", f"{root}/shared/containers/", "9p",
                       ("trans=virtio,version=9p2000.L,cache=mmap", "nodev"))
    h = m.add(spec)
    mp = f"{root}/shared/containers"
    assert h.mount_point == mp and m.users(mp) == 1
    assert fake.calls == [("mount", "kataShared", mp, "9p", sc.MS_NODEV,
                           "trans=virtio,version=9p2000.L,cache=mmap")]
    m.add(replace(spec, mount_point=mp))
    assert m.users(mp) == 2 and len(fake.calls) == 1
    m.remove(h)
    m.remove(h)
    assert fake.calls[-1] == ("umount2", mp, sc.UMOUNT_NOFOLLOW)


def test_remove_all_unmounts_nested_last_first(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    m.add(StorageSpec("ephemeral", "tmpfs", str(root / "a")))
    m.add(StorageSpec("ephemeral", "tmpfs", str(root / "a/b")))
    m.add(StorageSpec("ephemeral", "tmpfs", str(root / "a/b")))
    m.remove_all()
    assert [c for c in fake.calls if c[0] == "umount2"] == [
        ("umount2", str(root / "a/b"), sc.UMOUNT_NOFOLLOW),
        ("umount2", str(root / "a"), sc.UMOUNT_NOFOLLOW)]
    assert m.users(str(root / "a")) == 0


@pytest.mark.parametrize(("source", "options", "field"), [
    ("kataShared", ("trans=tcp",), "options"),
    ("kataShared", ("msize=12",), "options"),
    ("kataShared", ("version=9p2000.u",), "options"),
    ("../x", (), "source"),
    ("", (), "source"),
])
def test_9p_rejects(fake: RecordingSyscalls, root: Path, source: str,
                    options: tuple[str, ...], field: str) -> None:
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("9p", source, str(root / "s"), "9p", options))
    assert ei.value.field == field


def test_virtiofs_fstype(fake: RecordingSyscalls, root: Path) -> None:
    mp = str(root / "shared")
    manager(fake, root).add(StorageSpec("virtio-fs", "kataShared", mp, "virtio_fs",
                                        ("dax",)))
    assert fake.calls == [("mount", "kataShared", mp, "virtiofs", 0, "dax")]
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("virtio-fs", "t", str(root / "o"), "ext4"))
    assert ei.value.field == "fstype"


def test_ephemeral_rejects_other_sources(fake: RecordingSyscalls, root: Path) -> None:
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("ephemeral", "/dev/sda", str(root / "e")))
    assert ei.value.field == "source"


def test_local_directory_mode(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    mp = str(root / "sandbox/local/vol")
    h = m.add(StorageSpec("local", "local", mp, "", ("mode=0750",)))
    assert fake.calls == []
    assert stat.S_IMODE(os.stat(mp).st_mode) == 0o750
    (Path(mp) / "data").write_text("x")
    m.remove(h)
    assert not os.path.exists(mp)


@pytest.mark.parametrize(("opt", "field"), [("mode=999", "options.mode"),
                                            ("uid=-1", "options.uid"),
                                            ("fsgid=x", "options.fsgid")])
def test_local_bad_options(fake: RecordingSyscalls, root: Path, opt: str, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("local", "local", str(root / "l"), "", (opt,)))
    assert ei.value.field == field


def test_blk_by_pci_path(fake: RecordingSyscalls, root: Path) -> None:
    bridge = root.parent / "sys/devices/pci0000:00/0000:00:02.0"
    (bridge / "pci_bus/0000:01").mkdir(parents=True)
    (bridge / "0000:01:01.0/virtio4/block/vda").mkdir(parents=True)
    m = with_fake_finder(manager(fake, root))
    mp = str(root / "shared/containers/c1")
    m.add(StorageSpec("blk", "02/01", mp, "ext4", ("ro",)))
    assert fake.calls == [("mount", str(root.parent / "dev/vda"), mp, "ext4", sc.MS_RDONLY,
                           None)]


@pytest.mark.parametrize(("spec_kw", "field"), [
    ({"driver": "blk", "source": "02/01", "fstype": ""}, "fstype"),
    ({"driver": "blk", "source": "02/01", "fstype": "ext4;rm"}, "fstype"),
    ({"driver": "mmioblk", "source": "/etc/passwd", "fstype": "ext4"}, "source"),
    ({"driver": "mmioblk", "source": "/dev/../etc/x", "fstype": "ext4"}, "source"),
    ({"driver": "nvdimm", "source": "/dev/sda", "fstype": "ext4"}, "source"),
    ({"driver": "blk-ccw", "source": "0.0.0005", "fstype": "ext4"}, "source"),
    ({"driver": "scsi", "source": "0", "fstype": "ext4"}, "source"),
])
def test_block_drivers_validate(fake: RecordingSyscalls, root: Path, spec_kw: dict[str, str],
                                field: str) -> None:
    m = with_fake_finder(manager(fake, root))
    with pytest.raises(SpecError) as ei:
        m.add(StorageSpec(mount_point=str(root / "b"), **spec_kw))
    assert ei.value.field == field
    assert fake.calls == []


def test_blk_real_finder_refuses_non_block(fake: RecordingSyscalls, root: Path) -> None:
    dev = root.parent / "dev"
    dev.mkdir()
    (dev / "vdb").write_text("not a disk")
    with pytest.raises(SpecError) as ei:
        manager(fake, root).add(StorageSpec("mmioblk", "/dev/vdb", str(root / "b"), "ext4"))
    assert ei.value.errno == errno.ENOTBLK
    assert fake.calls == []


def test_nvdimm_adds_dax(fake: RecordingSyscalls, root: Path) -> None:
    m = with_fake_finder(manager(fake, root))
    (root.parent / "dev").mkdir()
    (root.parent / "dev/pmem1").write_text("")
    mp = str(root / "img")
    m.add(StorageSpec("nvdimm", "/dev/pmem1", mp, "ext4", ("ro",)))
    assert fake.calls == [("mount", str(root.parent / "dev/pmem1"), mp, "ext4", sc.MS_RDONLY,
                           "dax")]


def test_overlay_layers_inside_roots(fake: RecordingSyscalls, root: Path) -> None:
    for d in ("l1", "l2", "up", "work"):
        (root / "layers" / d).mkdir(parents=True)
    lay = root / "layers"
    mp = str(root / "merged")
    fds_before = len(os.listdir("/proc/self/fd"))
    mgr = manager(fake, root)
    handle = mgr.add(StorageSpec(
        "overlay", "overlay", mp, "overlay",
        (f"lowerdir={lay}/l1:{lay}/l2", f"upperdir={lay}/up", f"workdir={lay}/work",
         "index=off")))
    assert fake.calls == [("mount", "overlay", mp, "overlay", 0,
                           f"lowerdir={lay}/l1:{lay}/l2,upperdir={lay}/up,"
                           f"workdir={lay}/work,index=off")]
    # Layer fds are closed after mounting; only the mount point's parent stays held,
    # for the teardown, and goes with it.
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    mgr.remove(handle)
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize(("opts", "field"), [
    (("lowerdir=/etc",), "options.lowerdir[0]"),
    (("lowerdir=ROOT/l1:relative",), "options.lowerdir[1]"),
    (("lowerdir=ROOT/l1", "upperdir=ROOT/up"), "options"),
    (("upperdir=ROOT/up", "workdir=ROOT/w"), "options"),
    (("lowerdir=ROOT/l1", "datadir=/etc"), "options[1]"),
    (("lowerdir=ROOT/l1", "lowerdir=ROOT/l1"), "options[1]"),
    (("lowerdir=ROOT/missing",), "options.lowerdir[0]"),
    (("lowerdir=ROOT/link",), "options.lowerdir[0]"),
])
def test_overlay_rejects(fake: RecordingSyscalls, root: Path, opts: tuple[str, ...],
                         field: str) -> None:
    (root / "l1").mkdir()
    # An absolute symlink resolves inside the root, where /etc does not exist.
    os.symlink("/etc", root / "link")
    opts = tuple(o.replace("ROOT", str(root)) for o in opts)
    with pytest.raises((SpecError, NotFoundError)) as ei:
        manager(fake, root).add(StorageSpec("overlay", "overlay", str(root / "m"), "", opts))
    assert ei.value.field == field
    assert fake.calls == []


# -- RPC edge ----------------------------------------------------------------------------

def test_storages_from_pb() -> None:
    msg = agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                            options=["trans=virtio"], mount_point="/run/kata-containers/s")
    (spec,) = storages_from_pb([msg])
    assert spec == StorageSpec("9p", "kataShared", "/run/kata-containers/s", "9p",
                               ("trans=virtio",))
    with pytest.raises(SpecError) as ei:
        storages_from_pb([agent_pb2.Storage(driver="9p"), agent_pb2.Storage(source="a\0")])
    assert ei.value.field == "storages[1].source"
    with pytest.raises(SpecError) as ei:
        storages_from_pb([agent_pb2.Storage(options=["x"] * 100)])
    assert ei.value.field == "storages[0].options"
    with pytest.raises(SpecError):
        storages_from_pb([agent_pb2.Storage()] * 129)


def test_devices_from_pb() -> None:
    (d,) = devices_from_pb([agent_pb2.Device(id="02/01", type="blk",
                                             container_path="/dev/xvda")])
    assert (d.type, d.id, d.container_path, d.vm_path) == ("blk", "02/01", "/dev/xvda", "")
    with pytest.raises(SpecError):
        devices_from_pb([agent_pb2.Device()] * 129)


def test_concurrent_adds_mount_once(fake: RecordingSyscalls, root: Path) -> None:
    m = manager(fake, root)
    spec = StorageSpec("ephemeral", "tmpfs", str(root / "shared-tmp"))
    start = threading.Barrier(8)

    def add() -> None:
        start.wait()
        m.add(spec)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c[0] for c in fake.calls] == ["mount"]
    assert m.users(spec.mount_point) == 8


def test_overlay_fds_closed_when_mount_fails(fake: RecordingSyscalls, root: Path) -> None:
    (root / "l1").mkdir()
    fake.fail_mount = OSError(errno.EINVAL, "bad overlay")
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(HostError):
        manager(fake, root).add(StorageSpec("overlay", "overlay", str(root / "m"), "",
                                            (f"lowerdir={root}/l1",)))
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert not (root / "m").exists()
