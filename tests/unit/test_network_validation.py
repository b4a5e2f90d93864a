"""Network request validation, DNS and sysctl helpers (no netlink, no root)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from kata_agent import network
from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
)
from kata_agent.network import (
    ARPNeighbor,
    Interface,
    IPAddress,
    IPFamily,
    Route,
    validate_interface,
    validate_neighbor,
    validate_route,
)

V4 = IPFamily.V4
V6 = IPFamily.V6


def _iface(**kw: object) -> Interface:
    base: dict[str, object] = {"name": "eth0", "hw_addr": "02:42:AC:11:00:02", "mtu": 1500,
                               "addresses": (IPAddress(V4, "10.0.0.2", "24"),)}
    base.update(kw)
    return Interface(**base)  # type: ignore[arg-type]


def test_valid_interface_normalizes_mac() -> None:
    iface = validate_interface(_iface(addresses=(IPAddress(V4, "10.0.0.2", "24"),
                                                 IPAddress(V6, "fd00::2", "64"))))
    assert iface.hw_addr == "02:42:ac:11:00:02"
    assert iface.name == "eth0" and len(iface.addresses) == 2


@pytest.mark.parametrize("kw,field", [
    ({"hw_addr": ""}, "interface.hwAddr"),
    ({"hw_addr": "02:42:ac:11:00"}, "interface.hwAddr"),
    ({"hw_addr": "00:00:00:00:00:00"}, "interface.hwAddr"),
    ({"hw_addr": "zz:42:ac:11:00:02"}, "interface.hwAddr"),
    ({"name": "a" * 16}, "interface.name"),
    ({"name": "eth/0"}, "interface.name"),
    ({"name": "eth 0"}, "interface.name"),
    ({"name": ".."}, "interface.name"),
    ({"mtu": 67}, "interface.mtu"),
    ({"mtu": 70000}, "interface.mtu"),
    ({"addresses": (IPAddress(V4, "10.0.0.256", "24"),)}, "interface.IPAddresses[0].address"),
    ({"addresses": (IPAddress(V4, "fd00::1", "64"),)}, "interface.IPAddresses[0].family"),
    ({"addresses": (IPAddress(V4, "10.0.0.2", "33"),)}, "interface.IPAddresses[0].mask"),
    ({"addresses": (IPAddress(V4, "10.0.0.2", "255.255.255.0"),)},
     "interface.IPAddresses[0].mask"),
    ({"addresses": (IPAddress(V6, "fd00::2", "129"),)}, "interface.IPAddresses[0].mask"),
    ({"addresses": (IPAddress(V4, "10.0.0.2", "24"), IPAddress(V4, "10.0.0.2", "16"))},
     "interface.IPAddresses[1]"),
    ({"addresses": tuple(IPAddress(V4, f"10.0.{i // 250}.{i % 250 + 1}", "32")
                         for i in range(network.MAX_ADDRESSES + 1))}, "interface.IPAddresses"),
])
def test_invalid_interface(kw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_interface(_iface(**kw))
    assert info.value.field == field


def test_interface_name_may_be_left_empty() -> None:
    assert validate_interface(_iface(name="")).name == ""


def test_routes_parse_default_and_cidr() -> None:
    assert validate_route(Route(dest="default", gateway="10.0.0.1", device="eth0"), "r").dst == ""
    spec = validate_route(Route(dest="10.1.2.3/16", device="eth0", scope=253), "r")
    assert (spec.dst, spec.family, spec.scope) == ("10.1.0.0/16", 2, 253)
    v6 = validate_route(Route(dest="", gateway="fd00::1", device="eth0"), "r")
    assert v6.family == 10 and v6.gateway == "fd00::1"
    src = validate_route(Route(dest="10.0.0.0/8", source="10.0.0.2", device="eth0"), "r")
    assert src.source == "10.0.0.2"


@pytest.mark.parametrize("route,field", [
    (Route(dest="10.0.0.0/33", device="eth0"), "r.dest"),
    (Route(dest="nonsense", device="eth0"), "r.dest"),
    (Route(gateway="10.0.0", device="eth0"), "r.gateway"),
    (Route(source="x", device="eth0"), "r.source"),
    (Route(dest="10.0.0.0/8", gateway="fd00::1", device="eth0"), "r"),
    (Route(dest="10.0.0.0/8", device=""), "r.device"),
    (Route(dest="10.0.0.0/8", device="a" * 20), "r.device"),
    (Route(dest="10.0.0.0/8", device="eth0", scope=256), "r.scope"),
])
def test_invalid_routes(route: Route, field: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_route(route, "r")
    assert info.value.field == field


def test_neighbor_defaults_to_permanent() -> None:
    spec = validate_neighbor(ARPNeighbor(to_ip=IPAddress(V4, "10.0.0.9", "32"), device="eth0",
                                         lladdr="02:00:00:00:00:09"), "n")
    assert spec.state == network.NUD_PERMANENT
    assert spec.lladdr == "02:00:00:00:00:09" and spec.family == 2


@pytest.mark.parametrize("neigh,field", [
    (ARPNeighbor(to_ip=None, device="eth0"), "n.toIPAddress"),
    (ARPNeighbor(to_ip=IPAddress(V4, "bad", "32"), device="eth0"), "n.toIPAddress.address"),
    (ARPNeighbor(to_ip=IPAddress(V4, "10.0.0.9", ""), device="eth0", lladdr="x"), "n.lladdr"),
    (ARPNeighbor(to_ip=IPAddress(V4, "10.0.0.9", ""), device="eth0", state=-1), "n.state"),
    (ARPNeighbor(to_ip=IPAddress(V4, "10.0.0.9", ""), device="eth0", flags=256), "n.flags"),
    (ARPNeighbor(to_ip=IPAddress(V4, "10.0.0.9", ""), device=""), "n.device"),
])
def test_invalid_neighbors(neigh: ARPNeighbor, field: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_neighbor(neigh, "n")
    assert info.value.field == field


def test_count_bounds_checked_before_any_netlink() -> None:
    net = network.Network(netns=Path("/nonexistent/netns"))
    with pytest.raises(SpecError):
        net.update_routes([Route(dest="10.0.0.0/8", device="eth0")] * (network.MAX_ROUTES + 1))
    with pytest.raises(SpecError):
        net.add_arp_neighbors([ARPNeighbor(to_ip=None, device="eth0")]
                              * (network.MAX_NEIGHBORS + 1))
    with pytest.raises(SpecError):
        net.update_interface(_iface(hw_addr="bad"))


# ---------------------------------------------------------------- DNS


def test_write_dns(tmp_path: Path) -> None:
    target = tmp_path / "sandbox/resolv.conf"
    network.write_dns(target, ["nameserver 10.0.0.1 ", " search example.com"])
    assert target.read_text() == "nameserver 10.0.0.1\nsearch example.com\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["resolv.conf"]


def test_write_dns_empty_writes_nothing(tmp_path: Path) -> None:
    network.write_dns(tmp_path / "resolv.conf", [])
    assert not (tmp_path / "resolv.conf").exists()


@pytest.mark.parametrize("lines", [["nameserver 1.1.1.1\noptions evil"], ["a\0b"],
                                   ["x" * 2000], ["nameserver 1.1.1.1"] * 65])
def test_write_dns_rejects(tmp_path: Path, lines: list[str]) -> None:
    with pytest.raises(SpecError):
        network.write_dns(tmp_path / "resolv.conf", lines)
    assert not (tmp_path / "resolv.conf").exists()


# ---------------------------------------------------------------- sysctls


@pytest.mark.parametrize("name,rel", [
    ("net.ipv4.ip_forward", "net/ipv4/ip_forward"),
    ("net/ipv4/conf/eth0.100/rp_filter", "net/ipv4/conf/eth0.100/rp_filter"),
    ("net.core.somaxconn", "net/core/somaxconn"),
])
def test_sysctl_names(name: str, rel: str) -> None:
    assert network.sysctl_relpath(name) == rel


@pytest.mark.parametrize("name", [
    "kernel.core_pattern", "net", "net..ipv4", "net/../kernel/core_pattern", "net/./x",
    "net.ipv4/x", "vm.overcommit_memory", "net.ipv4.ip_forward\0", "/net/ipv4/ip_forward",
    "net/ipv4/", "",
])
def test_sysctl_names_refused(name: str) -> None:
    with pytest.raises(SpecError):
        network.sysctl_relpath(name)


@pytest.fixture
def fake_proc_sys(tmp_path: Path) -> Path:
    root = tmp_path / "proc-sys"
    (root / "net/ipv4").mkdir(parents=True)
    (root / "net/ipv4/ip_forward").write_text("0\n")
    return root


def test_apply_sysctls_writes_values(fake_proc_sys: Path) -> None:
    network.apply_sysctls({"net.ipv4.ip_forward": "1"}, proc_sys=fake_proc_sys,
                          verify_procfs=False)
    assert (fake_proc_sys / "net/ipv4/ip_forward").read_text().startswith("1")


def test_apply_sysctls_unknown_name(fake_proc_sys: Path) -> None:
    with pytest.raises(NotFoundError):
        network.apply_sysctls({"net.ipv4.nope": "1"}, proc_sys=fake_proc_sys,
                              verify_procfs=False)


def test_apply_sysctls_symlink_stays_in_root(fake_proc_sys: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("safe")
    os.symlink(str(victim), fake_proc_sys / "net/ipv4/evil")
    with pytest.raises(SpecError):
        network.apply_sysctls({"net.ipv4.evil": "1"}, proc_sys=fake_proc_sys,
                              verify_procfs=False)
    assert victim.read_text() == "safe"


def test_apply_sysctls_refuses_a_non_procfs_root(fake_proc_sys: Path) -> None:
    with pytest.raises(HostError, match="not on procfs"):
        network.apply_sysctls({"net.ipv4.ip_forward": "1"}, proc_sys=fake_proc_sys)
    assert (fake_proc_sys / "net/ipv4/ip_forward").read_text() == "0\n"


def test_apply_sysctls_validates_all_before_writing(fake_proc_sys: Path) -> None:
    with pytest.raises(SpecError):
        network.apply_sysctls({"net.ipv4.ip_forward": "1", "kernel.x": "1"},
                              proc_sys=fake_proc_sys, verify_procfs=False)
    assert (fake_proc_sys / "net/ipv4/ip_forward").read_text() == "0\n"


@pytest.mark.parametrize("code,kind", [
    (errno.EEXIST, AlreadyExistsError), (errno.ENODEV, NotFoundError),
    (errno.ESRCH, NotFoundError), (errno.EINVAL, SpecError), (errno.ENETUNREACH, SpecError),
    (errno.EPERM, HostError), (errno.EBUSY, HostError),
])
def test_netlink_errors_map_to_engine_errors(code: int, kind: type[EngineError]) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    err = network._netlink_error(NetlinkError(code), "set link")
    assert type(err) is kind
    assert err.errno == code and str(err).startswith("set link: ")
