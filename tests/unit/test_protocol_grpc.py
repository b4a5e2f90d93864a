"""gRPC paths on a real grpcio server and channel (unix socket, no network).

Checks both directions: the generated client stub reaches handlers registered
from the names table, and the generated servicer registration answers calls
made on the raw paths from the names table.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from kata_agent.protocol import agent_pb2, agent_pb2_grpc, health_pb2, health_pb2_grpc, names


@pytest.fixture
def address() -> str:
    return f"unix-abstract:kata-proto-test-{os.getpid()}-{uuid.uuid4().hex}"


def _serve(server: grpc.Server, address: str) -> Iterator[grpc.Channel]:
    assert server.add_insecure_port(address) != 0
    server.start()
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel
    finally:
        channel.close()
        server.stop(grace=None).wait(timeout=30)


def _path_handlers(seen: list[tuple[str, Any]]) -> list[grpc.GenericRpcHandler]:
    """Handlers for every method of the table; each records its path and request."""
    handlers = []
    for service, methods in names.SERVICES.items():
        table = {}
        for name, info in methods.items():
            def handle(request: Any, context: grpc.ServicerContext, info: Any = info) -> Any:
                seen.append((info.path, request))
                return info.response()

            table[name] = grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=info.request.FromString,
                response_serializer=info.response.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(service, table))
    return handlers


@pytest.fixture
def table_server(address: str) -> Iterator[tuple[grpc.Channel, list[tuple[str, Any]]]]:
    seen: list[tuple[str, Any]] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(_path_handlers(seen))
    for channel in _serve(server, address):
        yield channel, seen


def test_generated_stub_reaches_every_table_path(
    table_server: tuple[grpc.Channel, list[tuple[str, Any]]],
) -> None:
    channel, seen = table_server
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    for name, info in names.AGENT_METHODS.items():
        reply = getattr(stub, name)(info.request(), timeout=30)
        assert isinstance(reply, info.response)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.CheckRequest(), timeout=30).status == 0
    health.Version(health_pb2.CheckRequest(), timeout=30)
    assert [path for path, _ in seen] == list(names.BY_PATH)


def test_request_bytes_survive_the_round_trip(
    table_server: tuple[grpc.Channel, list[tuple[str, Any]]],
) -> None:
    channel, seen = table_server
    call = channel.unary_unary(
        "/grpc.AgentService/ReseedRandomDev",
        request_serializer=None,
        response_deserializer=None,
    )
    # Hand-made wire bytes: field 2 (bytes) = b"ab".
    assert call(b"\x12\x02ab", timeout=30) == b""
    assert seen == [
        ("/grpc.AgentService/ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=b"ab"))
    ]


class _Servicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.pidns: list[bool] = []
        self.lock = threading.Lock()

    def CreateContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.pidns.append(request.agent_pidns)
        return empty_pb2.Empty()


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def Version(self, request: Any, context: grpc.ServicerContext) -> Any:
        return health_pb2.VersionCheckResponse(grpc_version="0.0.1", agent_version="t")


def test_generated_registration_answers_the_table_paths(address: str) -> None:
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
    for channel in _serve(server, address):
        create = names.lookup("CreateContainer")
        call = channel.unary_unary(create.path, request_serializer=None,
                                   response_deserializer=None)
        assert call(b"\x0a\x01c\x40\x01", timeout=30) == b""
        assert servicer.pidns == [True]

        version = names.lookup("Health/Version")
        raw = channel.unary_unary(version.path, request_serializer=None,
                                  response_deserializer=None)(b"", timeout=30)
        assert raw == b"\x0a\x050.0.1\x12\x01t"

        # A method the servicer does not override answers UNIMPLEMENTED on its path.
        wait = names.lookup("WaitProcess")
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(wait.path)(b"", timeout=30)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
