"""grpc.AgentService network RPCs: UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes,
AddARPNeighbors.

The edge only converts: protobuf request -> dataclasses -> ``network.Network`` -> protobuf
reply. Validation and netlink live in ``kata_agent.network``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import empty_pb2

from kata_agent import network
from kata_agent.network import ARPNeighbor, Interface, IPAddress, IPFamily, Network, Route
from kata_agent.protocol import agent_pb2, types_pb2
from kata_agent.server import RpcError, StatusCode


def _family(value: int, field: str) -> IPFamily:
    try:
        return IPFamily(value)
    except ValueError:
        raise RpcError(StatusCode.INVALID_ARGUMENT,
                       f"{field}: unknown IP family {value}") from None


def address_from_pb(msg: Any, field: str) -> IPAddress:
    return IPAddress(family=_family(msg.family, f"{field}.family"), address=msg.address,
                     mask=msg.mask)


def address_to_pb(addr: IPAddress) -> Any:
    family = types_pb2.v4 if addr.family is IPFamily.V4 else types_pb2.v6
    return types_pb2.IPAddress(family=family, address=addr.address, mask=addr.mask)


def interface_from_pb(msg: Any) -> Interface:
    if len(msg.IPAddresses) > network.MAX_ADDRESSES:
        # Refused before converting: the count bound protects the conversion too.
        raise RpcError(StatusCode.INVALID_ARGUMENT,
                       f"interface.IPAddresses: more than {network.MAX_ADDRESSES} addresses")
    return Interface(
        device=msg.device, name=msg.name,
        addresses=tuple(address_from_pb(a, f"interface.IPAddresses[{i}]")
                        for i, a in enumerate(msg.IPAddresses)),
        mtu=msg.mtu, hw_addr=msg.hwAddr, pci_path=msg.pciPath, link_type=msg.type,
        raw_flags=msg.raw_flags,
    )


def interface_to_pb(iface: Interface) -> Any:
    return types_pb2.Interface(
        device=iface.device, name=iface.name,
        IPAddresses=[address_to_pb(a) for a in iface.addresses], mtu=iface.mtu,
        hwAddr=iface.hw_addr, pciPath=iface.pci_path, type=iface.link_type,
        raw_flags=iface.raw_flags,
    )


def route_from_pb(msg: Any) -> Route:
    return Route(dest=msg.dest, gateway=msg.gateway, device=msg.device, source=msg.source,
                 scope=msg.scope)


def route_to_pb(route: Route) -> Any:
    return types_pb2.Route(dest=route.dest, gateway=route.gateway, device=route.device,
                           source=route.source, scope=route.scope)


def routes_to_pb(routes: Sequence[Route]) -> Any:
    return agent_pb2.Routes(Routes=[route_to_pb(r) for r in routes])


def neighbor_from_pb(msg: Any, field: str) -> ARPNeighbor:
    to_ip = (address_from_pb(msg.toIPAddress, f"{field}.toIPAddress")
             if msg.HasField("toIPAddress") else None)
    return ARPNeighbor(to_ip=to_ip, device=msg.device, lladdr=msg.lladdr, state=msg.state,
                       flags=msg.flags)


class NetworkService:
    def __init__(self, net: Network) -> None:
        self.net = net

    def UpdateInterface(self, request: Any, context: Any) -> Any:
        if not request.HasField("interface"):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "interface is missing")
        return interface_to_pb(self.net.update_interface(interface_from_pb(request.interface)))

    def UpdateRoutes(self, request: Any, context: Any) -> Any:
        wanted = request.routes.Routes
        if len(wanted) > network.MAX_ROUTES:
            raise RpcError(StatusCode.INVALID_ARGUMENT,
                           f"routes: more than {network.MAX_ROUTES} routes")
        return routes_to_pb(self.net.update_routes([route_from_pb(r) for r in wanted]))

    def ListInterfaces(self, request: Any, context: Any) -> Any:
        return agent_pb2.Interfaces(
            Interfaces=[interface_to_pb(i) for i in self.net.list_interfaces()])

    def ListRoutes(self, request: Any, context: Any) -> Any:
        return routes_to_pb(self.net.list_routes())

    def AddARPNeighbors(self, request: Any, context: Any) -> Any:
        wanted = request.neighbors.ARPNeighbors
        if len(wanted) > network.MAX_NEIGHBORS:
            raise RpcError(StatusCode.INVALID_ARGUMENT,
                           f"neighbors: more than {network.MAX_NEIGHBORS} neighbours")
        self.net.add_arp_neighbors(
            [neighbor_from_pb(n, f"neighbors[{i}]") for i, n in enumerate(wanted)])
        return empty_pb2.Empty()
