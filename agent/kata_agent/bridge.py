"""Run a yamux session over a file descriptor and splice its streams to unix sockets.

Every yamux stream becomes one connection to a unix socket (server role: to the gRPC
backend; client role: from local clients). One thread runs one non-blocking `selectors`
loop per session; there is no thread per stream. The transport is any fd that works with
os.read/os.write and epoll: a connected socket, a pty or a virtio-serial port.

A server-role session can instead serve its streams in-process (``serve_streams_with``):
each stream feeds a protocol endpoint (an HTTP/2 gRPC connection) on the session's own
thread, with no local socket and no second hop.

Back-pressure is end to end: a local socket is read only while its stream's send window is
open and the transport's outgoing buffer is below a bound, and a stream's receive window is
reopened only for bytes actually written into its local socket.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

from kata_agent.protocol import yamux

log = logging.getLogger(__name__)

# Stop reading local sockets while this much is queued for the transport.
TRANSPORT_OUT_SOFT_LIMIT = 1024 * 1024
# Stop reading the transport itself (a peer that floods pings but never reads).
TRANSPORT_OUT_HARD_LIMIT = 4 * 1024 * 1024
TRANSPORT_READ_SIZE = 256 * 1024
LOCAL_READ_SIZE = 128 * 1024
# How long a backend connect may be retried while the backend's listen queue is full.
CONNECT_RETRY_SECONDS = 2.0
CONNECT_RETRY_STEP = 0.005
# Local connections waiting for an open (un-ACKed opens at the limit) before accept pauses.
MAX_WAITING_OPENS = 1024
# Best effort to get the final GoAway out when the session ends.
FINAL_FLUSH_SECONDS = 1.0

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE

_HANGUP_ERRNOS = frozenset({errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.ENXIO, errno.ESHUTDOWN})
_RETRY_CONNECT_ERRNOS = frozenset({errno.EAGAIN, errno.EINPROGRESS})


class CloseReason(enum.Enum):
    EOF = "eof"
    HANGUP = "hangup"
    GOAWAY_RECEIVED = "goaway-received"
    PROTOCOL_ERROR = "protocol-error"
    CLOSED = "closed"
    IO_ERROR = "io-error"


class _Tag(enum.Enum):
    TRANSPORT = 1
    WAKE = 2
    LOCAL_READS = 3


class StreamEndpoint(Protocol):
    """What serves a stream in-process: bytes in, bytes out, ``closing`` when done."""

    closing: bool
    has_more: bool  # data_to_send has more once what it returned is written

    def receive(self, data: bytes | memoryview) -> None: ...

    def data_to_send(self) -> bytes: ...

    def close(self) -> None: ...


# Runs a function on the session's thread (from any thread), then flushes its endpoint.
Post = Callable[[Callable[[], None]], None]
EndpointFactory = Callable[[str, Post], StreamEndpoint]


class _Splice:
    """One stream and its local socket, or its in-process endpoint."""

    __slots__ = (
        "closed",
        "connect_deadline",
        "connected",
        "endpoint",
        "fd",
        "local_eof",
        "out",
        "pending",
        "preface_seen",
        "reading",
        "remote_fin",
        "sid",
        "sock",
        "wr_shut",
        "writing",
    )

    def __init__(self, sid: int, sock: socket.socket | None, *, connected: bool = True) -> None:
        self.sid = sid
        self.sock = sock
        self.connected = connected  # False while the backend connect is being retried
        self.fd = sock.fileno() if sock is not None else -1
        self.out = bytearray()  # peer data not yet written into the local socket
        self.preface_seen = 0  # bytes of the expected preface checked so far
        self.local_eof = False  # local side reached EOF, FIN sent
        self.remote_fin = False  # peer sent FIN
        self.wr_shut = False
        self.reading = False  # registered for reading (local-reads selector)
        self.writing = False  # registered for writing (main selector)
        self.closed = False
        self.connect_deadline = 0.0
        self.endpoint: StreamEndpoint | None = None
        self.pending = bytearray()  # endpoint output waiting for the stream's send window


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _start_unix_connect(path: str) -> tuple[socket.socket, bool]:
    """Non-blocking connect; returns (socket, connected). Hard failures raise OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    err = sock.connect_ex(path)
    if err == 0:
        return sock, True
    if err in _RETRY_CONNECT_ERRNOS:
        return sock, False
    sock.close()
    raise OSError(err, os.strerror(err), path)


