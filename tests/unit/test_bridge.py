"""The yamux bridge over real fds: socketpairs, a pty in raw mode, real unix servers."""

from __future__ import annotations

import contextlib
import logging
import os
import pty
import random
import resource
import selectors
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kata_agent import bridge as bridge_mod
from kata_agent.bridge import CloseReason, YamuxBridge, relay_listener
from kata_agent.protocol import yamux
from kata_agent.protocol.yamux import Flag, Frame, FrameType

from tests.agent_process import wait_for

W = yamux.INITIAL_WINDOW


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[str, str]:
    table = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            table[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return table


def assert_no_fd_leak(baseline: dict[str, str]) -> None:
    """Closing is synchronous, but a backend thread may still be closing its side."""
    deadline = time.monotonic() + 10
    while True:
        now = fd_table()
        extra = {k: v for k, v in now.items() if baseline.get(k) != v}
        if len(now) <= len(baseline) and not extra:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"fds leaked: {extra} baseline={baseline} now={now}")
        time.sleep(0.01)


# ---- real unix servers used as backends ----


class UnixServer:
    """A selector-driven unix socket server in a thread.

    mode "echo" writes back everything it reads (and half-closes after EOF); mode "sink"
    accepts and keeps connections without reading them, so tests can hold a reader still.
    """

    def __init__(self, path: str, mode: str = "echo") -> None:
        self.path = path
        self.mode = mode
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.conns: list[socket.socket] = []
        self.open = 0
        self.accepted = 0
        self._stop = threading.Event()
        self._rfd, self._wfd = os.pipe()
        # created here, not in the thread, so fd counts taken after __init__ are stable
        self._sel = selectors.DefaultSelector()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = self._sel
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(self._rfd, selectors.EVENT_READ, "stop")
        pending: dict[socket.socket, bytearray] = {}
        eof: set[socket.socket] = set()

        def close(c: socket.socket) -> None:
            sel.unregister(c)
            c.close()
            pending.pop(c, None)
            eof.discard(c)
            self.open -= 1

        while not self._stop.is_set():
            for key, mask in sel.select():
                if key.data == "stop":
                    continue
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self.sock.accept()
                        conn.setblocking(False)
                        self.accepted += 1
                        self.open += 1
                        if self.mode == "sink":
                            self.conns.append(conn)
                        else:
                            pending[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ, "c")
                    continue
                c: socket.socket = key.fileobj  # type: ignore[assignment]
                buf = pending.get(c)
                if buf is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ and len(buf) < 1 << 20:
                        data = c.recv(65536)
                        if not data:
                            eof.add(c)
                        buf += data
                    if buf:
                        n = c.send(buf)
                        del buf[:n]
                    if c in eof and not buf:
                        c.shutdown(socket.SHUT_WR)
                        close(c)
                        continue
                    sel.modify(c, (selectors.EVENT_WRITE if buf else 0)
                               | (0 if c in eof else selectors.EVENT_READ), "c")
                except BlockingIOError:
                    pass
                except OSError:
                    close(c)
        for c in list(pending):
            close(c)
        sel.close()

    def close(self) -> None:
        self._stop.set()
        os.write(self._wfd, b"x")
        self.thread.join(10)
        self.sock.close()
        for c in self.conns:
            c.close()
        os.close(self._rfd)
        os.close(self._wfd)


class Runner:
    """Runs a bridge in a thread and keeps its result."""

    def __init__(self, b: YamuxBridge) -> None:
        self.bridge = b
        self.result: CloseReason | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.bridge.run()

    def join(self, timeout: float = 20.0) -> CloseReason:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "bridge did not stop"
        assert self.result is not None
        return self.result


