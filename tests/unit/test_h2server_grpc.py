"""Interop: a real grpcio client against the h2 server on a unix socket.

The host side (runtime, kata-agent-ctl, proxy, tests) speaks grpcio, so every behaviour the
agent relies on is checked with it: unary calls, big messages both ways, status codes and
messages, concurrent long polls, ``future.cancel()`` and deadlines reaching the handler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent import server
from kata_agent.h2server import CallContext, Route, Server, StatusCode
from kata_agent.protocol import health_pb2, names
from kata_agent.service.health import HealthService

DEADLINE = 20.0


class Waits:
    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.cancelled: list[bytes] = []
        self.seen = threading.Condition()

    def wait(self, request: bytes, context: CallContext) -> bytes:
        done = threading.Event()

        def on_cancel() -> None:
            with self.seen:
                self.cancelled.append(request)
                self.seen.notify_all()
            done.set()

        context.add_callback(on_cancel)
        self.entered.release()
        end = time.monotonic() + DEADLINE
        while not (done.is_set() or self.release.is_set()) and time.monotonic() < end:
            done.wait(0.01)
        return request

    def cancelled_soon(self, request: bytes) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: request in self.cancelled, DEADLINE)


def _echo(request: bytes, context: CallContext) -> bytes:
    return request


def _fail(request: bytes, context: CallContext) -> bytes:
    context.abort(StatusCode(int(request.decode())), "failed: 100% \u00e9")


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def channel(tmp_path: Path, waits: Waits) -> Iterator[grpc.Channel]:
    def route(fn: Any) -> Route:
        return Route(deserialize=bytes, handler=fn, serialize=bytes)

    routes = {"/t.S/Echo": route(_echo), "/t.S/Fail": route(_fail), "/t.S/Wait": route(waits.wait)}
    routes.update(server.build_routes([HealthService()]))
    srv = Server(routes, max_workers=128)
    sock = tmp_path / "agent.sock"
    assert srv.add_insecure_port(f"unix:{sock}") == 1
    srv.start()
    ch = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield ch
    finally:
        waits.release.set()
        ch.close()
        assert srv.stop(grace=None).wait(DEADLINE)


def _unary(ch: grpc.Channel, path: str) -> Any:
    return ch.unary_unary(path)


def test_unary_and_big_messages(channel: grpc.Channel) -> None:
    echo = _unary(channel, "/t.S/Echo")
    assert echo(b"hello", timeout=DEADLINE) == b"hello"
    assert echo(b"", timeout=DEADLINE) == b""
    big = bytes(range(256)) * (3 * 1024 * 1024 // 256)
    assert echo(big, timeout=DEADLINE) == big


def test_protobuf_health_check(channel: grpc.Channel) -> None:
    info = names.SERVICES["grpc.Health"]["Check"]
    check = channel.unary_unary(info.path, request_serializer=info.request.SerializeToString,
                                response_deserializer=info.response.FromString)
    assert check(health_pb2.CheckRequest(), timeout=DEADLINE).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("code", [StatusCode.NOT_FOUND, StatusCode.OUT_OF_RANGE,
                                  StatusCode.PERMISSION_DENIED, StatusCode.INTERNAL])
def test_status_codes_and_messages(channel: grpc.Channel, code: StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/t.S/Fail")(str(int(code)).encode(), timeout=DEADLINE)
    err: Any = caught.value
    assert err.code().value[0] == int(code)
    assert err.details() == "failed: 100% \u00e9"


def test_unknown_method_and_too_big(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/t.S/Missing")(b"", timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/t.S/Echo")(b"x" * (4 * 1024 * 1024 + 1), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _unary(channel, "/t.S/Echo")(b"still", timeout=DEADLINE) == b"still"


def test_concurrent_long_polls(channel: grpc.Channel, waits: Waits) -> None:
    wait = _unary(channel, "/t.S/Wait")
    calls = [wait.future(str(i).encode(), timeout=DEADLINE) for i in range(100)]
    for _ in calls:
        assert waits.entered.acquire(timeout=DEADLINE)
    # While they all wait, short calls still get through.
    assert _unary(channel, "/t.S/Echo")(b"quick", timeout=DEADLINE) == b"quick"
    waits.release.set()
    assert [c.result(timeout=DEADLINE) for c in calls] == [str(i).encode() for i in range(100)]


def test_future_cancel_reaches_the_handler(channel: grpc.Channel, waits: Waits) -> None:
    call = _unary(channel, "/t.S/Wait").future(b"cancel-me", timeout=DEADLINE)
    assert waits.entered.acquire(timeout=DEADLINE)
    assert call.cancel()
    assert waits.cancelled_soon(b"cancel-me")
    with pytest.raises(grpc.FutureCancelledError):
        call.result()


def test_deadline_reaches_the_handler(channel: grpc.Channel, waits: Waits) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/t.S/Wait")(b"late", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert waits.cancelled_soon(b"late")


def test_many_parallel_clients(channel: grpc.Channel) -> None:
    echo = _unary(channel, "/t.S/Echo")
    with futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: echo(str(i).encode() * 1000, timeout=DEADLINE),
                            range(400)))
    assert got == [str(i).encode() * 1000 for i in range(400)]