class YamuxBridge:
    """A yamux session on `transport_fd` whose streams are spliced to unix sockets."""

    def __init__(
        self,
        transport_fd: int,
        role: Literal["server", "client"],
        *,
        ping_interval: float | None = None,
        accept_backlog: int = yamux.DEFAULT_ACCEPT_BACKLOG,
        name: str = "yamux",
        transport_out_limit: int = TRANSPORT_OUT_SOFT_LIMIT,
    ) -> None:
        if ping_interval is not None and ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        self.name = name
        self.role = role
        self._fd = transport_fd
        # A tty or a virtio port hands out at most a page or so per read; a socket all it has.
        self._read_until_drained = not stat.S_ISSOCK(os.fstat(transport_fd).st_mode)
        self._session = yamux.Session(role, accept_backlog=accept_backlog)
        self._ping_interval = ping_interval
        self._out_limit = transport_out_limit
        self._backend: str | None = None
        self._factory: EndpointFactory | None = None
        self._posted: deque[tuple[_Splice, Callable[[], None]]] = deque()
        self._endpoint_backlog: set[_Splice] = set()
        self._preface = b""
        self._listeners: list[socket.socket] = []
        self._splices: dict[int, _Splice] = {}
        self._waiting_opens: deque[socket.socket] = deque()
        self._retry_connects: list[_Splice] = []
        self._lock = threading.Lock()
        self._incoming_socks: list[socket.socket] = []
        self._close_requested = False
        self._started = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_closed = False
        self._sel = selectors.EpollSelector()
        # Local sockets waiting to be read; nested in the main selector so that all of them
        # are paused at once, with one call, while the transport is backed up.
        self._rsel = selectors.EpollSelector()
        self._rbuf = bytearray(max(TRANSPORT_READ_SIZE, LOCAL_READ_SIZE))
        self._rview = memoryview(self._rbuf)
        self._transport_mask = 0
        self._local_reads_on = False
        self._listeners_on = False
        self._reason: CloseReason | None = None
        self._local_buffered = 0
        self._stats = {
            "streams_total": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "buffered_peak": 0,
            "streams_refused": 0,
        }

    # ---- configuration and control (any thread unless noted) ----

    def serve_streams_to(self, backend_path: str, *, preface: bytes = b"") -> None:
        """Server role: splice every stream the peer opens to a new connection to
        `backend_path`. With `preface`, a stream whose first bytes differ from it is reset
        and logged before anything reaches the backend (e.g. the HTTP/2 client preface)."""
        self._backend = backend_path
        self._preface = preface

    def serve_streams_with(self, factory: EndpointFactory, *, preface: bytes = b"") -> None:
        """Server role: serve every stream the peer opens in-process, by the endpoint
        ``factory(name, post)`` returns; ``preface`` as in ``serve_streams_to``."""
        self._factory = factory
        self._preface = preface

    def add_listener(self, listener: socket.socket) -> None:
        """Every connection accepted on `listener` becomes a new stream (before run())."""
        if self._started:
            raise RuntimeError("add_listener must be called before run()")
        listener.setblocking(False)
        self._listeners.append(listener)

    def open_stream_socket(self) -> socket.socket:
        """A connected socket whose peer end is a new yamux stream (thread-safe)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.setblocking(False)
        with self._lock:
            if self._close_requested or self._wake_closed:
                mine.close()
                theirs.close()
                raise ConnectionError(f"yamux bridge {self.name} is closed")
            self._incoming_socks.append(mine)
            self._wake()
        return theirs

    def close(self) -> None:
        """Reset open streams, send GoAway(normal), make run() return CLOSED (thread-safe)."""
        with self._lock:
            self._close_requested = True
            self._wake()

    @property
    def stats(self) -> dict[str, int]:
        s = dict(self._stats)
        s["streams_open"] = len(self._splices)
        s["frames_in"] = self._session.frames_in
        s["frames_out"] = self._session.frames_out
        s["transport_buffered"] = len(self._session.output)
        s["local_buffered"] = self._local_buffered
        s["buffered"] = s["transport_buffered"] + self._local_buffered
        return s

    def _wake(self) -> None:
        # Called with the lock held, so the fd cannot be closed underneath.
        if not self._wake_closed:
            # A full counter is already non-zero: the loop will wake anyway.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._wake_fd, 1)

    # ---- the loop ----

    def run(self) -> CloseReason:
        if self._started:
            raise RuntimeError("run() may be called once")
        self._started = True
        try:
            _set_nonblocking(self._fd)
            self._sel.register(self._wake_fd, _R, _Tag.WAKE)
            self._set_local_reads(True)
            self._set_listeners(True)
            self._update_transport_interest()
            reason = self._loop()
        except OSError as exc:
            log.warning("yamux bridge failed name=%s error=%s", self.name, exc)
            reason = CloseReason.IO_ERROR
        finally:
            self._teardown()
        log.info("yamux session ended name=%s reason=%s streams_total=%d bytes_in=%d bytes_out=%d",
                 self.name, reason.value, self._stats["streams_total"], self._stats["bytes_in"],
                 self._stats["bytes_out"])
        return reason

    def _loop(self) -> CloseReason:
        interval = self._ping_interval
        next_ping = time.monotonic() + interval if interval is not None else None
        select = self._sel.select
        session = self._session
        while self._reason is None:
            timeout: float | None = None
            if next_ping is not None:
                timeout = max(0.0, next_ping - time.monotonic())
            if self._retry_connects:
                timeout = CONNECT_RETRY_STEP if timeout is None else min(timeout,
                                                                         CONNECT_RETRY_STEP)
            for key, mask in select(timeout):
                tag = key.data
                if tag is _Tag.TRANSPORT:
                    if mask & _R:
                        self._read_transport()
                elif tag is _Tag.LOCAL_READS:
                    self._read_locals()
                elif tag is _Tag.WAKE:
                    self._on_wake()
                elif isinstance(tag, _Splice):
                    self._write_local(tag)
                else:
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                if self._reason is not None:
                    break
            if self._reason is not None:
                break
            if interval is not None and next_ping is not None and time.monotonic() >= next_ping:
                # Heartbeat as kata-proxy did: a missing reply is not an error.
                session.ping()
                next_ping = time.monotonic() + interval
            if self._retry_connects:
                self._retry_pending_connects()
            if self._endpoint_backlog and len(session.output) < self._out_limit:
                for sp in list(self._endpoint_backlog):
                    self._pump_endpoint(sp)
            self._flush()
            if (session.remote_goaway and not self._splices and not self._waiting_opens
                    and self._reason is None):
                self._reason = CloseReason.GOAWAY_RECEIVED
        return self._reason

    def _note_buffered(self) -> None:
        cur = len(self._session.output) + self._local_buffered
        if cur > self._stats["buffered_peak"]:
            self._stats["buffered_peak"] = cur

    # ---- transport ----

    def _read_transport(self) -> None:
        # One wake-up should move a useful amount of data, even from a tty or a virtio port.
        size = len(self._rbuf)
        n = 0
        while n < size:
            try:
                got = os.readv(self._fd, [self._rview[n:]])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if n:
                    break  # deliver what we have; the error comes back on the next read
                self._reason = (CloseReason.HANGUP if exc.errno in _HANGUP_ERRNOS
                                else CloseReason.IO_ERROR)
                log.info("yamux transport read failed name=%s errno=%s", self.name, exc.errno)
                return
            if got == 0:
                if n:
                    break
                self._reason = CloseReason.EOF
                return
            n += got
            if not self._read_until_drained:
                break
        if n == 0:
            return
        self._stats["bytes_in"] += n
        session = self._session
        events = session.receive_data(self._rview[:n])
        if session.terminated:
            # The session is over: only the event that ended it matters now.
            events = events[-1:]
        for ev in events:
            self._dispatch(ev)
        self._note_buffered()

    def _flush(self) -> None:
        out = self._session.output
        if out:
            self._note_buffered()
            try:
                n = os.write(self._fd, out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._reason = (CloseReason.HANGUP if exc.errno in _HANGUP_ERRNOS
                                else CloseReason.IO_ERROR)
                log.info("yamux transport write failed name=%s errno=%s", self.name, exc.errno)
                return
            if n:
                self._session.output_written(n)
                self._stats["bytes_out"] += n
        self._update_transport_interest()

    def _update_transport_interest(self) -> None:
        pending = len(self._session.output)
        mask = _W if pending else 0
        if pending < TRANSPORT_OUT_HARD_LIMIT:
            mask |= _R
        if mask != self._transport_mask:
            if self._transport_mask == 0:
                self._sel.register(self._fd, mask, _Tag.TRANSPORT)
            elif mask == 0:
                self._sel.unregister(self._fd)
            else:
                self._sel.modify(self._fd, mask, _Tag.TRANSPORT)
            self._transport_mask = mask
        self._set_local_reads(pending < self._out_limit)

    def _set_local_reads(self, on: bool) -> None:
        if on != self._local_reads_on:
            if on:
                self._sel.register(self._rsel.fileno(), _R, _Tag.LOCAL_READS)
            else:
                self._sel.unregister(self._rsel.fileno())
            self._local_reads_on = on

    def _set_listeners(self, on: bool) -> None:
        if on != self._listeners_on:
            for listener in self._listeners:
                if on:
                    self._sel.register(listener, _R, None)
                else:
                    self._sel.unregister(listener)
            self._listeners_on = on

    # ---- session events ----

    def _dispatch(self, ev: yamux.Event) -> None:
        if isinstance(ev, yamux.DataReceived):
            sp = self._splices.get(ev.stream_id)
            if sp is not None and not sp.closed and self._preface_ok(sp, ev.data):
                self._deliver(sp, ev.data)
        elif isinstance(ev, yamux.WindowOpened):
            sp = self._splices.get(ev.stream_id)
            if sp is not None:
                if sp.endpoint is not None:
                    self._pump_endpoint(sp)
                else:
                    self._update_interest(sp)
        elif isinstance(ev, yamux.StreamOpened):
            self._on_stream_opened(ev.stream_id)
        elif isinstance(ev, yamux.StreamAccepted):
            self._open_waiting()
        elif isinstance(ev, yamux.StreamFinished):
            sp = self._splices.get(ev.stream_id)
            if sp is not None:
                sp.remote_fin = True
                if sp.endpoint is not None:
                    # The client is done with this connection (as a socket's EOF).
                    self._close_endpoint(sp)
                else:
                    self._maybe_shutdown_write(sp)
        elif isinstance(ev, yamux.StreamClosed):
            sp = self._splices.get(ev.stream_id)
            if sp is not None:
                self._maybe_finish(sp)
        elif isinstance(ev, yamux.StreamReset):
            sp = self._splices.get(ev.stream_id)
            if sp is not None:
                log.debug("yamux stream reset by peer name=%s stream=%d", self.name, sp.sid)
                self._drop(sp)
            self._open_waiting()
        elif isinstance(ev, yamux.GoAwayReceived):
            if ev.code != yamux.GoAwayCode.NORMAL:
                log.warning("yamux goaway received name=%s code=%d", self.name, ev.code)
                self._reason = CloseReason.GOAWAY_RECEIVED
            else:
                log.info("yamux goaway received name=%s code=0", self.name)
        elif isinstance(ev, yamux.ProtocolViolation):
            log.warning("yamux protocol error name=%s role=%s reason=%s",
                        self.name, self.role, ev.reason)
            self._reason = CloseReason.PROTOCOL_ERROR
        elif isinstance(ev, yamux.PingAcked):
            log.debug("yamux ping acked name=%s value=%d", self.name, ev.value)

    def _preface_ok(self, sp: _Splice, data: bytes) -> bool:
        if sp.preface_seen >= len(self._preface):
            return True
        expected = self._preface[sp.preface_seen : sp.preface_seen + len(data)]
        if data[: len(expected)] == expected:
            sp.preface_seen += len(expected)
            return True
        # Not the protocol the backend speaks: refuse the stream, keep the session.
        log.warning(
            "yamux stream reset name=%s stream=%d reason=bad-preface first-bytes=%r",
            self.name, sp.sid, bytes(data[:16]),
        )
        self._stats["streams_refused"] += 1
        self._session.reset_stream(sp.sid)
        self._drop(sp)
        return False

    def _on_stream_opened(self, sid: int) -> None:
        session = self._session
        if self._factory is not None:
            self._open_endpoint(sid)
            return
        if self._backend is None:
            log.info("yamux refusing stream name=%s stream=%d reason=no-backend", self.name, sid)
            self._stats["streams_refused"] += 1
            session.refuse_stream(sid)
            return
        try:
            sock, connected = _start_unix_connect(self._backend)
        except OSError as exc:
            log.warning("yamux backend connect failed name=%s stream=%d backend=%s error=%s",
                        self.name, sid, self._backend, exc.strerror)
            self._stats["streams_refused"] += 1
            session.refuse_stream(sid)
            return
        sp = _Splice(sid, sock, connected=connected)
        self._splices[sid] = sp
        self._stats["streams_total"] += 1
        log.debug("yamux stream opened name=%s stream=%d by=peer connected=%s",
                  self.name, sid, connected)
        if connected:
            session.accept_stream(sid)
            self._update_interest(sp)
        else:
            sp.connect_deadline = time.monotonic() + CONNECT_RETRY_SECONDS
            self._retry_connects.append(sp)

    def _retry_pending_connects(self) -> None:
        now = time.monotonic()
        still: list[_Splice] = []
        for sp in self._retry_connects:
            if sp.closed:
                continue
            assert self._backend is not None
            assert sp.sock is not None
            err = sp.sock.connect_ex(self._backend)
            if err in (0, errno.EISCONN):
                sp.connected = True
                self._session.accept_stream(sp.sid)
                self._update_interest(sp)
                if sp.remote_fin:
                    self._maybe_shutdown_write(sp)
            elif err in _RETRY_CONNECT_ERRNOS and now < sp.connect_deadline:
                still.append(sp)
            else:
                log.warning("yamux backend connect failed name=%s stream=%d backend=%s error=%s",
                            self.name, sp.sid, self._backend, os.strerror(err))
                self._stats["streams_refused"] += 1
                self._session.refuse_stream(sp.sid)
                self._drop(sp)
        self._retry_connects = still

    # ---- in-process endpoints ----

    def _open_endpoint(self, sid: int) -> None:
        assert self._factory is not None
        sp = _Splice(sid, None)

        def post(fn: Callable[[], None]) -> None:
            with self._lock:
                if self._wake_closed:
                    return
                self._posted.append((sp, fn))
                self._wake()

        try:
            sp.endpoint = self._factory(f"{self.name}-{sid}", post)
        except Exception:
            log.exception("yamux endpoint failed name=%s stream=%d", self.name, sid)
            self._stats["streams_refused"] += 1
            self._session.refuse_stream(sid)
            return
        self._splices[sid] = sp
        self._stats["streams_total"] += 1
        log.debug("yamux stream opened name=%s stream=%d by=peer in-process", self.name, sid)
        self._session.accept_stream(sid)
        self._pump_endpoint(sp)

    def _pump_endpoint(self, sp: _Splice) -> None:
        """Move the endpoint's output into its stream, as far as the windows allow."""
        if sp.closed or sp.endpoint is None:
            return
        session = self._session
        endpoint = sp.endpoint
        while len(session.output) < self._out_limit:
            if not sp.pending:
                sp.pending += endpoint.data_to_send()
                if not sp.pending:
                    break
            try:
                n = session.send_data(sp.sid, memoryview(sp.pending)[:LOCAL_READ_SIZE])
            except yamux.YamuxError as exc:
                # The stream or the session is over: nobody reads this reply any more.
                log.debug("yamux endpoint output dropped name=%s stream=%d error=%s",
                          self.name, sp.sid, exc)
                self._drop(sp)
                return
            if n <= 0:
                break
            del sp.pending[:n]
        if sp.pending or endpoint.has_more:
            self._endpoint_backlog.add(sp)
        else:
            self._endpoint_backlog.discard(sp)
            if sp.endpoint.closing:
                self._close_endpoint(sp)

    def _close_endpoint(self, sp: _Splice) -> None:
        """The endpoint's connection is over: FIN our half and forget the stream."""
        if sp.closed:
            return
        with contextlib.suppress(yamux.YamuxError):
            if not sp.local_eof:
                sp.local_eof = True
                self._session.close_stream(sp.sid)
        self._drop(sp)

    def _run_posted(self) -> None:
        with self._lock:
            posted = list(self._posted)
            self._posted.clear()
        for sp, fn in posted:
            if not sp.closed:
                fn()
                self._pump_endpoint(sp)

    # ---- local sockets ----

    def _deliver(self, sp: _Splice, data: bytes) -> None:
        if sp.endpoint is not None:
            sp.endpoint.receive(data)
            self._session.consumed(sp.sid, len(data))
            self._pump_endpoint(sp)
            return
        n = 0
        if not sp.out and sp.sock is not None and sp.connected:
            try:
                n = sp.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._local_failed(sp, exc)
                return
            if n:
                self._session.consumed(sp.sid, n)
        if n < len(data):
            sp.out += memoryview(data)[n:] if n else data
            self._local_buffered += len(data) - n
            self._update_interest(sp)

    def _write_local(self, sp: _Splice) -> None:
        if sp.closed or not sp.out or sp.sock is None:
            return
        try:
            n = sp.sock.send(sp.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._local_failed(sp, exc)
            return
        del sp.out[:n]
        self._local_buffered -= n
        self._session.consumed(sp.sid, n)
        if not sp.out:
            self._update_interest(sp)
            self._maybe_shutdown_write(sp)

    def _read_locals(self) -> None:
        session = self._session
        limit = self._out_limit
        for key, _mask in self._rsel.select(0):
            if len(session.output) >= limit:
                break
            sp: _Splice = key.data
            if sp.closed or sp.local_eof:
                continue
            window = session.send_window(sp.sid)
            if window <= 0:
                self._update_interest(sp)
                continue
            assert sp.sock is not None
            try:
                n = sp.sock.recv_into(self._rbuf, min(window, LOCAL_READ_SIZE))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                self._local_failed(sp, exc)
                continue
            if n == 0:
                log.debug("yamux local end finished name=%s stream=%d", self.name, sp.sid)
                sp.local_eof = True
                if session.close_stream(sp.sid):
                    self._maybe_finish(sp)
                else:
                    self._update_interest(sp)
                continue
            session.send_data(sp.sid, self._rview[:n])
            if n == window:
                self._update_interest(sp)
        self._note_buffered()

    def _local_failed(self, sp: _Splice, exc: OSError) -> None:
        log.debug("yamux local socket failed name=%s stream=%d errno=%s",
                  self.name, sp.sid, exc.errno)
        self._session.reset_stream(sp.sid)
        self._drop(sp)

    def _maybe_shutdown_write(self, sp: _Splice) -> None:
        if sp.closed or not sp.remote_fin or sp.out or sp.wr_shut or sp.sock is None:
            return
        if not sp.connected:
            return
        sp.wr_shut = True
        try:
            sp.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._local_failed(sp, exc)
            return
        self._maybe_finish(sp)

    def _maybe_finish(self, sp: _Splice) -> None:
        if sp.local_eof and sp.wr_shut and not sp.out:
            self._drop(sp)

    def _update_interest(self, sp: _Splice) -> None:
        if sp.closed or sp.sock is None:
            return
        want_read = not sp.local_eof and self._session.send_window(sp.sid) > 0
        if want_read != sp.reading:
            if want_read:
                self._rsel.register(sp.fd, _R, sp)
            else:
                self._rsel.unregister(sp.fd)
            sp.reading = want_read
        want_write = bool(sp.out) and sp.connected
        if want_write != sp.writing:
            if want_write:
                self._sel.register(sp.fd, _W, sp)
            else:
                self._sel.unregister(sp.fd)
            sp.writing = want_write

    def _drop(self, sp: _Splice) -> None:
        """Forget the stream's splice and close its local socket."""
        if sp.closed:
            return
        log.debug("yamux stream closed name=%s stream=%d unsent=%d",
                  self.name, sp.sid, len(sp.out))
        sp.closed = True
        if sp.endpoint is not None:
            sp.endpoint.close()
            sp.pending = bytearray()
            self._endpoint_backlog.discard(sp)
        if sp.reading:
            self._rsel.unregister(sp.fd)
            sp.reading = False
        if sp.writing:
            self._sel.unregister(sp.fd)
            sp.writing = False
        self._local_buffered -= len(sp.out)
        sp.out = bytearray()
        if sp.sock is not None:
            sp.sock.close()
        if self._splices.get(sp.sid) is sp:
            del self._splices[sp.sid]
        # The stream may still be known to the session when the local side failed first.
        self._session.reset_stream(sp.sid)

    # ---- opening streams from local connections ----

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("yamux listener accept failed name=%s errno=%s", self.name, exc.errno)
            return
        conn.setblocking(False)
        self._add_local(conn)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        with self._lock:
            socks = self._incoming_socks
            self._incoming_socks = []
            close = self._close_requested
        for sock in socks:
            self._add_local(sock)
        if self._posted:
            self._run_posted()
        if close:
            # Our local sockets are about to be closed: tell the peer now rather than
            # leaving its half of every stream waiting for a transport EOF.
            for sid in list(self._splices):
                self._session.reset_stream(sid)
            self._session.go_away(yamux.GoAwayCode.NORMAL)
            self._reason = CloseReason.CLOSED

    def _add_local(self, sock: socket.socket) -> None:
        self._waiting_opens.append(sock)
        self._open_waiting()

    def _open_waiting(self) -> None:
        session = self._session
        waiting = self._waiting_opens
        while waiting and session.can_open():
            sock = waiting.popleft()
            sid = session.open_stream()
            sp = _Splice(sid, sock)
            self._splices[sid] = sp
            self._stats["streams_total"] += 1
            log.debug("yamux stream opened name=%s stream=%d by=local", self.name, sid)
            self._update_interest(sp)
        if waiting and (session.remote_goaway or session.terminated
                        or (not session.can_open() and session.stream_count == 0)):
            # No stream can ever be opened for these: tell the local clients at once.
            log.info("yamux cannot open streams name=%s dropped=%d", self.name, len(waiting))
            while waiting:
                waiting.popleft().close()
        self._set_listeners(len(waiting) < MAX_WAITING_OPENS)

    # ---- shutdown ----

    def _teardown(self) -> None:
        with self._lock:
            self._wake_closed = True
            incoming = self._incoming_socks
            self._incoming_socks = []
        for sock in incoming:
            sock.close()
        self._final_flush()
        for sp in list(self._splices.values()):
            if not sp.closed:
                sp.closed = True
                if sp.endpoint is not None:
                    sp.endpoint.close()
                if sp.sock is not None:
                    sp.sock.close()
        self._posted.clear()
        self._endpoint_backlog.clear()
        self._splices.clear()
        self._local_buffered = 0
        while self._waiting_opens:
            self._waiting_opens.popleft().close()
        self._rsel.close()
        self._sel.close()
        os.close(self._wake_fd)

    def _final_flush(self) -> None:
        if self._reason in (CloseReason.EOF, CloseReason.HANGUP, CloseReason.IO_ERROR):
            return
        deadline = time.monotonic() + FINAL_FLUSH_SECONDS
        out = self._session.output
        if not out:
            return
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._fd, _W)
                while out and time.monotonic() < deadline:
                    try:
                        n = os.write(self._fd, out)
                    except (BlockingIOError, InterruptedError):
                        sel.select(max(0.0, deadline - time.monotonic()))
                        continue
                    self._session.output_written(n)
                    self._stats["bytes_out"] += n
        except (OSError, ValueError) as exc:
            # The session is over either way; the peer will see the transport close.
            log.debug("yamux final flush failed name=%s error=%s", self.name, exc)


