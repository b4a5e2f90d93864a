"""Guest network: interfaces, routes and ARP neighbours through netlink (pyroute2 only).

The host runtime describes the sandbox network (what the host side of each tap/veth looks
like) and the agent makes the guest match: it finds each link by MAC address, renames it,
sets its MTU and addresses, brings it up, replaces the main routing table and adds static
neighbours. Requests arrive here as typed dataclasses, already converted at the RPC edge;
every field is validated before the first netlink message is sent, so a bad request never
leaves the network half-configured.

Also here: writing the sandbox's resolv.conf lines and applying ``net.*`` sysctls.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_agent import safe_path
from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
)
from kata_agent.engine.syscalls import CLONE_NEWNET, Syscalls

log = logging.getLogger(__name__)

# Bounds on repeated fields of one request (a sandbox has a handful of each).
MAX_ADDRESSES = 64
MAX_ROUTES = 512
MAX_NEIGHBORS = 1024
MAX_DNS_LINES = 64
MAX_DNS_LINE = 1024
MAX_SYSCTLS = 256
MAX_SYSCTL_VALUE = 4096

IFNAMSIZ = 16  # including the terminating NUL
IFF_UP = 0x1
IFF_NOARP = 0x80
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RTM_F_CLONED = 0x200
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
NUD_PERMANENT = 0x80
PROC_SUPER_MAGIC = 0x9FA0

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5,19}$")
_SYSCTL_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SYSCTL_DOTTED = re.compile(r"^[A-Za-z0-9_\-]+$")


class IPFamily(enum.IntEnum):
    """types.IPFamily on the wire."""

    V4 = 0
    V6 = 1


@dataclass(frozen=True, slots=True)
class IPAddress:
    family: IPFamily
    address: str
    mask: str  # prefix length in decimal, as the runtime sends it


@dataclass(frozen=True, slots=True)
class Interface:
    device: str = ""
    name: str = ""
    addresses: tuple[IPAddress, ...] = ()
    mtu: int = 0
    hw_addr: str = ""
    pci_path: str = ""
    link_type: str = ""
    raw_flags: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    dest: str = ""
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0


@dataclass(frozen=True, slots=True)
class ARPNeighbor:
    to_ip: IPAddress | None
    device: str = ""
    lladdr: str = ""
    state: int = 0
    flags: int = 0


# --------------------------------------------------------------------------- validation


def normalize_mac(mac: str, field: str) -> str:
    """Lower-case ``aa:bb:...`` form; the kernel reports MACs this way."""
    value = mac.strip().lower()
    if not _MAC.match(value):
        raise SpecError(f"invalid hardware address {mac!r}", field=field)
    return value


def validate_link_name(name: str, field: str) -> None:
    """What the kernel's dev_valid_name accepts; checked here to answer INVALID_ARGUMENT."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise SpecError(f"interface name {name!r} must have 1 to {IFNAMSIZ - 1} bytes",
                        field=field)
    if name in (".", "..") or any(c in name for c in "/:\0") or any(c.isspace() for c in name):
        raise SpecError(f"invalid interface name {name!r}", field=field)


