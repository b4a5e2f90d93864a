"""Network RPCs against the kernel: a fresh network namespace with a veth pair per test,
driven through the real gRPC server and read back with an independent netlink socket."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent import server
from kata_agent.engine.errors import NotFoundError
from kata_agent.network import NUD_PERMANENT, Interface, Network
from kata_agent.protocol import agent_pb2, names, types_pb2
from kata_agent.service.network import NetworkService
from pyroute2 import IPRoute, netns

MAC = "02:00:00:aa:bb:01"
PEER_MAC = "02:00:00:aa:bb:02"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sandbox:
    name: str
    channel: grpc.Channel

    def call(self, method: str, request: Any) -> Any:
        info = names.SERVICES["grpc.AgentService"][method]
        rpc = self.channel.unary_unary(
            f"/grpc.AgentService/{method}",
            request_serializer=info.request.SerializeToString,
            response_deserializer=info.response.FromString,
        )
        return rpc(request, timeout=30)

    def status(self, method: str, request: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            self.call(method, request)
        code: grpc.StatusCode = info.value.code()
        return code

    def ipr(self) -> IPRoute:
        return IPRoute(netns=self.name)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    name = f"kata-test-{uuid.uuid4().hex[:10]}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="v0", kind="veth", address=MAC,
                     peer={"ifname": "v1", "address": PEER_MAC})
            ipr.link("set", index=ipr.link_lookup(ifname="v1")[0], state="up")
        net = Network(netns=Path("/var/run/netns") / name)
        srv = server.build_server([NetworkService(net)], max_workers=4)
        sock = tmp_path / "agent.sock"
        assert srv.add_insecure_port(f"unix:{sock}") != 0
        srv.start()
        channel = grpc.insecure_channel(f"unix:{sock}")
        try:
            yield Sandbox(name, channel)
        finally:
            channel.close()
            srv.stop(grace=None).wait()
    finally:
        netns.remove(name)
    assert name not in netns.listnetns()


def _iface(name: str = "eth0", mtu: int = 1400, *addrs: tuple[Any, str, str],
           mac: str = MAC, flags: int = 0) -> Any:
    return types_pb2.Interface(
        name=name, mtu=mtu, hwAddr=mac, raw_flags=flags,
        IPAddresses=[types_pb2.IPAddress(family=f, address=a, mask=m) for f, a, m in addrs])


def _kernel_view(sb: Sandbox, ifname: str) -> tuple[int, int, set[str]]:
    with sb.ipr() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        link = ipr.get_links(index)[0]
        addrs = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)
                 if not a.get_attr("IFA_ADDRESS").startswith("fe80:")}
        return link.get_attr("IFLA_MTU"), link["flags"], addrs


V4, V6 = types_pb2.v4, types_pb2.v6


def test_update_interface_by_mac(sandbox: Sandbox) -> None:
    reply = sandbox.call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=_iface(
        "eth0", 1400, (V4, "10.10.0.2", "24"), (V4, "10.10.0.3", "24"), (V6, "fd10::2", "64"),
        flags=0x80)))
    assert reply.name == "eth0" and reply.mtu == 1400 and reply.hwAddr == MAC
    assert {(a.family, a.address, a.mask) for a in reply.IPAddresses} == {
        (V4, "10.10.0.2", "24"), (V4, "10.10.0.3", "24"), (V6, "fd10::2", "64")}
    mtu, flags, addrs = _kernel_view(sandbox, "eth0")
    assert mtu == 1400
    assert flags & 0x1, "link is up"
    assert flags & 0x80, "NOARP set"
    assert addrs == {"10.10.0.2/24", "10.10.0.3/24", "fd10::2/64"}

    # A second update replaces every address and renames again.
    reply = sandbox.call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("eth1", 1500, (V4, "10.20.0.2", "16"))))
    assert reply.name == "eth1"
    mtu, flags, addrs = _kernel_view(sandbox, "eth1")
    assert (mtu, addrs) == (1500, {"10.20.0.2/16"})
    listed = sandbox.call("ListInterfaces", agent_pb2.ListInterfacesRequest())
    assert {i.name for i in listed.Interfaces} == {"lo", "v1", "eth1"}


def test_update_interface_errors(sandbox: Sandbox) -> None:
    assert sandbox.status("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface(mac="02:00:00:00:00:99"))) == grpc.StatusCode.NOT_FOUND
    assert sandbox.status("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("eth0", 1400, (V4, "10.0.0.300", "24")))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert sandbox.status("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("a-name-too-long-x"))) == grpc.StatusCode.INVALID_ARGUMENT
    # The peer already holds that name: the kernel refuses, the link comes back up.
    assert sandbox.status("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("v1"))) == grpc.StatusCode.ALREADY_EXISTS
    _, flags, _ = _kernel_view(sandbox, "v0")
    assert flags & 0x1
    # Within our bounds, above what veth allows: the kernel's EINVAL is the caller's fault.
    assert sandbox.status("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("eth0", 65536))) == grpc.StatusCode.INVALID_ARGUMENT
    _, flags, _ = _kernel_view(sandbox, "eth0")
    assert flags & 0x1


def _configure(sb: Sandbox) -> None:
    sb.call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=_iface("eth0", 1500, (V4, "10.10.0.2", "24"))))


def _routes(*routes: tuple[str, str, str, int]) -> Any:
    return agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=[
        types_pb2.Route(dest=d, gateway=g, device=dev, scope=s) for d, g, dev, s in routes]))


def _table(sb: Sandbox) -> set[tuple[str, str, str]]:
    reply = sb.call("ListRoutes", agent_pb2.ListRoutesRequest())
    return {(r.dest, r.gateway, r.device) for r in reply.Routes if ":" not in r.dest}


def test_update_routes_replaces_the_table(sandbox: Sandbox) -> None:
    _configure(sandbox)
    # Given in gateway-first order: the agent adds the link route first anyway.
    reply = sandbox.call("UpdateRoutes", _routes(("", "10.10.0.1", "eth0", 0),
                                                 ("10.30.0.0/16", "", "eth0", 253)))
    got = {(r.dest, r.gateway, r.device, r.scope) for r in reply.Routes if ":" not in r.dest}
    assert ("", "10.10.0.1", "eth0", 0) in got
    assert ("10.30.0.0/16", "", "eth0", 253) in got
    assert ("10.10.0.0/24", "", "eth0", 253) in got  # the kernel's own route stays
    with sandbox.ipr() as ipr:
        default = [r for r in ipr.get_routes(table=254) if r["dst_len"] == 0]
        assert [r.get_attr("RTA_GATEWAY") for r in default] == ["10.10.0.1"]

    sandbox.call("UpdateRoutes", _routes(("10.40.0.0/16", "", "eth0", 253),
                                         ("10.50.0.0/16", "10.10.0.254", "eth0", 0)))
    assert _table(sandbox) == {("10.10.0.0/24", "", "eth0"), ("10.40.0.0/16", "", "eth0"),
                               ("10.50.0.0/16", "10.10.0.254", "eth0")}


def test_update_routes_default_without_gateway_and_empty_table(sandbox: Sandbox) -> None:
    _configure(sandbox)
    sandbox.call("UpdateRoutes", _routes(("", "", "eth0", 253)))
    assert ("", "", "eth0") in _table(sandbox)
    sandbox.call("UpdateRoutes", _routes())
    assert _table(sandbox) == {("10.10.0.0/24", "", "eth0")}


def test_update_routes_bad_input_leaves_table_alone(sandbox: Sandbox) -> None:
    _configure(sandbox)
    sandbox.call("UpdateRoutes", _routes(("10.30.0.0/16", "", "eth0", 253)))
    before = _table(sandbox)
    assert sandbox.status("UpdateRoutes", _routes(("10.31.0.0/16", "", "nosuchdev", 253))) == \
        grpc.StatusCode.NOT_FOUND
    assert sandbox.status("UpdateRoutes", _routes(("10.31.0.0/99", "", "eth0", 253))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _table(sandbox) == before
    # An unreachable gateway is refused by the kernel.
    assert sandbox.status("UpdateRoutes", _routes(("10.32.0.0/16", "192.0.2.1", "eth0", 0))) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_add_arp_neighbors(sandbox: Sandbox) -> None:
    _configure(sandbox)
    request = agent_pb2.AddARPNeighborsRequest(neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.10.0.9"),
                              device="eth0", lladdr="02:00:00:00:00:09", state=NUD_PERMANENT),
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.10.0.10"),
                              device="eth0", lladdr="02:00:00:00:00:0a"),
    ]))
    sandbox.call("AddARPNeighbors", request)
    sandbox.call("AddARPNeighbors", request)  # idempotent
    with sandbox.ipr() as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        got = {(n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"), n["state"])
               for n in ipr.get_neighbours(ifindex=index, family=2)}
    assert got == {("10.10.0.9", "02:00:00:00:00:09", NUD_PERMANENT),
                   ("10.10.0.10", "02:00:00:00:00:0a", NUD_PERMANENT)}
    bad = agent_pb2.AddARPNeighborsRequest(neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.10.0.11"),
                              device="nosuchdev")]))
    assert sandbox.status("AddARPNeighbors", bad) == grpc.StatusCode.NOT_FOUND


def test_sysctls_apply_inside_the_namespace_only(sandbox: Sandbox) -> None:
    host_value = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    code = ("from kata_agent.network import apply_sysctls;"
            "apply_sysctls({'net.ipv4.ip_forward': '1', 'net/ipv4/conf/eth0/arp_ignore': '1'});"
            "print(open('/proc/sys/net/ipv4/ip_forward').read().strip(),"
            " open('/proc/sys/net/ipv4/conf/eth0/arp_ignore').read().strip())")
    _configure(sandbox)
    out = subprocess.run(["ip", "netns", "exec", sandbox.name, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    assert out.stdout.split() == ["1", "1"]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_value


class HotplugNetwork(Network):
    """Plugs the NIC while UpdateInterface is already waiting for it."""

    def __init__(self, netns: Path, plug: Any) -> None:
        super().__init__(netns=netns, hotplug_wait=30, hotplug_poll=0.01)
        self.plug = plug
        self.polls = 0

    def _poll_wait(self, seconds: float) -> None:
        self.polls += 1
        if self.polls == 1:
            self.plug()


def test_update_interface_waits_for_a_hotplugged_nic(sandbox: Sandbox) -> None:
    late_mac = "02:00:00:aa:bb:77"

    def plug() -> None:
        with sandbox.ipr() as ipr:
            ipr.link("add", ifname="hot0", kind="veth", address=late_mac,
                     peer={"ifname": "hot1"})

    net = HotplugNetwork(Path("/var/run/netns") / sandbox.name, plug)
    reply = net.update_interface(Interface(name="eth9", hw_addr=late_mac, pci_path="02/01"))
    assert net.polls == 1
    assert reply.name == "eth9" and reply.raw_flags & 0x1

    # Without a PCI path the 1.x agent does not wait: an unknown MAC is NOT_FOUND at once.
    with pytest.raises(NotFoundError):
        net.update_interface(Interface(name="eth8", hw_addr="02:00:00:aa:bb:78"))
    assert net.polls == 1
    short = Network(netns=Path("/var/run/netns") / sandbox.name, hotplug_wait=0.05,
                    hotplug_poll=0.01)
    with pytest.raises(NotFoundError):
        short.update_interface(Interface(hw_addr="02:00:00:aa:bb:78", pci_path="02/02"))


def test_bring_up_loopback(sandbox: Sandbox) -> None:
    with sandbox.ipr() as ipr:
        assert not ipr.get_links(ipr.link_lookup(ifname="lo")[0])[0]["flags"] & 0x1
    Network(netns=Path("/var/run/netns") / sandbox.name).bring_up_loopback()
    with sandbox.ipr() as ipr:
        assert ipr.get_links(ipr.link_lookup(ifname="lo")[0])[0]["flags"] & 0x1