# ---- plain splice, no yamux (vsock) ----


class _Half:
    """One direction of a relayed connection: bytes read from one socket, not yet written
    to the other; `eof` once the reader saw EOF, `shut` once the writer was shut down."""

    __slots__ = ("buf", "eof", "shut")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.shut = False


class _Pair:
    __slots__ = ("a", "a_to_b", "b", "b_to_a", "closed", "deadline", "masks")

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a = a
        self.b = b
        self.a_to_b = _Half()
        self.b_to_a = _Half()
        self.closed = False
        self.deadline = 0.0
        self.masks = {a.fileno(): 0, b.fileno(): 0}


RELAY_BUFFER_LIMIT = 256 * 1024
RELAY_POLL_SECONDS = 0.1


def relay_listener(
    listener: socket.socket,
    backend_path: str | Callable[[], socket.socket],
    stop: threading.Event,
) -> None:
    """Plain splice (no yamux): each connection accepted on `listener` (e.g. AF_VSOCK) is
    spliced to a new connection to `backend_path` (or to the socket a callable returns),
    all in one selector loop; returns when `stop` is set."""
    _Relay(listener, backend_path).run(stop)


class _Relay:
    def __init__(self, listener: socket.socket,
                 backend: str | Callable[[], socket.socket]) -> None:
        self.listener = listener
        self.backend = backend
        self.sel = selectors.DefaultSelector()
        self.pairs: set[_Pair] = set()
        self.connecting: list[_Pair] = []
        self.buf = bytearray(LOCAL_READ_SIZE)

    def run(self, stop: threading.Event) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, _R, None)
        try:
            while not stop.is_set():
                timeout = CONNECT_RETRY_STEP if self.connecting else RELAY_POLL_SECONDS
                for key, mask in self.sel.select(timeout):
                    if key.data is None:
                        self._accept()
                        continue
                    pair: _Pair = key.data
                    if not pair.closed:
                        self._service(pair, key.fileobj, mask)  # type: ignore[arg-type]
                if self.connecting:
                    self._retry()
        finally:
            self.sel.unregister(self.listener)
            for pair in list(self.pairs) + self.connecting:
                self._close(pair)
            self.sel.close()

    def _accept(self) -> None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("relay accept failed errno=%s", exc.errno)
            return
        conn.setblocking(False)
        try:
            if isinstance(self.backend, str):
                backend, connected = _start_unix_connect(self.backend)
            else:
                backend, connected = self.backend(), True
                backend.setblocking(False)
        except OSError as exc:
            log.warning("relay backend connect failed backend=%s error=%s", self.backend, exc)
            conn.close()
            return
        pair = _Pair(conn, backend)
        if connected:
            self.pairs.add(pair)
            self._update(pair)
        else:
            pair.deadline = time.monotonic() + CONNECT_RETRY_SECONDS
            self.connecting.append(pair)

    def _retry(self) -> None:
        now = time.monotonic()
        still: list[_Pair] = []
        for pair in self.connecting:
            assert isinstance(self.backend, str)
            err = pair.b.connect_ex(self.backend)
            if err in (0, errno.EISCONN):
                self.pairs.add(pair)
                self._update(pair)
            elif err in _RETRY_CONNECT_ERRNOS and now < pair.deadline:
                still.append(pair)
            else:
                log.warning("relay backend connect failed backend=%s error=%s",
                            self.backend, os.strerror(err))
                self._close(pair)
        self.connecting = still

    def _service(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        if sock is pair.a:
            inbound, outbound, other = pair.a_to_b, pair.b_to_a, pair.b
        else:
            inbound, outbound, other = pair.b_to_a, pair.a_to_b, pair.a
        try:
            if mask & _W and outbound.buf:
                n = sock.send(outbound.buf)
                del outbound.buf[:n]
            if mask & _R and not inbound.eof and len(inbound.buf) < RELAY_BUFFER_LIMIT:
                n = sock.recv_into(self.buf)
                if n == 0:
                    inbound.eof = True
                else:
                    inbound.buf += memoryview(self.buf)[:n]
                    if len(inbound.buf) == n:
                        try:
                            sent = other.send(inbound.buf)
                            del inbound.buf[:sent]
                        except (BlockingIOError, InterruptedError):
                            pass
            for half, dst in ((pair.a_to_b, pair.b), (pair.b_to_a, pair.a)):
                if half.eof and not half.buf and not half.shut:
                    half.shut = True
                    dst.shutdown(socket.SHUT_WR)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.debug("relay connection failed errno=%s", exc.errno)
            self._close(pair)
            return
        if pair.a_to_b.shut and pair.b_to_a.shut:
            self._close(pair)
        else:
            self._update(pair)

    def _update(self, pair: _Pair) -> None:
        for sock, inbound, outbound in ((pair.a, pair.a_to_b, pair.b_to_a),
                                        (pair.b, pair.b_to_a, pair.a_to_b)):
            want = 0
            if not inbound.eof and len(inbound.buf) < RELAY_BUFFER_LIMIT:
                want |= _R
            if outbound.buf:
                want |= _W
            fd = sock.fileno()
            have = pair.masks[fd]
            if want != have:
                if have == 0:
                    self.sel.register(sock, want, pair)
                elif want == 0:
                    self.sel.unregister(sock)
                else:
                    self.sel.modify(sock, want, pair)
                pair.masks[fd] = want

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.a, pair.b):
            if pair.masks.get(sock.fileno()):
                self.sel.unregister(sock)
            sock.close()
        self.pairs.discard(pair)
