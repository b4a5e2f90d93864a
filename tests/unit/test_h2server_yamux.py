"""yamux streams served in-process: a grpcio client through a client-role bridge, the
server-role bridge feeding each stream straight into the h2 server's connections (no
backend socket, no second hop)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent.bridge import CloseReason, YamuxBridge
from kata_agent.h2server import CallContext, Route, Server, StatusCode

from tests.unit.test_h2server_grpc import DEADLINE, Waits


@dataclass
class Rig:
    channel: grpc.Channel
    host: YamuxBridge
    agent: YamuxBridge
    waits: Waits
    results: dict[str, CloseReason]


def _route(fn: Any, *, inline: bool = False) -> Route:
    return Route(deserialize=bytes, handler=fn, serialize=bytes, inline=inline)


def _fail(request: bytes, context: CallContext) -> bytes:
    context.abort(StatusCode.NOT_FOUND, "nothing here")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    waits = Waits()
    server = Server({
        "/t.S/Echo": _route(lambda r, c: r[::-1]),
        "/t.S/Inline": _route(lambda r, c: r + b"!", inline=True),
        "/t.S/Big": _route(lambda r, c: bytes(range(256)) * (3 * 1024 * 1024 // 256)),
        "/t.S/Fail": _route(_fail),
        "/t.S/Wait": _route(waits.wait),
    }, max_workers=64)
    server.start()
    front = str(tmp_path / "front.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(front)
    listener.listen(16)
    a, b = socket.socketpair()
    host = YamuxBridge(a.fileno(), "client", name="host")
    host.add_listener(listener)
    agent = YamuxBridge(b.fileno(), "server", name="agent")
    agent.serve_streams_with(server.connection, preface=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    results: dict[str, CloseReason] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("host", host.run()), daemon=True),
        threading.Thread(target=lambda: results.__setitem__("agent", agent.run()), daemon=True),
    ]
    for t in threads:
        t.start()
    channel = grpc.insecure_channel(f"unix:{front}")
    try:
        yield Rig(channel, host, agent, waits, results)
    finally:
        waits.release.set()
        channel.close()
        host.close()
        for t in threads:
            t.join(DEADLINE)
        listener.close()
        a.close()
        b.close()
        assert server.stop(grace=None).wait(DEADLINE)


def test_calls_big_replies_and_errors(rig: Rig) -> None:
    echo = rig.channel.unary_unary("/t.S/Echo")
    assert echo(b"abc", timeout=DEADLINE) == b"cba"
    big_request = bytes(range(251)) * 12000
    assert echo(big_request, timeout=DEADLINE) == big_request[::-1]
    assert rig.channel.unary_unary("/t.S/Inline")(b"hi", timeout=DEADLINE) == b"hi!"
    big = rig.channel.unary_unary("/t.S/Big")(b"", timeout=DEADLINE)
    assert big == bytes(range(256)) * (3 * 1024 * 1024 // 256)
    with pytest.raises(grpc.RpcError) as caught:
        rig.channel.unary_unary("/t.S/Fail")(b"", timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    # Served in-process: the agent side opened no backend connection.
    assert rig.agent.stats["streams_total"] == rig.host.stats["streams_total"] >= 1


def test_long_polls_cancel_and_deadline(rig: Rig) -> None:
    wait = rig.channel.unary_unary("/t.S/Wait")
    polls = [wait.future(str(i).encode(), timeout=DEADLINE) for i in range(40)]
    for _ in polls:
        assert rig.waits.entered.acquire(timeout=DEADLINE)
    cancelled = wait.future(b"cancel-me", timeout=DEADLINE)
    assert rig.waits.entered.acquire(timeout=DEADLINE)
    assert cancelled.cancel()
    assert rig.waits.cancelled_soon(b"cancel-me")
    with pytest.raises(grpc.RpcError) as caught:
        wait(b"late", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert rig.waits.cancelled_soon(b"late")
    rig.waits.release.set()
    assert [p.result(timeout=DEADLINE) for p in polls] == [str(i).encode() for i in range(40)]


def test_host_going_away_cancels_running_calls(rig: Rig) -> None:
    call = rig.channel.unary_unary("/t.S/Wait").future(b"orphan", timeout=DEADLINE)
    assert rig.waits.entered.acquire(timeout=DEADLINE)
    rig.host.close()
    assert rig.waits.cancelled_soon(b"orphan")
    with pytest.raises(grpc.RpcError):
        call.result(timeout=DEADLINE)


def test_bad_preface_resets_only_that_stream(rig: Rig, tmp_path: Path) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(tmp_path / "front.sock"))
    raw.settimeout(DEADLINE)
    raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
    received = b""
    while chunk := raw.recv(65536):  # the stream is reset: the local end reaches EOF
        received += chunk
    raw.close()
    assert received[3:4] in (b"", b"\x04")  # at most the server's SETTINGS came first
    assert rig.channel.unary_unary("/t.S/Echo")(b"ok", timeout=DEADLINE) == b"ko"
    assert rig.agent.stats["streams_refused"] >= 1
