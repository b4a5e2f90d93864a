"""RPC method table built from the service descriptors.

Maps every method of `grpc.AgentService` and `grpc.Health` to its gRPC path and
its request and response message classes. The server registers one handler
per entry, and the host CLI looks methods up by name to turn JSON into a
request and a reply back into JSON, so neither keeps its own list of RPCs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from kata_agent.protocol import agent_pb2, health_pb2

log = logging.getLogger(__name__)

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One unary RPC: where it lives on the wire and what it carries."""

    service: str
    name: str
    request: type[Message]
    response: type[Message]

    @property
    def path(self) -> str:
        """The HTTP/2 :path of the call, e.g. `/grpc.AgentService/CreateContainer`."""
        return f"/{self.service}/{self.name}"


def _service(file: FileDescriptor, full_name: str) -> ServiceDescriptor:
    package, _, short = full_name.rpartition(".")
    if file.package != package or short not in file.services_by_name:
        raise LookupError(f"service {full_name} missing from {file.name}")
    return file.services_by_name[short]


def _methods(service: ServiceDescriptor) -> Mapping[str, MethodInfo]:
    table: dict[str, MethodInfo] = {}
    for method in service.methods:
        table[method.name] = MethodInfo(
            service=service.full_name,
            name=method.name,
            request=message_factory.GetMessageClass(method.input_type),
            response=message_factory.GetMessageClass(method.output_type),
        )
    return MappingProxyType(table)


AGENT_METHODS: Mapping[str, MethodInfo] = _methods(_service(agent_pb2.DESCRIPTOR, AGENT_SERVICE))
HEALTH_METHODS: Mapping[str, MethodInfo] = _methods(_service(health_pb2.DESCRIPTOR, HEALTH_SERVICE))
SERVICES: Mapping[str, Mapping[str, MethodInfo]] = MappingProxyType(
    {AGENT_SERVICE: AGENT_METHODS, HEALTH_SERVICE: HEALTH_METHODS}
)
BY_PATH: Mapping[str, MethodInfo] = MappingProxyType(
    {m.path: m for methods in SERVICES.values() for m in methods.values()}
)


def lookup(name: str) -> MethodInfo:
    """Find a method by a name a person would type.

    Accepted forms: `CreateContainer` (an AgentService method), `Health/Check`,
    `grpc.Health/Check` and the full path `/grpc.AgentService/CreateContainer`.
    Raises KeyError for anything else.
    """
    wanted = name.strip().lstrip("/")
    service, sep, method = wanted.rpartition("/")
    if not sep:
        found = AGENT_METHODS.get(method)
    else:
        qualified = service if "." in service else f"grpc.{service}"
        found = SERVICES.get(qualified, {}).get(method)
    if found is None:
        log.debug("rpc lookup failed name=%r", name)
        raise KeyError(f"unknown RPC method: {name!r}")
    return found
