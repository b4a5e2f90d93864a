"""Network RPC edge: protobuf <-> dataclass conversion and statuses.

The recording fake checks what the edge hands to ``Network``; the real netlink path of the
same RPCs runs in tests/privileged/test_network_netns.py. ListInterfaces/ListRoutes also run
here for real (a netlink dump needs no privilege).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent import server
from kata_agent.network import ARPNeighbor, Interface, IPAddress, IPFamily, Network, Route
from kata_agent.protocol import agent_pb2, names, types_pb2
from kata_agent.service import network as svc
from kata_agent.service.network import NetworkService


class RecordingNetwork(Network):
    """Records requests; answers with what a kernel would report."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def update_interface(self, request: Interface) -> Interface:
        self.calls.append(("update_interface", request))
        return request

    def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        self.calls.append(("update_routes", list(routes)))
        return list(routes)

    def add_arp_neighbors(self, neighbors: Sequence[ARPNeighbor]) -> None:
        self.calls.append(("add_arp_neighbors", list(neighbors)))


def _rpc(channel: grpc.Channel, method: str) -> Any:
    info = names.SERVICES["grpc.AgentService"][method]
    return channel.unary_unary(f"/grpc.AgentService/{method}",
                               request_serializer=info.request.SerializeToString,
                               response_deserializer=info.response.FromString)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[grpc.Channel, RecordingNetwork]]:
    net = RecordingNetwork()
    srv = server.build_server([NetworkService(net)], max_workers=4)
    sock = tmp_path / "agent.sock"
    assert srv.add_insecure_port(f"unix:{sock}") != 0
    srv.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield channel, net
    finally:
        channel.close()
        srv.stop(grace=None).wait()


def _pb_iface() -> Any:
    return types_pb2.Interface(
        device="tap0_kata", name="eth0", mtu=1450, hwAddr="02:00:ca:fe:00:01",
        pciPath="01/02", type="tap", raw_flags=0x80,
        IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address="172.16.0.2", mask="16"),
                     types_pb2.IPAddress(family=types_pb2.v6, address="fd00::2", mask="64")])


def test_interface_conversion_round_trip() -> None:
    iface = svc.interface_from_pb(_pb_iface())
    assert iface.addresses == (IPAddress(IPFamily.V4, "172.16.0.2", "16"),
                               IPAddress(IPFamily.V6, "fd00::2", "64"))
    assert (iface.hw_addr, iface.pci_path, iface.link_type, iface.raw_flags) == (
        "02:00:ca:fe:00:01", "01/02", "tap", 0x80)
    assert svc.interface_to_pb(iface) == _pb_iface()


def test_update_interface_passes_dataclasses(
    served: tuple[grpc.Channel, RecordingNetwork]
) -> None:
    channel, net = served
    reply = _rpc(channel, "UpdateInterface")(
        agent_pb2.UpdateInterfaceRequest(interface=_pb_iface()), timeout=10)
    assert reply == _pb_iface()
    assert net.calls[0][0] == "update_interface"
    assert net.calls[0][1].name == "eth0"


def test_update_interface_statuses(served: tuple[grpc.Channel, RecordingNetwork]) -> None:
    channel, net = served
    bad_family = _pb_iface()
    bad_family.IPAddresses[0].family = 7  # an open enum: any number arrives
    for request in (agent_pb2.UpdateInterfaceRequest(),
                    agent_pb2.UpdateInterfaceRequest(interface=bad_family)):
        with pytest.raises(grpc.RpcError) as info:
            _rpc(channel, "UpdateInterface")(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert net.calls == []


def test_update_routes_and_neighbors_conversion(
    served: tuple[grpc.Channel, RecordingNetwork]
) -> None:
    channel, net = served
    routes = agent_pb2.Routes(Routes=[
        types_pb2.Route(dest="172.16.0.0/16", device="eth0", scope=253),
        types_pb2.Route(gateway="172.16.0.1", device="eth0", source="172.16.0.2")])
    reply = _rpc(channel, "UpdateRoutes")(agent_pb2.UpdateRoutesRequest(routes=routes),
                                          timeout=10)
    assert reply == routes
    assert net.calls[-1] == ("update_routes", [
        Route(dest="172.16.0.0/16", device="eth0", scope=253),
        Route(gateway="172.16.0.1", device="eth0", source="172.16.0.2")])
    neigh = types_pb2.ARPNeighbor(
        toIPAddress=types_pb2.IPAddress(address="172.16.0.9"), device="eth0",
        lladdr="02:00:00:00:00:09", state=0x80)
    _rpc(channel, "AddARPNeighbors")(agent_pb2.AddARPNeighborsRequest(
        neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[neigh, types_pb2.ARPNeighbor()])),
        timeout=10)
    assert net.calls[-1] == ("add_arp_neighbors", [  # type: ignore[comparison-overlap]
        ARPNeighbor(to_ip=IPAddress(IPFamily.V4, "172.16.0.9", ""), device="eth0",
                    lladdr="02:00:00:00:00:09", state=0x80),
        ARPNeighbor(to_ip=None)])


def test_repeated_field_bounds(served: tuple[grpc.Channel, RecordingNetwork]) -> None:
    channel, net = served
    many = agent_pb2.Routes(Routes=[types_pb2.Route(device="eth0")] * 600)
    with pytest.raises(grpc.RpcError) as info:
        _rpc(channel, "UpdateRoutes")(agent_pb2.UpdateRoutesRequest(routes=many), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert net.calls == []


def test_real_network_rejects_bad_mac_before_netlink(tmp_path: Path) -> None:
    srv = server.build_server([NetworkService(Network())], max_workers=2)
    sock = tmp_path / "a.sock"
    srv.add_insecure_port(f"unix:{sock}")
    srv.start()
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            iface = _pb_iface()
            iface.hwAddr = "not-a-mac"
            with pytest.raises(grpc.RpcError) as info:
                _rpc(channel, "UpdateInterface")(
                    agent_pb2.UpdateInterfaceRequest(interface=iface), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "hwAddr" in info.value.details()
            # A netlink dump needs no privilege: the host's own links and routes.
            links = _rpc(channel, "ListInterfaces")(agent_pb2.ListInterfacesRequest(), timeout=10)
            assert "lo" in [i.name for i in links.Interfaces]
            routes = _rpc(channel, "ListRoutes")(agent_pb2.ListRoutesRequest(), timeout=10)
            assert all(r.device for r in routes.Routes)
    finally:
        srv.stop(grace=None).wait()