def _parse_ip(text: str, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise SpecError(f"invalid IP address {text!r}", field=field) from None


def parse_interface_address(
    addr: IPAddress, field: str
) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    ip = _parse_ip(addr.address, f"{field}.address")
    want = IPFamily.V4 if ip.version == 4 else IPFamily.V6
    if addr.family != want:
        raise SpecError(f"address {addr.address!r} is not of family {addr.family.name}",
                        field=f"{field}.family")
    mask = addr.mask.strip()
    if not mask.isdigit() or int(mask) > ip.max_prefixlen:
        raise SpecError(f"invalid prefix length {addr.mask!r} for {addr.address}",
                        field=f"{field}.mask")
    return ipaddress.ip_interface(f"{ip}/{int(mask)}")


def validate_interface(iface: Interface) -> Interface:
    """Check every field; returns the interface with its MAC normalized."""
    if not iface.hw_addr:
        # The 1.x agent identifies the link by MAC only: the guest-side name is not stable.
        raise SpecError("interface hardware address is empty", field="interface.hwAddr")
    mac = normalize_mac(iface.hw_addr, "interface.hwAddr")
    if not mac.strip("0:"):
        # The all-zero address is lo's (and tunnels'): never a NIC the runtime plugged.
        raise SpecError("interface hardware address is all zero", field="interface.hwAddr")
    if iface.name:
        validate_link_name(iface.name, "interface.name")
    if iface.mtu and not 68 <= iface.mtu <= 65536:
        raise SpecError(f"MTU {iface.mtu} out of range 68..65536", field="interface.mtu")
    if len(iface.addresses) > MAX_ADDRESSES:
        raise SpecError(f"{len(iface.addresses)} addresses, at most {MAX_ADDRESSES}",
                        field="interface.IPAddresses")
    seen: set[str] = set()
    for i, addr in enumerate(iface.addresses):
        parsed = parse_interface_address(addr, f"interface.IPAddresses[{i}]")
        if str(parsed.ip) in seen:
            raise SpecError(f"address {parsed.ip} given twice", field=f"interface.IPAddresses[{i}]")
        seen.add(str(parsed.ip))
    if not 0 <= iface.raw_flags < 1 << 32:
        raise SpecError("raw_flags out of range", field="interface.raw_flags")
    return Interface(
        device=iface.device, name=iface.name, addresses=iface.addresses, mtu=iface.mtu,
        hw_addr=mac, pci_path=iface.pci_path, link_type=iface.link_type,
        raw_flags=iface.raw_flags,
    )


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    """A validated route, ready for netlink."""

    family: int  # AF_INET / AF_INET6
    dst: str  # "a.b.c.d/n" or "" for default
    gateway: str
    source: str
    scope: int
    device: str


def validate_route(route: Route, field: str) -> _RouteSpec:
    validate_link_name(route.device, f"{field}.device")
    if not 0 <= route.scope <= 255:
        raise SpecError(f"scope {route.scope} out of range", field=f"{field}.scope")
    versions: set[int] = set()
    dst = ""
    dest = route.dest.strip()
    if dest and dest != "default":
        try:
            # Host bits are masked off, as the Go agent's net.ParseCIDR does.
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            raise SpecError(f"invalid route destination {route.dest!r}",
                            field=f"{field}.dest") from None
        versions.add(net.version)
        dst = str(net)
    gateway = ""
    if route.gateway.strip():
        gw = _parse_ip(route.gateway, f"{field}.gateway")
        versions.add(gw.version)
        gateway = str(gw)
    source = ""
    if route.source.strip():
        src = _parse_ip(route.source, f"{field}.source")
        versions.add(src.version)
        source = str(src)
    if len(versions) > 1:
        raise SpecError("route mixes IPv4 and IPv6 addresses", field=field)
    version = versions.pop() if versions else 4
    family = 2 if version == 4 else 10
    return _RouteSpec(family=family, dst=dst, gateway=gateway, source=source,
                      scope=route.scope, device=route.device)


@dataclass(frozen=True, slots=True)
class _NeighborSpec:
    family: int
    dst: str
    device: str
    lladdr: str
    state: int
    flags: int


def validate_neighbor(neigh: ARPNeighbor, field: str) -> _NeighborSpec:
    if neigh.to_ip is None or not neigh.to_ip.address:
        raise SpecError("neighbour IP address is empty", field=f"{field}.toIPAddress")
    ip = _parse_ip(neigh.to_ip.address, f"{field}.toIPAddress.address")
    validate_link_name(neigh.device, f"{field}.device")
    lladdr = normalize_mac(neigh.lladdr, f"{field}.lladdr") if neigh.lladdr else ""
    if not 0 <= neigh.state <= 0xFFFF:
        raise SpecError(f"state {neigh.state} out of range", field=f"{field}.state")
    if not 0 <= neigh.flags <= 0xFF:
        raise SpecError(f"flags {neigh.flags} out of range", field=f"{field}.flags")
    return _NeighborSpec(
        family=2 if ip.version == 4 else 10, dst=str(ip), device=neigh.device, lladdr=lladdr,
        # A runtime that leaves the state unset means a static entry.
        state=neigh.state or NUD_PERMANENT, flags=neigh.flags,
    )


# --------------------------------------------------------------------------- netlink


def _netlink_error(err: Exception, what: str) -> EngineError:
    """Turn a pyroute2 NetlinkError (or OSError) into the engine error of its kind."""
    code = int(getattr(err, "code", 0) or getattr(err, "errno", 0) or 0)
    msg = f"{what}: {os.strerror(code) if code else err}"
    if code == errno.EEXIST:
        return AlreadyExistsError(msg, errno=code)
    if code in (errno.ENODEV, errno.ENOENT, errno.ESRCH):
        return NotFoundError(msg, errno=code)
    if code in (errno.EINVAL, errno.ERANGE, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
                errno.EAFNOSUPPORT):
        # The kernel refused a value the request carried (MTU, unreachable gateway...).
        return SpecError(msg, errno=code)
    return HostError(msg, errno=code)


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class Network:
    """Netlink operations on one network namespace (the agent's own by default).

    ``netns`` is a namespace file (``/var/run/netns/NAME``); tests use a fresh one each.
    """

    def __init__(self, *, netns: Path | None = None, syscalls: Syscalls | None = None,
                 hotplug_wait: float = 5.0, hotplug_poll: float = 0.05) -> None:
        self.netns = netns
        self._syscalls = syscalls
        # How long UpdateInterface waits for a hotplugged NIC (one given with a PCI path)
        # to appear before answering NOT_FOUND.
        self.hotplug_wait = hotplug_wait
        self.hotplug_poll = hotplug_poll
        self._lock = threading.Lock()

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute

        ipr = IPRoute() if self.netns is None else self._ipr_in_netns(self.netns, IPRoute)
        try:
            yield ipr
        finally:
            ipr.close()

    def _ipr_in_netns(self, netns: Path, factory: Any) -> Any:
        """A netlink socket bound to the namespace ``netns``.

        A socket stays in the namespace it was created in, and setns(CLONE_NEWNET) moves
        only the calling thread: so this thread enters the namespace, creates the socket
        and returns. (pyroute2's own netns= option forks a helper, which is unsafe in a
        process that runs gRPC threads.)
        """
        sc = self._syscalls or Syscalls()
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFoundError(f"no network namespace {netns}") from None
            try:
                sc.setns(target, CLONE_NEWNET)
            finally:
                os.close(target)
            try:
                return factory()
            finally:
                sc.setns(own, CLONE_NEWNET)
        finally:
            os.close(own)

    def _call(self, what: str, fn: Any, *argv: Any, **kwarg: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*argv, **kwarg)
        except (NetlinkError, OSError) as err:
            raise _netlink_error(err, what) from err

    # -- reading

    def _interface_of(self, ipr: Any, link: Any) -> Interface:
        index = link["index"]
        addrs: list[IPAddress] = []
        for msg in self._call("list addresses", ipr.get_addr, index=index):
            family = IPFamily.V4 if msg["family"] == 2 else IPFamily.V6
            address = _attr(msg, "IFA_ADDRESS")
            if address is None:
                continue
            if family is IPFamily.V6 and ipaddress.ip_address(address).is_link_local:
                continue  # kernel-managed, not part of what the runtime configures
            addrs.append(IPAddress(family, address, str(msg["prefixlen"])))
        info = _attr(link, "IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return Interface(
            device=_attr(link, "IFLA_IFNAME") or "",
            name=_attr(link, "IFLA_IFNAME") or "",
            addresses=tuple(addrs),
            mtu=int(_attr(link, "IFLA_MTU") or 0),
            hw_addr=_attr(link, "IFLA_ADDRESS") or "",
            link_type=kind or "",
            raw_flags=int(link["flags"]),
        )

    def list_interfaces(self) -> list[Interface]:
        with self._lock, self._ipr() as ipr:
            links = self._call("list links", ipr.get_links)
            return [self._interface_of(ipr, link) for link in links]

    def _routes(self, ipr: Any) -> list[tuple[Any, Route]]:
        names = {link["index"]: _attr(link, "IFLA_IFNAME")
                 for link in self._call("list links", ipr.get_links)}
        out: list[tuple[Any, Route]] = []
        for msg in self._call("list routes", ipr.get_routes, table=RT_TABLE_MAIN):
            if msg["type"] != RTN_UNICAST or msg["flags"] & RTM_F_CLONED:
                continue
            oif = _attr(msg, "RTA_OIF")
            if oif is None or oif not in names:
                continue  # multipath or blackhole: nothing the runtime describes
            dst = _attr(msg, "RTA_DST")
            out.append((msg, Route(
                dest=f"{dst}/{msg['dst_len']}" if dst else "",
                gateway=_attr(msg, "RTA_GATEWAY") or "",
                device=names[oif],
                source=_attr(msg, "RTA_PREFSRC") or "",
                scope=int(msg["scope"]),
            )))
        return out

    def list_routes(self) -> list[Route]:
        with self._lock, self._ipr() as ipr:
            return [route for _, route in self._routes(ipr)]

    # -- interfaces

    def _link_by_mac(self, ipr: Any, mac: str, wait: float = 0.0) -> Any:
        deadline = time.monotonic() + wait
        while True:
            for link in self._call("list links", ipr.get_links):
                if (_attr(link, "IFLA_ADDRESS") or "").lower() == mac:
                    return link
            if time.monotonic() >= deadline:
                raise NotFoundError(f"no link with hardware address {mac}",
                                    field="interface.hwAddr")
            self._poll_wait(self.hotplug_poll)

    def _poll_wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def bring_up_loopback(self) -> None:
        """``lo`` starts down in a fresh namespace (the agent as init, or a test netns)."""
        with self._lock, self._ipr() as ipr:
            found = self._call("look up lo", ipr.link_lookup, ifname="lo")
            if not found:
                raise NotFoundError("no loopback link")
            self._call("set lo up", ipr.link, "set", index=found[0], state="up")

    def update_interface(self, request: Interface) -> Interface:
        """Make the link with the request's MAC match it; returns it as the kernel has it."""
        iface = validate_interface(request)
        with self._lock, self._ipr() as ipr:
            link = self._link_by_mac(ipr, iface.hw_addr,
                                     self.hotplug_wait if iface.pci_path else 0.0)
            index = link["index"]
            log.info("update interface mac=%s index=%d name=%s mtu=%d addrs=%d",
                     iface.hw_addr, index, iface.name, iface.mtu, len(iface.addresses))
            if link["flags"] & IFF_UP:
                # A link must be down to be renamed.
                self._call("set link down", ipr.link, "set", index=index, state="down")
            try:
                self._replace_addresses(ipr, index, iface.addresses)
                if iface.name and iface.name != _attr(link, "IFLA_IFNAME"):
                    self._call(f"rename link to {iface.name}", ipr.link, "set", index=index,
                               ifname=iface.name)
                if iface.mtu:
                    self._call(f"set MTU {iface.mtu}", ipr.link, "set", index=index,
                               mtu=iface.mtu)
                if iface.raw_flags & IFF_NOARP:
                    self._call("set NOARP", ipr.link, "set", index=index, flags=IFF_NOARP,
                               change=IFF_NOARP)
            finally:
                # As the 1.x agent: the link goes back up even when a step failed.
                self._call("set link up", ipr.link, "set", index=index, state="up")
            return self._interface_of(ipr, self._call("get link", ipr.get_links, index)[0])

    def _replace_addresses(self, ipr: Any, index: int, wanted: Sequence[IPAddress]) -> None:
        for msg in self._call("list addresses", ipr.get_addr, index=index):
            address = _attr(msg, "IFA_ADDRESS")
            if address is None or (msg["family"] == 10
                                   and ipaddress.ip_address(address).is_link_local):
                continue
            try:
                self._call(f"delete address {address}", ipr.addr, "del", index=index,
                           address=address, prefixlen=msg["prefixlen"])
            except EngineError as err:
                # Deleting a primary IPv4 address takes its secondaries with it.
                if err.errno != errno.EADDRNOTAVAIL:
                    raise
        for i, addr in enumerate(wanted):
            parsed = parse_interface_address(addr, f"interface.IPAddresses[{i}]")
            self._call(f"add address {parsed}", ipr.addr, "add", index=index,
                       address=str(parsed.ip), prefixlen=parsed.network.prefixlen)

    # -- routes

    def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        """Replace the main table's routes with ``routes``; returns the table as read back.

        Routes on ``lo`` and those the kernel installs for addresses stay, as in the 1.x
        agent. Link routes go in before gateway routes, which need them to be reachable.
        """
        if len(routes) > MAX_ROUTES:
            raise SpecError(f"{len(routes)} routes, at most {MAX_ROUTES}", field="routes")
        specs = [validate_route(r, f"routes[{i}]") for i, r in enumerate(routes)]
        with self._lock, self._ipr() as ipr:
            indexes: dict[str, int] = {}
            for i, spec in enumerate(specs):
                found = self._call("look up link", ipr.link_lookup, ifname=spec.device)
                if not found:
                    # Checked before anything is deleted: a bad request leaves the table alone.
                    raise NotFoundError(f"no link named {spec.device!r}",
                                        field=f"routes[{i}].device")
                indexes[spec.device] = found[0]
            lo = set(self._call("look up lo", ipr.link_lookup, ifname="lo"))
            for msg, route in self._routes(ipr):
                if _attr(msg, "RTA_OIF") in lo or msg["proto"] == RTPROT_KERNEL:
                    continue
                log.debug("delete route dest=%s gw=%s dev=%s", route.dest, route.gateway,
                          route.device)
                try:
                    self._call(f"delete route {route.dest or 'default'}", ipr.route, "del",
                               table=RT_TABLE_MAIN, family=msg["family"],
                               dst_len=msg["dst_len"], **self._route_key(msg))
                except NotFoundError:
                    continue  # gone with an earlier deletion
            ordered = [s for s in specs if not s.gateway] + [s for s in specs if s.gateway]
            for spec in ordered:
                self._add_route(ipr, spec, indexes[spec.device])
            return [route for _, route in self._routes(ipr)]

    @staticmethod
    def _route_key(msg: Any) -> dict[str, Any]:
        key: dict[str, Any] = {"oif": _attr(msg, "RTA_OIF"), "scope": msg["scope"],
                               "proto": msg["proto"], "tos": msg["tos"]}
        for attr, name in (("RTA_DST", "dst"), ("RTA_GATEWAY", "gateway"),
                           ("RTA_PRIORITY", "priority")):
            value = _attr(msg, attr)
            if value is not None:
                key[name] = value
        return key

    def _add_route(self, ipr: Any, spec: _RouteSpec, index: int) -> None:
        args: dict[str, Any] = {"family": spec.family, "oif": index, "table": RT_TABLE_MAIN}
        if spec.dst:
            args["dst"] = spec.dst
        else:
            args["dst"] = "0.0.0.0/0" if spec.family == 2 else "::/0"
        if spec.gateway:
            args["gateway"] = spec.gateway
        if spec.source:
            args["prefsrc"] = spec.source
        if spec.family == 2:
            args["scope"] = spec.scope
        log.info("add route dest=%s gw=%s dev=%s src=%s scope=%d", spec.dst or "default",
                 spec.gateway, spec.device, spec.source, spec.scope)
        # replace, not add: a requested route may equal a kernel-installed one.
        self._call(f"add route {spec.dst or 'default'} via {spec.gateway or spec.device}",
                   ipr.route, "replace", **args)

    # -- neighbours

    def add_arp_neighbors(self, neighbors: Sequence[ARPNeighbor]) -> None:
        if len(neighbors) > MAX_NEIGHBORS:
            raise SpecError(f"{len(neighbors)} neighbours, at most {MAX_NEIGHBORS}",
                            field="neighbors")
        specs = [validate_neighbor(n, f"neighbors[{i}]") for i, n in enumerate(neighbors)]
        with self._lock, self._ipr() as ipr:
            for i, spec in enumerate(specs):
                found = self._call("look up link", ipr.link_lookup, ifname=spec.device)
                if not found:
                    raise NotFoundError(f"no link named {spec.device!r}",
                                        field=f"neighbors[{i}].device")
                args: dict[str, Any] = {"family": spec.family, "dst": spec.dst,
                                        "ifindex": found[0], "state": spec.state,
                                        "flags": spec.flags}
                if spec.lladdr:
                    args["lladdr"] = spec.lladdr
                log.info("add neighbour dst=%s dev=%s lladdr=%s state=%#x", spec.dst,
                         spec.device, spec.lladdr, spec.state)
                # replace keeps a retried request idempotent.
                self._call(f"add neighbour {spec.dst}", ipr.neigh, "replace", **args)

    def list_neighbors(self, device: str) -> list[ARPNeighbor]:
        with self._lock, self._ipr() as ipr:
            found = self._call("look up link", ipr.link_lookup, ifname=device)
            if not found:
                raise NotFoundError(f"no link named {device!r}")
            out = []
            for msg in self._call("list neighbours", ipr.get_neighbours, ifindex=found[0]):
                dst = _attr(msg, "NDA_DST")
                if dst is None:
                    continue
                family = IPFamily.V4 if msg["family"] == 2 else IPFamily.V6
                out.append(ARPNeighbor(
                    to_ip=IPAddress(family, dst, "32" if family is IPFamily.V4 else "128"),
                    device=device, lladdr=_attr(msg, "NDA_LLADDR") or "",
                    state=int(msg["state"]), flags=int(msg["flags"]),
                ))
            return out


# --------------------------------------------------------------------------- DNS and sysctls


def write_dns(path: Path, lines: Sequence[str]) -> None:
    """Write resolv.conf ``lines`` to ``path`` (a path the agent chose, not the host) atomically.

    An empty list writes nothing, as the 1.x agent does.
    """
    if not lines:
        return
    if len(lines) > MAX_DNS_LINES:
        raise SpecError(f"{len(lines)} DNS lines, at most {MAX_DNS_LINES}", field="dns")
    clean: list[str] = []
    for i, line in enumerate(lines):
        # A newline or NUL inside one entry would smuggle extra resolver directives.
        if any(c in line for c in "\n\r\0") or len(line) > MAX_DNS_LINE:
            raise SpecError(f"invalid DNS line {line[:64]!r}", field=f"dns[{i}]")
        clean.append(line.strip())
    text = "\n".join(clean) + "\n"
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("dns written path=%s lines=%d", path, len(clean))


def sysctl_relpath(name: str) -> str:
    """``net.ipv4.ip_forward`` or ``net/ipv4/conf/eth0.100/rp_filter`` -> a path below
    /proc/sys; only the ``net`` tree, no ``..``."""
    if "/" in name:
        parts = name.split("/")
        ok = all(_SYSCTL_COMPONENT.match(p) for p in parts)
    else:
        parts = name.split(".")
        ok = all(_SYSCTL_DOTTED.match(p) for p in parts)
    # Only the network tree: the host must not reach kernel.* or vm.* through this.
    if not ok or len(parts) < 2 or parts[0] != "net" or any(p in (".", "..") for p in parts):
        raise SpecError(f"invalid or non-network sysctl {name!r}", field=f"sysctl.{name}")
    return "/".join(parts)


def apply_sysctls(
    values: Mapping[str, str],
    *,
    proc_sys: Path = Path("/proc/sys"),
    verify_procfs: bool = True,
    syscalls: Syscalls | None = None,
) -> None:
    """Write ``net.*`` sysctls through a verified /proc/sys handle."""
    if len(values) > MAX_SYSCTLS:
        raise SpecError(f"{len(values)} sysctls, at most {MAX_SYSCTLS}", field="sysctl")
    todo: list[tuple[str, str, bytes]] = []
    for name, value in values.items():
        rel = sysctl_relpath(name)
        if "\0" in value or len(value) > MAX_SYSCTL_VALUE:
            raise SpecError(f"invalid value for {name}", field=f"sysctl.{name}")
        todo.append((name, rel, value.encode()))
    root = os.open(proc_sys, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if verify_procfs:
            sc = syscalls or Syscalls()
            # Something mounted over /proc must not receive our writes.
            if sc.fstatfs_type(root) != PROC_SUPER_MAGIC:
                raise HostError(f"{proc_sys} is not on procfs")
        for name, rel, data in todo:
            try:
                fd = safe_path.open_in_root(root, rel, os.O_WRONLY | os.O_NOFOLLOW,
                                            syscalls=syscalls)
            except FileNotFoundError:
                raise NotFoundError(f"no sysctl {name}", field=f"sysctl.{name}") from None
            except OSError as err:
                # ELOOP: a symlink where a sysctl file should be (O_NOFOLLOW refused it).
                kind = SpecError if err.errno in (errno.ELOOP, errno.ENOTDIR) else HostError
                raise kind(f"open sysctl {name}: {err.strerror}", errno=err.errno or 0,
                           field=f"sysctl.{name}") from err
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SpecError(f"{name} is not a sysctl file", field=f"sysctl.{name}")
                os.write(fd, data)
            except OSError as err:
                cls = SpecError if err.errno == errno.EINVAL else HostError
                raise cls(f"write sysctl {name}: {err.strerror}", errno=err.errno or 0) from err
            finally:
                os.close(fd)
            log.info("sysctl set name=%s value=%s", name, data.decode(errors="replace"))
    finally:
        os.close(root)
