"""Uevent parsing and device discovery on a fake sysfs tree with fake uevent streams."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from kata_agent.engine.errors import HostError, NotFoundError, SpecError
from kata_agent.storage import uevent
from kata_agent.storage.discovery import DeviceFinder, parse_pci_path, parse_scsi_addr


def ev(action: str, devpath: str, **env: str) -> bytes:
    fields = {"ACTION": action, "DEVPATH": devpath, **env}
    return f"{action}@{devpath}\0".encode() + b"".join(
        f"{k}={v}\0".encode() for k, v in fields.items())


class FakeSource:
    """Hands out queued datagrams; when empty, waits (up to the timeout) for more."""

    def __init__(self, messages: list[bytes] | None = None) -> None:
        self.messages = list(messages or [])
        self.cond = threading.Condition()
        self.closed = False

    def push(self, data: bytes) -> None:
        with self.cond:
            self.messages.append(data)
            self.cond.notify_all()

    def receive(self, timeout: float) -> bytes | None:
        with self.cond:
            self.cond.wait_for(lambda: bool(self.messages), timeout)
            return self.messages.pop(0) if self.messages else None

    def close(self) -> None:
        self.closed = True


def factory_of(source: FakeSource, on_open: Callable[[], None] | None = None
               ) -> Callable[[], FakeSource]:
    def make() -> FakeSource:
        if on_open:
            on_open()
        return source
    return make


# -- parsing -----------------------------------------------------------------------------

def test_parse_kernel_uevent() -> None:
    data = ev("add", "/devices/pci0000:00/0000:00:02.0/0000:01:01.0/virtio1/block/vda",
              SUBSYSTEM="block", DEVNAME="vda", DEVTYPE="disk", SEQNUM="1234")
    u = uevent.parse_uevent(data)
    assert u is not None
    assert (u.action, u.subsystem, u.devname, u.seqnum) == ("add", "block", "vda", "1234")
    assert u.devpath.endswith("/block/vda")


@pytest.mark.parametrize("data", [
    b"",
    b"garbage",
    b"add@relative/path\0ACTION=add\0",
    b"libudev\0\xfe\xed\xca\xfe",
    b"add@/devices/x\0ACTION=remove\0",  # header and body disagree
    b"add@/devices/x\0" + b"A=" + b"x" * 9000,
])
def test_parse_rejects_non_kernel_messages(data: bytes) -> None:
    assert uevent.parse_uevent(data) is None


def test_parse_bounds_env_keys() -> None:
    data = b"add@/devices/x\0" + b"".join(f"K{i}=v\0".encode() for i in range(200))
    u = uevent.parse_uevent(data)
    assert u is not None and len(u.env) == uevent.MAX_ENV_KEYS


# -- waiting -----------------------------------------------------------------------------

def test_wait_returns_existing_without_reading_events() -> None:
    src = FakeSource([ev("add", "/devices/other", DEVNAME="sdz")])
    got = uevent.wait_for_device(factory_of(src), what="x", timeout=5,
                                 existing=lambda: "/dev/vda", match=lambda e: None)
    assert got == "/dev/vda"
    assert src.messages and src.closed


def test_wait_subscribes_before_looking() -> None:
    order: list[str] = []
    src = FakeSource()
    uevent.wait_for_device(factory_of(src, lambda: order.append("subscribe")), what="x",
                           timeout=5, existing=lambda: order.append("scan") or "found",
                           match=lambda e: None)
    assert order == ["subscribe", "scan"]


def test_wait_matches_event_sent_after_scan() -> None:
    src = FakeSource([ev("change", "/devices/a/block/vdb", SUBSYSTEM="block", DEVNAME="vdb"),
                      b"junk",
                      ev("add", "/devices/a/block/vdb", SUBSYSTEM="block", DEVNAME="vdb")])
    got = uevent.wait_for_device(
        factory_of(src), what="vdb", timeout=5, existing=lambda: None,
        match=lambda e: e.devname if e.action == "add" else None)
    assert got == "vdb"


def test_wait_times_out_with_etimedout() -> None:
    src = FakeSource()
    with pytest.raises(HostError) as ei:
        uevent.wait_for_device(factory_of(src), what="pci:02/01", timeout=0.05,
                               existing=lambda: None, match=lambda e: "x")
    assert ei.value.errno == errno.ETIMEDOUT and "pci:02/01" in str(ei.value)
    assert src.closed


def test_wait_event_from_another_thread() -> None:
    src = FakeSource()
    t = threading.Thread(target=src.push, args=(ev("add", "/devices/z", DEVNAME="pmem0"),))

    def scan() -> None:
        t.start()
        return None

    got = uevent.wait_for_device(factory_of(src), what="pmem0", timeout=10, existing=scan,
                                 match=lambda e: e.devname or None)
    t.join()
    assert got == "pmem0"


def test_real_netlink_source_opens_and_polls() -> None:
    try:
        src = uevent.NetlinkUeventSource()
    except PermissionError:
        pytest.skip("host capability missing: NETLINK_KOBJECT_UEVENT bind")
    try:
        got = src.receive(0)
        assert got is None or isinstance(got, bytes)
    finally:
        src.close()


# -- PCI / SCSI address parsing ----------------------------------------------------------

def test_parse_pci_path() -> None:
    assert parse_pci_path("02/01", "source") == [2, 1]
    assert parse_pci_path("1f", "source") == [31]


@pytest.mark.parametrize("bad", ["", "2/1", "02/", "/02", "02//01", "zz/01", "20/01",
                                 "02/01/" * 10 + "01", "../01"])
def test_parse_pci_path_rejects(bad: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse_pci_path(bad, "source")
    assert ei.value.field == "source"


def test_parse_scsi_addr() -> None:
    assert parse_scsi_addr("1:0", "id") == (1, 0)
    for bad in ("1", "1:0:0", "a:b", "-1:0", "99999:0", " 1:0"):
        with pytest.raises(SpecError):
            parse_scsi_addr(bad, "id")


# -- fake sysfs discovery ----------------------------------------------------------------

def make_pci(sys_root: Path, name: str = "vda") -> Path:
    bridge = sys_root / "devices/pci0000:00/0000:00:02.0"
    (bridge / "pci_bus/0000:01").mkdir(parents=True)
    (sys_root / "bus/pci").mkdir(parents=True)
    (sys_root / "bus/pci/rescan").write_text("")
    dev = bridge / "0000:01:01.0"
    dev.mkdir()
    return dev


def finder(tmp_path: Path, src: FakeSource, timeout: float = 5, **kw: object) -> DeviceFinder:
    return DeviceFinder(sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"),
                        hotplug_timeout=timeout, source_factory=factory_of(src),
                        arch=str(kw.get("arch", "x86_64")))


def test_pci_devpath_through_bridge(tmp_path: Path) -> None:
    make_pci(tmp_path / "sys")
    f = finder(tmp_path, FakeSource())
    assert f.pci_devpath("02/01", "source") == \
        "/devices/pci0000:00/0000:00:02.0/0000:01:01.0"
    assert f.pci_devpath("05", "source") == "/devices/pci0000:00/0000:00:05.0"


def test_pci_devpath_missing_bridge(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    with pytest.raises(NotFoundError) as ei:
        finder(tmp_path, FakeSource()).pci_devpath("03/01", "source")
    assert ei.value.field == "source"


def test_pci_block_already_present(tmp_path: Path) -> None:
    dev = make_pci(tmp_path / "sys")
    (dev / "virtio3/block/vdc").mkdir(parents=True)
    f = finder(tmp_path, FakeSource())
    assert f.pci_block("02/01", "source") == str(tmp_path / "dev/vdc")
    assert (tmp_path / "sys/bus/pci/rescan").read_text() == "1"


def test_pci_block_hotplug_event(tmp_path: Path) -> None:
    make_pci(tmp_path / "sys")
    base = "/devices/pci0000:00/0000:00:02.0/0000:01:01.0"
    src = FakeSource([
        # another slot whose address shares a prefix must not match
        ev("add", "/devices/pci0000:00/0000:00:02.0/0000:01:01.00/virtio9/block/vdz",
           SUBSYSTEM="block", DEVNAME="vdz"),
        ev("add", base + "/virtio3", SUBSYSTEM="virtio"),
        ev("add", base + "/virtio3/block/vdb/vdb1", SUBSYSTEM="block", DEVNAME="vdb1",
           DEVTYPE="partition"),
        ev("add", base + "/virtio3/block/vdb", SUBSYSTEM="block", DEVNAME="vdb",
           DEVTYPE="disk"),
    ])
    assert finder(tmp_path, src).pci_block("02/01", "source") == str(tmp_path / "dev/vdb")
    assert src.messages == []


def test_pci_block_timeout(tmp_path: Path) -> None:
    make_pci(tmp_path / "sys")
    with pytest.raises(HostError) as ei:
        finder(tmp_path, FakeSource(), timeout=0.05).pci_block("02/01", "source")
    assert ei.value.errno == errno.ETIMEDOUT


def test_scsi_block_scans_and_finds(tmp_path: Path) -> None:
    sysr = tmp_path / "sys"
    host = sysr / "class/scsi_host/host0"
    host.mkdir(parents=True)
    (host / "scan").write_text("")
    (sysr / "bus/scsi/devices/0:0:1:2/block/sdb").mkdir(parents=True)
    assert finder(tmp_path, FakeSource()).scsi_block("1:2", "source") == \
        str(tmp_path / "dev/sdb")
    assert (host / "scan").read_text() == "0 1 2"


def test_scsi_block_event_needs_exact_address(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    src = FakeSource([
        ev("add", "/devices/pci0000:00/0000:00:03.0/virtio2/host0/target0:0:11/"
           "10:0:1:0/block/sdc", SUBSYSTEM="block", DEVNAME="sdc"),
        ev("add", "/devices/pci0000:00/0000:00:03.0/virtio2/host0/target0:0:1/"
           "0:0:1:0/block/sdd", SUBSYSTEM="block", DEVNAME="sdd"),
    ])
    assert finder(tmp_path, src).scsi_block("1:0", "source") == str(tmp_path / "dev/sdd")


def test_wait_node_by_devname(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    src = FakeSource([ev("add", "/devices/platform/nd/region0/pmem0", SUBSYSTEM="block",
                         DEVNAME="pmem0")])
    node = str(tmp_path / "dev/pmem0")
    assert finder(tmp_path, src).wait_node(node, "source") == node


def test_wait_node_rejects_escape(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        finder(tmp_path, FakeSource()).wait_node(str(tmp_path / "etc/passwd"), "source")


def test_ccw_only_on_s390(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as ei:
        finder(tmp_path, FakeSource()).ccw_block("0.0.0005", "source")
    assert "not supported on this architecture" in str(ei.value)
    sysr = tmp_path / "sys/bus/ccw/devices/0.0.0005/virtio1/block/vda"
    sysr.mkdir(parents=True)
    f = finder(tmp_path, FakeSource(), arch="s390x")
    assert f.ccw_block("0.0.0005", "source") == str(tmp_path / "dev/vda")
    with pytest.raises(SpecError):
        f.ccw_block("0.0.5", "source")


def test_block_device_check(tmp_path: Path) -> None:
    f = finder(tmp_path, FakeSource())
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError) as ei:
        f.block_device(str(tmp_path / "file"), "source")
    assert ei.value.errno == errno.ENOTBLK
    with pytest.raises(NotFoundError):
        f.block_device(str(tmp_path / "missing"), "source")
    os.symlink("/dev/null", tmp_path / "link")
    with pytest.raises(SpecError):
        f.block_device(str(tmp_path / "link"), "source")
