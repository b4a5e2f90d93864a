"""The HTTP/2 gRPC server at the protocol level: h2 as a raw client over a socketpair.

Each test drives a real ``h2server.Server`` (its I/O thread, worker pool and h2 state
machine) with frames built by a client-side ``H2Connection``, so framing, trailers,
flow control, cancellation and hostile input are checked byte for byte.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import HeadersFrame, SettingsFrame
from kata_agent import h2server
from kata_agent.h2server import CallContext, Route, Server, StatusCode

DEADLINE = 20.0
BIG = 3 * 1024 * 1024


def frame(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


class Handlers:
    """Test methods; ``waiting`` calls block until released or cancelled."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.cancelled: list[str] = []
        self.cancel_seen = threading.Condition()
        self.finished = 0

    def echo(self, request: bytes, context: CallContext) -> bytes:
        return request

    def big(self, request: bytes, context: CallContext) -> bytes:
        return bytes(range(256)) * (BIG // 256)

    def fail(self, request: bytes, context: CallContext) -> bytes:
        context.abort(StatusCode.NOT_FOUND, "no container 100% é\nnext")

    def crash(self, request: bytes, context: CallContext) -> bytes:
        raise ZeroDivisionError("boom")

    def wait(self, request: bytes, context: CallContext) -> bytes:
        done = threading.Event()

        def on_cancel() -> None:
            with self.cancel_seen:
                self.cancelled.append(request.decode())
                self.cancel_seen.notify_all()
            done.set()

        assert context.add_callback(on_cancel)
        self.entered.release()
        end = time.monotonic() + DEADLINE
        while not done.is_set() and not self.release.is_set() and time.monotonic() < end:
            done.wait(0.01)
        self.finished += 1
        return request

    def wait_cancelled(self, name: str, timeout: float = DEADLINE) -> bool:
        with self.cancel_seen:
            return self.cancel_seen.wait_for(lambda: name in self.cancelled, timeout)

    def routes(self) -> dict[str, Route]:
        def route(fn: Callable[[bytes, CallContext], bytes]) -> Route:
            return Route(deserialize=bytes, handler=fn, serialize=bytes)

        return {
            "/t.S/Echo": route(self.echo), "/t.S/Big": route(self.big),
            "/t.S/Fail": route(self.fail), "/t.S/Crash": route(self.crash),
            "/t.S/Wait": route(self.wait),
        }


@dataclass
class StreamResult:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    def status(self) -> int:
        found = dict(self.trailers or self.headers).get(b"grpc-status")
        assert found is not None, (self.headers, self.trailers)
        return int(found)

    def message(self) -> bytes:
        return dict(self.trailers or self.headers).get(b"grpc-message", b"")


class RawClient:
    """A client-side H2Connection on one end of a socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(0.05)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, StreamResult] = {}
        self.closed = False
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.pings = 0

    def start(self) -> None:
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            # Reads poll with a short timeout; a send may wait for a busy server.
            self.sock.settimeout(DEADLINE)
            self.sock.sendall(data)
            self.sock.settimeout(0.05)

    def open(self, path: str, *, extra: list[tuple[bytes, bytes]] | None = None,
             method: bytes = b"POST", content_type: bytes = b"application/grpc",
             end_stream: bool = False) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", b"agent"), (b"content-type", content_type),
                   (b"te", b"trailers"), *(extra or [])]
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        self.streams[sid] = StreamResult()
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, *, end_stream: bool = True) -> None:
        """Send within the windows, pumping events while they are closed."""
        sent = 0
        while sent < len(data):
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size,
                       len(data) - sent)
            if room <= 0:
                self.pump()
                continue
            self.h2.send_data(sid, data[sent:sent + room])
            sent += room
            self.flush()
        if end_stream:
            self.h2.end_stream(sid)
            self.flush()

    def call(self, path: str, payload: bytes, **kw: Any) -> StreamResult:
        sid = self.open(path, **kw)
        self.send(sid, frame(payload))
        return self.wait(sid)

    def pump(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        except OSError:
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        for ev in self.h2.receive_data(data):
            self.on_event(ev)
        self.flush()

    def on_event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        result = self.streams.get(sid or 0)
        if isinstance(ev, h2.events.ResponseReceived) and result is not None:
            result.headers = list(ev.headers or [])
        elif isinstance(ev, h2.events.TrailersReceived) and result is not None:
            result.trailers = list(ev.headers or [])
        elif isinstance(ev, h2.events.DataReceived):
            if result is not None:
                result.data += ev.data or b""
            self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid or 0)
        elif isinstance(ev, h2.events.StreamEnded) and result is not None:
            result.ended = True
        elif isinstance(ev, h2.events.StreamReset) and result is not None:
            result.reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev
        elif isinstance(ev, h2.events.PingAckReceived):
            self.pings += 1

    def until(self, cond: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + DEADLINE
        while not cond():
            if self.closed:
                raise AssertionError(f"connection closed while waiting for {what}")
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            self.pump()

    def wait(self, sid: int) -> StreamResult:
        result = self.streams[sid]
        self.until(lambda: result.ended or result.reset is not None, f"stream {sid}")
        return result


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def srv(handlers: Handlers) -> Iterator[Server]:
    server = Server(handlers.routes(), max_workers=64, max_message_bytes=4 * 1024 * 1024)
    server.start()
    try:
        yield server
    finally:
        handlers.release.set()
        assert server.stop(grace=None).wait(DEADLINE)


def connect(server: Server) -> RawClient:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.serve_socket(theirs)
    client = RawClient(ours)
    client.start()
    return client


@pytest.fixture
def client(srv: Server) -> Iterator[RawClient]:
    c = connect(srv)
    try:
        yield c
    finally:
        c.sock.close()


def test_unary_reply_framing(client: RawClient) -> None:
    result = client.call("/t.S/Echo", b"hello")
    assert dict(result.headers)[b":status"] == b"200"
    assert dict(result.headers)[b"content-type"] == b"application/grpc"
    assert bytes(result.data) == frame(b"hello")
    assert result.trailers and dict(result.trailers)[b"grpc-status"] == b"0"
    assert result.reset is None


def test_error_is_trailers_only_and_percent_encoded(client: RawClient) -> None:
    result = client.call("/t.S/Fail", b"")
    assert result.trailers == []  # a single HEADERS frame ended the stream
    assert dict(result.headers)[b":status"] == b"200"
    assert result.status() == StatusCode.NOT_FOUND
    assert result.message() == b"no container 100%25 %C3%A9%0Anext"
    assert result.data == b""


def test_handler_exception_is_unknown(client: RawClient) -> None:
    result = client.call("/t.S/Crash", b"")
    assert result.status() == StatusCode.UNKNOWN
    assert b"ZeroDivisionError" in result.message()


def test_unknown_method_is_unimplemented(client: RawClient) -> None:
    result = client.call("/t.S/Nope", b"x")
    assert result.status() == StatusCode.UNIMPLEMENTED
    assert b"/t.S/Nope" in result.message()
    # The connection is still good.
    assert client.call("/t.S/Echo", b"again").data == frame(b"again")


def test_not_post_and_not_grpc(client: RawClient) -> None:
    sid = client.open("/t.S/Echo", method=b"GET", end_stream=True)
    assert dict(client.wait(sid).headers)[b":status"] == b"405"
    sid = client.open("/t.S/Echo", content_type=b"text/plain")
    assert dict(client.wait(sid).headers)[b":status"] == b"415"
    assert client.call("/t.S/Echo", b"ok").data == frame(b"ok")


def test_oversized_message_is_refused_early(client: RawClient) -> None:
    sid = client.open("/t.S/Echo")
    # Only the prefix: the server must not wait for 5 MiB to refuse it.
    client.send(sid, b"\x00" + (5 * 1024 * 1024).to_bytes(4, "big"), end_stream=False)
    result = client.wait(sid)
    assert result.status() == StatusCode.RESOURCE_EXHAUSTED
    client.until(lambda: result.reset is not None, "RST_STREAM after the early reply")
    assert result.reset == h2.errors.ErrorCodes.NO_ERROR
    assert client.call("/t.S/Echo", b"small").data == frame(b"small")


def test_compressed_flag_is_unimplemented(client: RawClient) -> None:
    sid = client.open("/t.S/Echo", extra=[(b"grpc-encoding", b"gzip")])
    client.send(sid, frame(b"\x1f\x8b", flag=1))
    result = client.wait(sid)
    assert result.status() == StatusCode.UNIMPLEMENTED
    assert b"compressed" in result.message()


def test_two_messages_or_none_are_internal(client: RawClient) -> None:
    sid = client.open("/t.S/Echo")
    client.send(sid, frame(b"a") + frame(b"b"))
    assert client.wait(sid).status() == StatusCode.INTERNAL
    sid = client.open("/t.S/Echo", end_stream=True)
    assert client.wait(sid).status() == StatusCode.INTERNAL
    sid = client.open("/t.S/Echo")
    client.send(sid, frame(b"abc")[:-1])  # truncated message
    assert client.wait(sid).status() == StatusCode.INTERNAL


def test_rst_stream_cancels_the_handler(client: RawClient, handlers: Handlers) -> None:
    sid = client.open("/t.S/Wait")
    client.send(sid, frame(b"rst"))
    assert handlers.entered.acquire(timeout=DEADLINE)
    client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    assert handlers.wait_cancelled("rst")
    # Its late reply is dropped; the connection still serves.
    assert client.call("/t.S/Echo", b"after").data == frame(b"after")
    assert not client.streams[sid].ended


def test_grpc_timeout_cancels_and_answers_deadline_exceeded(
        client: RawClient, handlers: Handlers) -> None:
    started = time.monotonic()
    result = client.call("/t.S/Wait", b"slow", extra=[(b"grpc-timeout", b"200m")])
    assert result.status() == StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started >= 0.19
    assert handlers.wait_cancelled("slow")


def test_bad_grpc_timeout_is_ignored(client: RawClient) -> None:
    result = client.call("/t.S/Echo", b"t", extra=[(b"grpc-timeout", b"123456789S")])
    assert result.status() == StatusCode.OK


def test_flow_control_three_mib_each_way(client: RawClient) -> None:
    payload = bytes(range(251)) * (BIG // 251)
    # The client's default 64 KiB stream window forces the server to wait for updates.
    assert client.h2.local_settings.initial_window_size == 65535
    result = client.call("/t.S/Echo", payload)
    assert result.status() == StatusCode.OK
    assert bytes(result.data) == frame(payload)
    big = client.call("/t.S/Big", b"")
    assert len(big.data) == 5 + BIG and big.status() == StatusCode.OK


def test_ping_is_acked(client: RawClient) -> None:
    client.h2.ping(b"12345678")
    client.flush()
    client.until(lambda: client.pings == 1, "PING ack")


def test_garbage_preface_closes_only_that_connection(srv: Server) -> None:
    ours, theirs = socket.socketpair()
    srv.serve_socket(theirs)
    ours.sendall(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n" + b"\x00" * 64)
    ours.settimeout(DEADLINE)
    received = b""
    while chunk := ours.recv(65536):  # a hang here times out: the server must close
        received += chunk
    ours.close()
    assert received[3:4] == b"\x04"  # its SETTINGS went out before the preface was read
    good = connect(srv)
    assert good.call("/t.S/Echo", b"alive").data == frame(b"alive")


def test_invalid_frame_gets_goaway(client: RawClient, srv: Server) -> None:
    # A DATA frame on stream 0 is a connection error.
    client.sock.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"x")
    client.until(lambda: client.goaway is not None or client.closed, "GOAWAY")
    good = connect(srv)
    assert good.call("/t.S/Echo", b"alive").data == frame(b"alive")


def test_huge_headers_close_the_connection(client: RawClient, srv: Server) -> None:
    sid = client.open("/t.S/Echo", extra=[(b"x-big", b"v" * 60000)])
    client.until(lambda: client.goaway is not None or client.closed
                 or client.streams[sid].reset is not None, "refusal of huge headers")
    good = connect(srv)
    assert good.call("/t.S/Echo", b"alive").data == frame(b"alive")


def test_many_streams_each_answered(client: RawClient, handlers: Handlers) -> None:
    sids = []
    for i in range(200):
        sid = client.open("/t.S/Wait")
        client.send(sid, frame(str(i).encode()))
        sids.append(sid)
    # 64 workers: that many calls run, the rest wait for a free worker.
    for _ in range(64):
        assert handlers.entered.acquire(timeout=DEADLINE)
    assert not handlers.entered.acquire(timeout=0.2)
    handlers.release.set()
    for i, sid in enumerate(sids):
        assert bytes(client.wait(sid).data) == frame(str(i).encode())


def test_connection_close_cancels_its_calls(srv: Server, handlers: Handlers) -> None:
    c = connect(srv)
    sid = c.open("/t.S/Wait")
    c.send(sid, frame(b"hangup"))
    assert handlers.entered.acquire(timeout=DEADLINE)
    c.sock.close()
    assert handlers.wait_cancelled("hangup")


def test_stop_cancels_running_calls_after_grace(handlers: Handlers, tmp_path: Path) -> None:
    server = Server(handlers.routes(), max_workers=4)
    path = tmp_path / "s.sock"
    assert server.add_insecure_port(f"unix:{path}") == 1
    server.start()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    c = RawClient(sock)
    c.start()
    sid = c.open("/t.S/Wait")
    c.send(sid, frame(b"stop"))
    assert handlers.entered.acquire(timeout=DEADLINE)
    started = time.monotonic()
    stopped = server.stop(grace=0.3)
    assert stopped.wait(DEADLINE)
    assert time.monotonic() - started >= 0.29
    assert handlers.wait_cancelled("stop")
    assert not path.exists()
    c.until(lambda: c.closed or c.streams[sid].ended, "the stopped call's end")
    sock.close()


def test_stop_waits_for_calls_that_finish_within_grace(handlers: Handlers) -> None:
    server = Server(handlers.routes(), max_workers=4)
    server.start()
    c = connect(server)
    sid = c.open("/t.S/Wait")
    c.send(sid, frame(b"graceful"))
    assert handlers.entered.acquire(timeout=DEADLINE)
    stopped = server.stop(grace=DEADLINE)
    handlers.release.set()
    result = c.wait(sid)
    assert bytes(result.data) == frame(b"graceful")
    assert stopped.wait(DEADLINE)
    assert handlers.cancelled == []
    c.sock.close()


def test_add_insecure_port_refuses_non_sockets(tmp_path: Path) -> None:
    server = Server({})
    regular = tmp_path / "file"
    regular.write_text("keep me")
    assert server.add_insecure_port(f"unix:{regular}") == 0
    assert regular.read_text() == "keep me"
    assert server.add_insecure_port("tcp:127.0.0.1:1") == 0
    assert server.stop(grace=None).wait(DEADLINE)


def test_encode_grpc_message_and_parse_timeout() -> None:
    assert h2server.encode_grpc_message("plain text") == b"plain text"
    assert h2server.encode_grpc_message("50%\t\u00ff") == b"50%25%09%C3%BF"
    assert h2server.parse_timeout(b"1S") == 1.0
    assert h2server.parse_timeout(b"250m") == pytest.approx(0.25)
    assert h2server.parse_timeout(b"2H") == 7200.0
    assert h2server.parse_timeout(b"5n") == pytest.approx(5e-9)
    assert h2server.parse_timeout(b"123456789S") is None
    assert h2server.parse_timeout(b"1x") is None
    assert h2server.parse_timeout(b"-1S") is None


def test_call_context_callbacks() -> None:
    ctx = CallContext("/t.S/Echo", time.monotonic() + 5)
    ran: list[int] = []
    assert ctx.add_callback(lambda: ran.append(1))
    assert ctx.is_active()
    assert 0 < (ctx.time_remaining() or 0) <= 5
    ctx.cancel()
    ctx.cancel()
    assert ran == [1]
    assert not ctx.is_active()
    assert not ctx.add_callback(lambda: ran.append(2))
    with pytest.raises(h2server.Abort) as caught:
        ctx.abort(StatusCode.ABORTED, "stop")
    assert caught.value.code is StatusCode.ABORTED


def test_worker_pool_grows_lazily_and_shrinks_when_idle() -> None:
    pool = h2server.WorkerPool(3, idle_seconds=0.05)
    assert pool.threads == 0
    gate = threading.Event()
    done = threading.Semaphore(0)

    def task() -> None:
        gate.wait(DEADLINE)
        done.release()

    for _ in range(5):
        pool.submit(task)
    assert pool.threads == 3  # bounded; two tasks wait in the queue
    gate.set()
    for _ in range(5):
        assert done.acquire(timeout=DEADLINE)
    end = time.monotonic() + DEADLINE
    while pool.threads and time.monotonic() < end:
        time.sleep(0.01)
    assert pool.threads == 0
    pool.submit(done.release)
    assert done.acquire(timeout=DEADLINE)


def test_agent_serving_path_does_not_import_grpc() -> None:
    code = (
        "import sys\n"
        "from kata_agent import __main__, channel, debug_console, server\n"
        "from kata_agent.service import build_services\n"
        "import kata_agent.service.containers, kata_agent.service.guest\n"
        "import kata_agent.service.health, kata_agent.service.network\n"
        "import kata_agent.service.processes, kata_agent.service.sandbox\n"
        "import kata_agent.service.streams, kata_agent.policy\n"
        "from kata_agent.service.health import HealthService\n"
        "server.build_server([HealthService()]).stop(None).wait()\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')\n"
        "             or m.endswith('_pb2_grpc')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_finished_calls_do_not_pile_up_in_the_deadline_heap(client: RawClient, srv: Server) -> None:
    for i in range(h2server.DEADLINE_COMPACT_MIN + 200):
        sid = client.open("/t.S/Echo", extra=[(b"grpc-timeout", b"1H")])
        client.send(sid, frame(b"%d" % i))
        if i % 64 == 63:
            client.wait(sid)
    client.wait(sid)
    # Entries of finished calls are purged, not kept for the hour their deadline is away.
    assert len(srv._deadlines) < h2server.DEADLINE_COMPACT_MIN


def test_more_streams_than_allowed_close_the_connection(srv: Server) -> None:
    ours, theirs = socket.socketpair()
    srv.serve_socket(theirs)
    ours.settimeout(DEADLINE)
    ours.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    encoder = hpack.Encoder()
    frames = bytearray()
    for i in range(h2server.MAX_CONCURRENT_STREAMS + 2):
        headers = HeadersFrame(2 * i + 1)
        headers.data = encoder.encode([(b":method", b"POST"), (b":scheme", b"http"),
                                       (b":path", b"/t.S/Wait"), (b":authority", b"a"),
                                       (b"content-type", b"application/grpc")])
        headers.flags.add("END_HEADERS")
        frames += headers.serialize()
    ours.sendall(frames)
    received = b""
    while chunk := ours.recv(65536):  # a hang here times out: the server must close
        received += chunk
    ours.close()
    assert b"\x07\x00\x00\x00\x00\x00" in received  # GOAWAY
    good = connect(srv)
    assert good.call("/t.S/Echo", b"alive").data == frame(b"alive")
