"""A real grpcio server and channel talking through a client bridge and a server bridge."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from kata_agent.bridge import CloseReason, YamuxBridge


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request[::-1]


@pytest.fixture
def grpc_backend(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "grpc.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Reverse": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    yield path
    server.stop(None)


def test_unary_calls_through_two_bridges(grpc_backend: str, tmp_path: Path) -> None:
    front = str(tmp_path / "front.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(front)
    listener.listen(16)
    a, b = socket.socketpair()
    client = YamuxBridge(a.fileno(), "client", ping_interval=1.0, name="host")
    client.add_listener(listener)
    server = YamuxBridge(b.fileno(), "server", name="agent")
    server.serve_streams_to(grpc_backend)
    results: dict[str, CloseReason] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("c", client.run()), daemon=True),
        threading.Thread(target=lambda: results.__setitem__("s", server.run()), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        with grpc.insecure_channel(f"unix:{front}") as channel:
            call = channel.unary_unary("/test.Echo/Reverse")
            grpc.channel_ready_future(channel).result(timeout=20)
            big = bytes(range(256)) * 4096  # 1 MiB: several windows' worth
            assert call(big, timeout=20) == big[::-1]
            times = []
            for i in range(200):
                msg = f"call {i}".encode()
                t0 = time.perf_counter()
                assert call(msg, timeout=20) == msg[::-1]
                times.append(time.perf_counter() - t0)
        assert client.stats["streams_total"] >= 1
        assert server.stats["streams_total"] == client.stats["streams_total"]
        # recorded for the report; the budget is generous so that a loaded machine passes
        assert statistics.median(times) < 0.25
    finally:
        client.close()
        for t in threads:
            t.join(20)
        listener.close()
        a.close()
        b.close()
    assert results["c"] is CloseReason.CLOSED
    assert results["s"] is CloseReason.GOAWAY_RECEIVED
