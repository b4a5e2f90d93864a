"""The gRPC server over a real unix socket: every RPC registered, errors mapped at one edge."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent import __version__, server
from kata_agent.engine.errors import (
    AlreadyExistsError,
    HostError,
    NotFoundError,
    SpecError,
    StateError,
)
from kata_agent.protocol import agent_pb2, health_pb2, names
from kata_agent.service.health import HealthService


class RaisingService:
    """Answers a few RPCs by raising what the engine raises."""

    def __init__(self) -> None:
        self.errors: dict[str, BaseException] = {}

    def _raise(self, method: str) -> Any:
        raise self.errors[method]

    def StartContainer(self, request: Any, context: Any) -> Any:
        return self._raise("StartContainer")

    def RemoveContainer(self, request: Any, context: Any) -> Any:
        return self._raise("RemoveContainer")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[grpc.Channel, RaisingService]]:
    raising = RaisingService()
    srv = server.build_server([HealthService(), raising], max_workers=4)
    sock = tmp_path / "agent.sock"
    assert srv.add_insecure_port(f"unix:{sock}") != 0
    srv.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield channel, raising
    finally:
        channel.close()
        srv.stop(grace=None).wait()


def _rpc(channel: grpc.Channel, service: str, method: str) -> Any:
    info = names.SERVICES[service][method]
    return channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=info.request.SerializeToString,
        response_deserializer=info.response.FromString,
    )


def test_health_check_serving_and_version(served: tuple[grpc.Channel, RaisingService]) -> None:
    channel, _ = served
    reply = _rpc(channel, "grpc.Health", "Check")(health_pb2.CheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    version = _rpc(channel, "grpc.Health", "Version")(health_pb2.CheckRequest(), timeout=10)
    assert version.agent_version == __version__
    assert version.grpc_version == "0.0.1"


def test_every_agent_rpc_is_registered(served: tuple[grpc.Channel, RaisingService]) -> None:
    channel, _ = served
    methods = names.SERVICES["grpc.AgentService"]
    assert len(methods) == 32
    answered = 0
    for method, info in methods.items():
        if method in ("StartContainer", "RemoveContainer"):
            continue
        with pytest.raises(grpc.RpcError) as caught:
            _rpc(channel, "grpc.AgentService", method)(info.request(), timeout=10)
        # UNIMPLEMENTED from our handler carries our message; an unregistered method would
        # get grpcio's generic "Method not found!" instead.
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert f"/grpc.AgentService/{method} is not implemented" in caught.value.details()
        answered += 1
    assert answered == 30


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            SpecError("bad limit", field="linux.resources.memory.limit"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (NotFoundError("no container abc"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExistsError("abc exists"), grpc.StatusCode.ALREADY_EXISTS),
        (StateError("abc is not created"), grpc.StatusCode.FAILED_PRECONDITION),
        (HostError("mount failed", errno=5), grpc.StatusCode.INTERNAL),
        (server.RpcError(server.StatusCode.OUT_OF_RANGE, "EOF"), grpc.StatusCode.OUT_OF_RANGE),
        (ZeroDivisionError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_become_statuses(
    served: tuple[grpc.Channel, RaisingService],
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    code: grpc.StatusCode,
) -> None:
    channel, raising = served
    raising.errors["StartContainer"] = error
    with (
        caplog.at_level(logging.WARNING, logger="kata_agent.server"),
        pytest.raises(grpc.RpcError) as caught,
    ):
        _rpc(channel, "grpc.AgentService", "StartContainer")(
            agent_pb2.StartContainerRequest(container_id="abc"), timeout=10
        )
    assert caught.value.code() == code
    assert str(error) in caught.value.details()
    assert "method=/grpc.AgentService/StartContainer" in caplog.text
    # The server keeps serving after any error.
    reply = _rpc(channel, "grpc.Health", "Check")(health_pb2.CheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_spec_error_names_the_field() -> None:
    code, msg = server.status_for(SpecError("must be positive", field="linux.resources.pids.limit"))
    assert code is server.StatusCode.INVALID_ARGUMENT
    assert msg == "linux.resources.pids.limit: must be positive"


def test_an_engine_timeout_is_deadline_exceeded() -> None:
    code, msg = server.status_for(HostError("timeout after 3s waiting for device 0000:00:05.0",
                                            errno=errno.ETIMEDOUT))
    assert code is server.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for device" in msg
    other, _ = server.status_for(HostError("mount failed", errno=errno.EIO))
    assert other is server.StatusCode.INTERNAL


def test_implemented_methods_lists_services() -> None:
    table = server.implemented_methods([HealthService(), RaisingService()])
    assert table["grpc.Health"] == ["Check", "Version"]
    assert sorted(table["grpc.AgentService"]) == ["RemoveContainer", "StartContainer"]
