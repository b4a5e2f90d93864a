"""The method table in kata_agent.protocol.names."""

from __future__ import annotations

import pytest
from google.protobuf import empty_pb2, json_format
from kata_agent.protocol import agent_pb2, health_pb2, names, types_pb2


def test_agent_table_covers_every_method_of_the_service() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert list(names.AGENT_METHODS) == [m.name for m in service.methods]
    assert len(names.AGENT_METHODS) == 32
    for name, info in names.AGENT_METHODS.items():
        method = service.methods_by_name[name]
        assert info.name == name
        assert info.service == "grpc.AgentService"
        assert info.request.DESCRIPTOR.full_name == method.input_type.full_name
        assert info.response.DESCRIPTOR.full_name == method.output_type.full_name


def test_table_holds_the_generated_classes() -> None:
    create = names.AGENT_METHODS["CreateContainer"]
    assert create.request is agent_pb2.CreateContainerRequest
    assert create.response is empty_pb2.Empty
    assert names.AGENT_METHODS["UpdateInterface"].response is types_pb2.Interface
    assert names.AGENT_METHODS["ReadStderr"].request is agent_pb2.ReadStreamRequest
    assert names.HEALTH_METHODS["Version"].response is health_pb2.VersionCheckResponse


def test_health_table() -> None:
    assert {n: (i.request, i.response) for n, i in names.HEALTH_METHODS.items()} == {
        "Check": (health_pb2.CheckRequest, health_pb2.HealthCheckResponse),
        "Version": (health_pb2.CheckRequest, health_pb2.VersionCheckResponse),
    }


def test_services_and_paths() -> None:
    assert list(names.SERVICES) == ["grpc.AgentService", "grpc.Health"]
    assert names.AGENT_METHODS["CopyFile"].path == "/grpc.AgentService/CopyFile"
    assert names.HEALTH_METHODS["Check"].path == "/grpc.Health/Check"
    assert len(names.BY_PATH) == 34
    assert all(path == info.path for path, info in names.BY_PATH.items())


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        names.AGENT_METHODS["Extra"] = names.AGENT_METHODS["CopyFile"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("typed", "path"),
    [
        ("CreateContainer", "/grpc.AgentService/CreateContainer"),
        (" GetOOMEvent ", "/grpc.AgentService/GetOOMEvent"),
        ("AgentService/ListRoutes", "/grpc.AgentService/ListRoutes"),
        ("grpc.AgentService/ListRoutes", "/grpc.AgentService/ListRoutes"),
        ("/grpc.AgentService/WaitProcess", "/grpc.AgentService/WaitProcess"),
        ("Health/Check", "/grpc.Health/Check"),
        ("/grpc.Health/Version", "/grpc.Health/Version"),
    ],
)
def test_lookup_accepts_the_usual_spellings(typed: str, path: str) -> None:
    assert names.lookup(typed).path == path


@pytest.mark.parametrize(
    "typed",
    ["", "Check", "createcontainer", "Health/CreateContainer", "grpc.health.v1.Health/Check",
     "AgentService/", "Nope/CreateContainer", "GetMetrics"],
)
def test_lookup_rejects_unknown_names(typed: str) -> None:
    with pytest.raises(KeyError):
        names.lookup(typed)


def test_json_request_through_the_table() -> None:
    # The generic CLI path: method name -> request class -> JSON -> wire bytes.
    info = names.lookup("CreateContainer")
    request = json_format.Parse('{"container_id": "c", "agent_pidns": true}', info.request())
    assert request.SerializeToString() == b"\x0a\x01c\x40\x01"
    camel = json_format.Parse('{"containerId": "c", "agentPidns": true}', info.request())
    assert camel == request
    reply = info.response.FromString(b"")
    assert json_format.MessageToJson(reply) == "{}"