class RawPeer:
    """The far end of a transport driven by hand with a sans-IO session."""

    def __init__(self, sock: socket.socket, role: str = "client") -> None:
        self.sock = sock
        self.session = yamux.Session(role)  # type: ignore[arg-type]
        self.events: list[yamux.Event] = []
        self.raw = bytearray()

    def flush(self) -> None:
        self.sock.sendall(self.session.data_to_send())

    def pump(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.05)
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("raw peer timed out")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise EOFError("transport closed")
            self.raw += data
            self.events += self.session.receive_data(data)
            for ev in self.events:
                if isinstance(ev, yamux.DataReceived):
                    pass
            self.flush()

    def frames(self) -> list[Frame]:
        dec = yamux.FrameDecoder(max_data_length=2**32)
        return dec.feed(bytes(self.raw))


@pytest.fixture
def sockdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.fixture
def echo(sockdir: Path) -> Iterator[UnixServer]:
    srv = UnixServer(str(sockdir / "echo.sock"))
    yield srv
    srv.close()


class Pair:
    """A client bridge and a server bridge joined by a socketpair transport."""

    def __init__(self, backend: str, **client_kw: object) -> None:
        self.a, self.b = socket.socketpair()
        self.client = YamuxBridge(self.a.fileno(), "client", name="client", **client_kw)  # type: ignore[arg-type]
        self.server = YamuxBridge(self.b.fileno(), "server", name="server")
        self.server.serve_streams_to(backend)
        self.rc = Runner(self.client)
        self.rs = Runner(self.server)

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.rc.join()
        self.rs.join()
        self.a.close()
        self.b.close()


@pytest.fixture
def bridges(echo: UnixServer) -> Iterator[Pair]:
    p = Pair(echo.path)
    yield p
    p.close()


