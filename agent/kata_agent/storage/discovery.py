"""Finding hot-plugged devices in the guest: virtio-blk by PCI path, SCSI disks by
``id:lun``, s390 CCW disks by bus id, and plain ``/dev`` nodes by name.

Each lookup subscribes to uevents, asks the bus to rescan, then checks sysfs, and waits
for the matching ``add`` event until the hotplug deadline.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import stat
from collections.abc import Callable

from kata_agent.engine.errors import HostError, NotFoundError, SpecError
from kata_agent.storage import uevent
from kata_agent.storage.options import dev_name_ok

log = logging.getLogger(__name__)

MAX_PCI_DEPTH = 8
ROOT_BUS = {
    "x86_64": "pci0000:00",
    "aarch64": "platform/4010000000.pcie/pci0000:00",
    "s390x": "pci0000:00",
    "ppc64le": "pci0000:00",
}
_PCI_PATH_RE = re.compile(r"^[0-9a-fA-F]{2}(/[0-9a-fA-F]{2})*$")
_SCSI_RE = re.compile(r"^([0-9]{1,5}):([0-9]{1,5})$")
_CCW_RE = re.compile(r"^[0-9a-fA-F]\.[0-9a-fA-F]\.[0-9a-fA-F]{4}$")
_BUS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}$")


def parse_pci_path(value: str, field: str) -> list[int]:
    """``bb/dd`` (bridge slot on the root bus / device slot on that bridge's bus), or any
    depth of slots; each slot is a PCI device number 0..31."""
    if len(value) > 3 * MAX_PCI_DEPTH or not _PCI_PATH_RE.match(value):
        raise SpecError(f"invalid PCI path {value!r}, expected slots like '02/01'", field=field)
    slots = [int(s, 16) for s in value.split("/")]
    if any(s > 0x1F for s in slots):
        raise SpecError(f"PCI slot out of range in {value!r}", field=field)
    return slots


def parse_scsi_addr(value: str, field: str) -> tuple[int, int]:
    m = _SCSI_RE.match(value)
    if not m or int(m.group(1)) > 0xFFFF or int(m.group(2)) > 0x3FFF:
        raise SpecError(f"invalid SCSI address {value!r}, expected 'id:lun'", field=field)
    return int(m.group(1)), int(m.group(2))


def _is_partition(ev: uevent.Uevent) -> bool:
    return ev.env.get("DEVTYPE") == "partition"


class DeviceFinder:
    """Device lookups against a sysfs and /dev tree (the real ones in the guest)."""

    def __init__(self, *, sys_root: str = "/sys", dev_root: str = "/dev",
                 hotplug_timeout: float = 3.0,
                 source_factory: uevent.SourceFactory = uevent.NetlinkUeventSource,
                 arch: str | None = None) -> None:
        self.sys_root = sys_root.rstrip("/") or "/"
        self.dev_root = dev_root.rstrip("/") or "/"
        self.timeout = hotplug_timeout
        self.source_factory = source_factory
        self.arch = arch or os.uname().machine

    # -- helpers -----------------------------------------------------------------------

    def _sys(self, rel: str) -> str:
        return os.path.join(self.sys_root, rel.lstrip("/"))

    def _node(self, name: str) -> str:
        return os.path.join(self.dev_root, name)

    def _write_sysfs(self, rel: str, data: str) -> None:
        path = self._sys(rel)
        try:
            with open(path, "w") as f:
                f.write(data)
        except FileNotFoundError:
            log.debug("event=sysfs_missing path=%s", path)
        except OSError as e:
            log.warning("event=sysfs_write_failed path=%s error=%s", path, e)

    def _one_block(self, pattern: str, what: str) -> str | None:
        names = sorted({os.path.basename(p) for p in glob.glob(self._sys(pattern))})
        names = [n for n in names if dev_name_ok(n)]
        if not names:
            return None
        if len(names) > 1:
            raise HostError(f"{what}: expected one block device, found {names}",
                            errno=errno.EEXIST)
        return self._node(names[0])

    def _wait(self, what: str, existing: Callable[[], str | None],
              match: Callable[[uevent.Uevent], str | None]) -> str:
        return uevent.wait_for_device(self.source_factory, what=what, timeout=self.timeout,
                                      existing=existing, match=match)

    def _block_add(self, ev: uevent.Uevent, devpath_test: bool) -> str | None:
        if (ev.action == "add" and ev.subsystem == "block" and devpath_test
                and not _is_partition(ev) and dev_name_ok(ev.devname)):
            return self._node(ev.devname)
        return None

    # -- virtio-blk over PCI -----------------------------------------------------------

    def root_bus(self) -> str:
        return ROOT_BUS.get(self.arch, "pci0000:00")

    def pci_devpath(self, pci_path: str, field: str) -> str:
        """The sysfs DEVPATH (``/devices/pci0000:00/0000:00:02.0/0000:01:01.0``) of the
        device at ``pci_path``; bridges on the way must already exist."""
        slots = parse_pci_path(pci_path, field)
        root = self.root_bus()
        bus = root.rsplit("pci", 1)[1]  # "0000:00"
        rel: list[str] = []
        for i, slot in enumerate(slots):
            if i > 0:
                bridge = self._sys("/devices/" + "/".join([root, *rel]))
                try:
                    buses = sorted(os.listdir(os.path.join(bridge, "pci_bus")))
                except FileNotFoundError:
                    raise NotFoundError(f"no PCI bridge at {'/'.join(rel)} for {pci_path!r}",
                                        errno=errno.ENOENT, field=field) from None
                if len(buses) != 1 or not _BUS_RE.match(buses[0]):
                    raise HostError(f"bridge {rel[-1]} exposes buses {buses}, expected one",
                                    errno=errno.EINVAL)
                bus = buses[0]
            rel.append(f"{bus}:{slot:02x}.0")
        return "/devices/" + "/".join([root, *rel])

    def pci_block(self, pci_path: str, field: str) -> str:
        """The /dev node of the virtio-blk disk at ``pci_path``, waiting for hotplug."""
        devpath = self.pci_devpath(pci_path, field)
        prefix = devpath + "/"

        def existing() -> str | None:
            self._write_sysfs("/bus/pci/rescan", "1")
            return (self._one_block(devpath + "/*/block/*", pci_path)
                    or self._one_block(devpath + "/block/*", pci_path))

        return self._wait(f"pci:{pci_path}", existing,
                          lambda ev: self._block_add(ev, ev.devpath.startswith(prefix)))

    # -- virtio-scsi -------------------------------------------------------------------

    def scsi_block(self, addr: str, field: str) -> str:
        """The /dev node of the SCSI disk at ``id:lun`` on host 0, channel 0."""
        target, lun = parse_scsi_addr(addr, field)
        name = f"0:0:{target}:{lun}"
        marker = f"/{name}/block/"

        def existing() -> str | None:
            hosts = sorted(glob.glob(self._sys("/class/scsi_host/host*")))
            for host in hosts:
                self._write_sysfs(os.path.relpath(os.path.join(host, "scan"), self.sys_root),
                                  f"0 {target} {lun}")
            return self._one_block(f"/bus/scsi/devices/{name}/block/*", addr)

        return self._wait(f"scsi:{addr}", existing,
                          lambda ev: self._block_add(ev, marker in ev.devpath))

    # -- virtio-blk over CCW (s390x) ---------------------------------------------------

    def ccw_block(self, busid: str, field: str) -> str:
        if self.arch != "s390x":
            raise SpecError(f"CCW devices are not supported on this architecture ({self.arch})",
                            errno=errno.EOPNOTSUPP, field=field)
        if not _CCW_RE.match(busid):
            raise SpecError(f"invalid CCW bus id {busid!r}, expected like '0.0.0005'",
                            field=field)
        busid = busid.lower()
        marker = f"/{busid}/"

        def existing() -> str | None:
            return self._one_block(f"/bus/ccw/devices/{busid}/virtio*/block/*", busid)

        return self._wait(f"ccw:{busid}", existing,
                          lambda ev: self._block_add(ev, marker in ev.devpath))

    # -- plain nodes -------------------------------------------------------------------

    def wait_node(self, node: str, field: str) -> str:
        """Wait until ``node`` (a path under dev_root) exists."""
        name = os.path.relpath(node, self.dev_root)
        if name.startswith("..") or not all(dev_name_ok(p) for p in name.split("/")):
            raise SpecError(f"invalid device name {name!r}", field=field)

        def existing() -> str | None:
            return node if os.path.lexists(node) else None

        def match(ev: uevent.Uevent) -> str | None:
            return node if ev.action == "add" and ev.devname == name else None

        return self._wait(name, existing, match)

    def block_device(self, node: str, field: str) -> os.stat_result:
        """stat of ``node``; it must be a block device (not a symlink, file or char dev)."""
        try:
            st = os.stat(node, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFoundError(f"device {node} does not exist", errno=errno.ENOENT,
                                field=field) from None
        if not stat.S_ISBLK(st.st_mode):
            raise SpecError(f"{node} is not a block device", errno=errno.ENOTBLK, field=field)
        return st