def recv_exact_until_eof(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def send_all_and_finish(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


# ---- basic splice ----


def test_one_stream_echo_and_half_close(bridges: Pair) -> None:
    s = bridges.client.open_stream_socket()
    payload = os.urandom(700_000)  # larger than the window: flow control must cycle
    t = threading.Thread(target=send_all_and_finish, args=(s, payload))
    t.start()
    assert recv_exact_until_eof(s) == payload
    t.join()
    s.close()
    wait_for(lambda: bridges.client.stats["streams_open"] == 0, what="client stream closed")
    wait_for(lambda: bridges.server.stats["streams_open"] == 0, what="server stream closed")
    st = bridges.client.stats
    assert st["streams_total"] == 1
    assert st["bytes_out"] > len(payload)
    bridges.client.close()
    assert bridges.rc.join() is CloseReason.CLOSED
    # the client's GoAway(0) with no stream left ends the server too
    assert bridges.rs.join() is CloseReason.GOAWAY_RECEIVED


def test_listener_connections_become_streams(echo: UnixServer, sockdir: Path) -> None:
    lpath = str(sockdir / "front.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(lpath)
    listener.listen(16)
    a, b = socket.socketpair()
    client = YamuxBridge(a.fileno(), "client", name="client")
    client.add_listener(listener)
    server = YamuxBridge(b.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    rc, rs = Runner(client), Runner(server)
    try:
        for i in range(5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(lpath)
            msg = f"hello {i}".encode() * 100
            c.sendall(msg)
            c.shutdown(socket.SHUT_WR)
            assert recv_exact_until_eof(c) == msg
            c.close()
        assert client.stats["streams_total"] == 5
        assert echo.accepted == 5
        client.close()
        assert rc.join() is CloseReason.CLOSED
        assert rs.join() is CloseReason.GOAWAY_RECEIVED
    finally:
        client.close()
        server.close()
        rc.join()
        rs.join()
        listener.close()
        a.close()
        b.close()


def test_thousand_interleaved_streams(bridges: Pair) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 8192
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"host capability missing: RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    rng = random.Random(1234)
    n = 1000
    socks = [bridges.client.open_stream_socket() for _ in range(n)]
    sent = [rng.randbytes(rng.randrange(0, 24_000)) for _ in range(n)]
    got = [bytearray() for _ in range(n)]
    offset = [0] * n
    done_write = [False] * n
    done_read = [False] * n
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    deadline = time.monotonic() + 120
    remaining = n
    while remaining:
        assert time.monotonic() < deadline, f"{remaining} streams unfinished"
        for key, mask in sel.select(1.0):
            i = key.data
            s = socks[i]
            if mask & selectors.EVENT_WRITE and not done_write[i]:
                chunk = rng.randrange(1, 9000)
                with contextlib.suppress(BlockingIOError):
                    offset[i] += s.send(sent[i][offset[i] : offset[i] + chunk])
                if offset[i] >= len(sent[i]):
                    s.shutdown(socket.SHUT_WR)
                    done_write[i] = True
                    sel.modify(s, selectors.EVENT_READ, i)
            if mask & selectors.EVENT_READ:
                with contextlib.suppress(BlockingIOError):
                    data = s.recv(65536)
                    if data:
                        got[i] += data
                    else:
                        assert done_write[i]
                        done_read[i] = True
                        sel.unregister(s)
                        remaining -= 1
    sel.close()
    for i in range(n):
        assert bytes(got[i]) == sent[i], f"stream {i} corrupted"
        socks[i].close()
    wait_for(lambda: bridges.server.stats["streams_open"] == 0, what="server streams closed")
    wait_for(lambda: bridges.client.stats["streams_open"] == 0, what="client streams closed")
    assert bridges.client.stats["streams_total"] == n
    assert bridges.server.stats["streams_total"] == n
    assert bridges.client.stats["buffered_peak"] <= 1024 * 1024 + W + 64 * 1024


# ---- back-pressure ----


def _write_until_stalled(sock: socket.socket, quiet: float = 1.0, limit: float = 60.0) -> int:
    """Write until the socket stays unwritable for `quiet` seconds; returns bytes written."""
    sock.setblocking(False)
    chunk = bytes(64 * 1024)
    total = 0
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while True:
            assert time.monotonic() < deadline, "writer never stalled: buffering is unbounded"
            try:
                total += sock.send(chunk)
                continue
            except BlockingIOError:
                pass
            if not sel.select(quiet):
                return total


def test_backpressure_reader_never_reads(sockdir: Path) -> None:
    sink = UnixServer(str(sockdir / "sink.sock"), mode="sink")
    p = Pair(sink.path)
    try:
        s = p.client.open_stream_socket()
        total = _write_until_stalled(s)
        wait_for(lambda: len(sink.conns) == 1, what="backend connection")
        # Everything in flight: two socket buffers on each end plus one window.
        assert total < 4 * 1024 * 1024
        cs, ss = p.client.stats, p.server.stats
        assert cs["buffered_peak"] <= 1024 * 1024 + 2 * W
        assert ss["local_buffered"] <= W
        assert ss["buffered_peak"] <= 1024 * 1024 + 2 * W
        # Nothing was lost: the stalled bytes all arrive once the reader reads.
        s.shutdown(socket.SHUT_WR)
        back = sink.conns[0]
        back.setblocking(True)
        assert len(recv_exact_until_eof(back)) == total
    finally:
        p.close()
        sink.close()


def test_backpressure_client_never_reads(sockdir: Path) -> None:
    sink = UnixServer(str(sockdir / "sink.sock"), mode="sink")
    p = Pair(sink.path)
    try:
        s = p.client.open_stream_socket()
        s.sendall(b"x")
        wait_for(lambda: len(sink.conns) == 1, what="backend connection")
        back = sink.conns[0]
        total = _write_until_stalled(back)
        assert total < 4 * 1024 * 1024
        assert p.client.stats["local_buffered"] <= W
        assert p.server.stats["buffered_peak"] <= 1024 * 1024 + 2 * W
        back.shutdown(socket.SHUT_WR)
        assert len(recv_exact_until_eof(s)) == total
    finally:
        p.close()
        sink.close()


# ---- session end ----


def test_transport_hangup_closes_every_spliced_socket(echo: UnixServer) -> None:
    baseline = fd_table()
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    peer = RawPeer(mine)
    sids = [peer.session.open_stream() for _ in range(5)]
    for sid in sids:
        peer.session.send_data(sid, b"ping")
    peer.flush()
    peer.pump(lambda: sum(isinstance(e, yamux.DataReceived) for e in peer.events) >= 5)
    assert echo.open == 5
    assert fd_count() > len(baseline) + 5
    mine.close()
    assert runner.join() is CloseReason.EOF
    wait_for(lambda: echo.open == 0, what="backend connections closed")
    theirs.close()
    assert_no_fd_leak(baseline)


def test_pty_master_hangup_ends_session(echo: UnixServer) -> None:
    baseline = fd_table()
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    server = YamuxBridge(slave, "server", name="serial")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    # Stream traffic first so the session is live when the host side goes away.
    sess = yamux.Session("client")
    sid = sess.open_stream()
    sess.send_data(sid, b"abc")
    os.write(master, sess.data_to_send())
    wait_for(lambda: echo.open == 1, what="backend connection")
    os.close(master)
    assert runner.join() in (CloseReason.HANGUP, CloseReason.EOF)
    wait_for(lambda: echo.open == 0, what="backend connection closed")
    os.close(slave)
    assert_no_fd_leak(baseline)


def test_malformed_bytes_get_goaway_protocol_error(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    peer = RawPeer(mine)
    sid = peer.session.open_stream()
    peer.session.send_data(sid, b"hi")
    peer.flush()
    peer.pump(lambda: any(isinstance(e, yamux.DataReceived) for e in peer.events))
    mine.sendall(bytes.fromhex("01 00 0000 00000001 00000000"))
    goaway = Frame(FrameType.GO_AWAY, 0, 0, yamux.GoAwayCode.PROTOCOL_ERROR)
    with contextlib.suppress(EOFError):
        peer.pump(lambda: goaway in peer.frames())
    assert goaway in peer.frames()
    assert runner.join() is CloseReason.PROTOCOL_ERROR
    wait_for(lambda: echo.open == 0, what="backend connection closed")
    mine.close()
    theirs.close()


def test_window_violation_ends_session(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    mine.sendall(yamux.encode_window_update(1, 0, Flag.SYN))
    # the header alone is enough: the length is checked before any payload is buffered
    mine.sendall(yamux.encode_header(0, 0, 1, W + 1) + bytes(1000))
    assert runner.join() is CloseReason.PROTOCOL_ERROR
    theirs.close()
    data = recv_exact_until_eof(mine)
    assert data.endswith(yamux.encode_go_away(1))
    mine.close()


def test_goaway_error_received_ends_run(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    mine.sendall(yamux.encode_go_away(yamux.GoAwayCode.INTERNAL_ERROR))
    assert runner.join() is CloseReason.GOAWAY_RECEIVED
    mine.close()
    theirs.close()


def test_normal_goaway_drains_streams_then_ends(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    peer = RawPeer(mine)
    sid = peer.session.open_stream()
    peer.session.send_data(sid, b"data")
    peer.flush()
    peer.pump(lambda: any(isinstance(e, yamux.DataReceived) for e in peer.events))
    mine.sendall(yamux.encode_go_away(0))
    # the existing stream keeps working after a normal GoAway
    peer.session.send_data(sid, b"more")
    peer.flush()
    peer.pump(lambda: sum(len(e.data) for e in peer.events
                          if isinstance(e, yamux.DataReceived)) == 8)
    assert runner.thread.is_alive()
    peer.session.close_stream(sid)
    peer.flush()
    assert runner.join() is CloseReason.GOAWAY_RECEIVED
    mine.close()
    theirs.close()


def test_close_sends_goaway_normal(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    server.close()
    assert runner.join() is CloseReason.CLOSED
    mine.settimeout(5)
    assert mine.recv(64) == yamux.encode_go_away(0)
    with pytest.raises(ConnectionError):
        server.open_stream_socket()
    mine.close()
    theirs.close()


def test_bridge_answers_pings_and_client_sends_heartbeat(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    mine.sendall(yamux.encode_ping(77))
    peer = RawPeer(mine)
    peer.pump(lambda: any(e == yamux.PingAcked(77) for e in peer.events))
    server.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()

    mine, theirs = socket.socketpair()
    client = YamuxBridge(theirs.fileno(), "client", name="client", ping_interval=0.02)
    runner = Runner(client)
    peer = RawPeer(mine, role="server")
    pings = [Frame(FrameType.PING, Flag.SYN, 0, v) for v in (1, 2, 3)]
    peer.pump(lambda: all(p in peer.frames() for p in pings))
    client.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()


def test_backend_unreachable_resets_stream(sockdir: Path) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(str(sockdir / "missing.sock"))
    runner = Runner(server)
    peer = RawPeer(mine)
    sid = peer.session.open_stream()
    peer.flush()
    peer.pump(lambda: yamux.StreamReset(sid) in peer.events)
    assert server.stats["streams_refused"] == 1
    server.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()


def test_backend_listen_queue_full_is_retried(sockdir: Path) -> None:
    path = str(sockdir / "slow.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(0)
    fillers = []
    # Fill the listen queue so that a non-blocking connect gets EAGAIN.
    for _ in range(4):
        f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        f.setblocking(False)
        if f.connect_ex(path) != 0:
            f.close()
            break
        fillers.append(f)
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(path)
    runner = Runner(server)
    peer = RawPeer(mine)
    sid = peer.session.open_stream()
    peer.session.send_data(sid, b"queued")
    peer.session.close_stream(sid)
    peer.flush()
    wait_for(lambda: len(server._retry_connects) == 1, what="connect retry pending")
    accepted = [lst.accept()[0] for _ in fillers]  # drain the queue
    conn, _ = lst.accept()
    conn.settimeout(10)
    assert recv_exact_until_eof(conn) == b"queued"
    peer.pump(lambda: yamux.StreamAccepted(sid) in peer.events)
    for c in [*fillers, *accepted, conn, lst]:
        c.close()
    server.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()


def test_no_backend_refuses_streams() -> None:
    mine, theirs = socket.socketpair()
    client = YamuxBridge(theirs.fileno(), "client", name="client")
    runner = Runner(client)
    peer = RawPeer(mine, role="server")
    sid = peer.session.open_stream()
    peer.flush()
    peer.pump(lambda: yamux.StreamReset(sid) in peer.events)
    client.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()


# ---- the serial-port stand-in: a pty pair in raw mode ----


def test_bridges_over_raw_pty(echo: UnixServer) -> None:
    baseline = fd_table()
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    client = YamuxBridge(master, "client", name="host", ping_interval=0.05)
    server = YamuxBridge(slave, "server", name="serial")
    server.serve_streams_to(echo.path)
    rc, rs = Runner(client), Runner(server)
    rng = random.Random(7)
    payloads = [rng.randbytes(size) for size in (0, 1, 4096, 300_000, 100_000)]
    socks = [client.open_stream_socket() for _ in payloads]
    writers = [
        threading.Thread(target=send_all_and_finish, args=(s, p))
        for s, p in zip(socks, payloads, strict=True)
    ]
    for t in writers:
        t.start()
    for s, p in zip(socks, payloads, strict=True):
        assert recv_exact_until_eof(s, timeout=60) == p
        s.close()
    for t in writers:
        t.join()
    wait_for(lambda: server.stats["streams_open"] == 0, what="serial streams closed")
    client.close()
    assert rc.join() is CloseReason.CLOSED
    assert rs.join() is CloseReason.GOAWAY_RECEIVED
    os.close(master)
    os.close(slave)
    assert server.stats["frames_in"] > 0
    assert_no_fd_leak(baseline)


# ---- plain relay (vsock path) ----


@pytest.mark.parametrize("via_callable", [False, True])
def test_relay_listener_splices_and_stops(echo: UnixServer, sockdir: Path,
                                          via_callable: bool) -> None:
    lpath = str(sockdir / "relay.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(lpath)
    listener.listen(16)
    stop = threading.Event()

    def dial() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(echo.path)
        return s

    backend: str | Callable[[], socket.socket] = dial if via_callable else echo.path
    t = threading.Thread(target=relay_listener, args=(listener, backend, stop), daemon=True)
    t.start()
    clients = []
    for i in range(10):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(lpath)
        clients.append((c, os.urandom(1000 * (i + 1) * 50)))
    writers = [threading.Thread(target=send_all_and_finish, args=(c, p))
               for c, p in clients]
    for w in writers:
        w.start()
    for c, p in clients:
        assert recv_exact_until_eof(c) == p
        c.close()
    for w in writers:
        w.join()
    wait_for(lambda: echo.open == 0, what="relayed connections closed")
    # one left open must be closed when the relay stops
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(lpath)
    c.sendall(b"x")
    c.settimeout(10)
    assert c.recv(1) == b"x"
    stop.set()
    t.join(10)
    assert not t.is_alive()
    assert c.recv(1) == b""
    c.close()
    listener.close()


def test_limits_are_sane() -> None:
    assert bridge_mod.TRANSPORT_OUT_SOFT_LIMIT < bridge_mod.TRANSPORT_OUT_HARD_LIMIT
    assert bridge_mod.LOCAL_READ_SIZE <= W


def test_close_resets_open_streams_before_goaway(echo: UnixServer) -> None:
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path)
    runner = Runner(server)
    peer = RawPeer(mine)
    sid = peer.session.open_stream()
    peer.session.send_data(sid, b"hold")
    peer.flush()
    peer.pump(lambda: any(isinstance(e, yamux.DataReceived) for e in peer.events))
    server.close()
    assert runner.join() is CloseReason.CLOSED
    with contextlib.suppress(EOFError):
        peer.pump(lambda: yamux.GoAwayReceived(0) in peer.events)
    assert peer.events[-2:] == [yamux.StreamReset(sid), yamux.GoAwayReceived(0)]
    wait_for(lambda: echo.open == 0, what="backend connection closed")
    mine.close()
    theirs.close()


def test_stream_without_expected_preface_is_reset(echo: UnixServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    mine, theirs = socket.socketpair()
    server = YamuxBridge(theirs.fileno(), "server", name="server")
    server.serve_streams_to(echo.path, preface=preface)
    runner = Runner(server)
    peer = RawPeer(mine)
    with caplog.at_level(logging.WARNING, logger="kata_agent.bridge"):
        # The preface split over two frames passes, and the stream echoes.
        good = peer.session.open_stream()
        peer.session.send_data(good, preface[:5])
        peer.flush()
        peer.session.send_data(good, preface[5:] + b"after")
        peer.flush()
        expected = preface + b"after"
        received = bytearray()

        def echoed() -> bool:
            for ev in peer.events:
                if isinstance(ev, yamux.DataReceived) and ev.stream_id == good:
                    received.extend(ev.data)
                    peer.session.consumed(good, len(ev.data))
            peer.events = [e for e in peer.events if not isinstance(e, yamux.DataReceived)]
            return bytes(received) == expected

        peer.pump(echoed)
        # A stream starting with anything else is reset; the session lives on.
        bad = peer.session.open_stream()
        peer.session.send_data(bad, b"GET / HTTP/1.1\r\n\r\n")
        peer.flush()
        peer.pump(lambda: yamux.StreamReset(bad) in peer.events)
    assert f"stream={bad} reason=bad-preface" in caplog.text
    assert server.stats["streams_refused"] == 1
    server.close()
    assert runner.join() is CloseReason.CLOSED
    mine.close()
    theirs.close()
