"""A unary gRPC server over HTTP/2, built on the sans-IO ``h2`` state machine.

The agent only serves unary RPCs, so the transport can stay small. A ``Connection`` is one
HTTP/2 connection's protocol without a transport: its owner feeds it received bytes and
writes what it produces. Two kinds of owner exist: the server's own I/O thread, one
``selectors`` loop over every listening and accepted socket, and a yamux session serving
its streams in-process (``bridge.YamuxBridge.serve_streams_with``). Only the owner's thread
touches a connection.

A request is buffered until its stream ends (bounded at ``max_message_bytes``), then its
handler runs on a worker of a lazily grown pool (or inline, for handlers that never block);
the reply goes back to the owner's thread through ``post`` and is sent within the peer's
flow-control windows, pulled by the owner in bounded pieces as its transport drains.

Wire format (gRPC over HTTP/2): a request is HEADERS (``:method POST``, ``:path
/<service>/<method>``, ``content-type application/grpc[+proto]``, optional ``grpc-timeout``)
and DATA holding one length-prefixed message (1 byte compressed flag, 4 bytes big-endian
length). A reply is HEADERS ``:status 200``, DATA with one length-prefixed message, and
trailers ``grpc-status`` / ``grpc-message``; an error is a trailers-only reply.

Cancellation reaches the handler through its ``CallContext``: a RST_STREAM from the client,
the connection closing, an expired ``grpc-timeout`` or the server stopping run the callbacks
given to ``add_callback``.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import logging
import math
import os
import re
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 512
# An idle worker thread exits after this long; the next call starts a new one.
WORKER_IDLE_SECONDS = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Streams a client may have open at once on one connection.
MAX_CONCURRENT_STREAMS = 1024
# Request bytes buffered for unfinished calls of one connection; beyond it the client is
# flooding and the connection is closed (ENHANCE_YOUR_CALM).
MAX_BUFFERED_PER_CONNECTION = 64 * 1024 * 1024
# Windows we grant: a 1 MiB CopyFile chunk flows without waiting for a WINDOW_UPDATE.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_HEADER_LIST_SIZE = 16 * 1024
READ_SIZE = 256 * 1024
# Largest DATA frame we send.
DATA_CHUNK = 64 * 1024
# Reply bytes framed per data_to_send(): the owner pulls more as its transport drains, so
# big replies move through small, cache-friendly buffers.
SEND_BUDGET = 256 * 1024
# Deadline entries of finished calls are purged when the heap grows past this.
DEADLINE_COMPACT_MIN = 4096
# Stop reading a connection while this much waits to be written to it (a peer that sends
# PINGs but never reads).
OUT_HIGH_WATER = 4 * 1024 * 1024

PREFIX_LEN = 5
_TIMEOUT_RE = re.compile(rb"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class StatusCode(enum.IntEnum):
    """gRPC status codes, numbered as in the gRPC specification."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Abort(Exception):
    """Raised by ``CallContext.abort``: the call ends with this status."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class Route:
    """One unary method: bytes -> request, the handler, reply -> bytes.

    ``inline`` handlers run on the I/O thread, saving two thread switches per call: only
    for handlers that never block and return at once (a health check)."""

    deserialize: Callable[[bytes], Any]
    handler: Callable[[Any, CallContext], Any]
    serialize: Callable[[Any], bytes]
    inline: bool = False


def encode_grpc_message(text: str) -> bytes:
    """Percent-encode a status message as the gRPC spec asks: UTF-8, then every byte outside
    printable ASCII, and ``%`` itself, as ``%XX``."""
    out = bytearray()
    for b in text.encode("utf-8", errors="replace"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; None when malformed."""
    m = _TIMEOUT_RE.match(value)
    if m is None:
        return None
    return int(m.group(1)) * _TIMEOUT_UNIT[m.group(2)]


class CallContext:
    """What a handler sees of its call (the part of grpc.ServicerContext the agent uses)."""

    __slots__ = ("_callbacks", "_cancelled", "_lock", "deadline", "metadata", "method")

    def __init__(self, method: str, deadline: float | None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.method = method
        self.deadline = deadline
        self.metadata = metadata
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call is cancelled; False (not registered) if it is
        over already."""
        with self._lock:
            if self._cancelled:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return not self._cancelled

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def abort(self, code: StatusCode, details: str) -> NoReturn:
        raise Abort(code, details)

    def cancel(self) -> None:
        """End the call early: callbacks run once, on the calling thread."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("cancel callback failed method=%s", self.method)


class _Slot:
    """An idle worker waiting for a task handed to it directly."""

    __slots__ = ("ready", "task")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.task: Callable[[], None] | None = None


class WorkerPool:
    """Threads started on demand up to ``max_workers``; an idle one exits after
    ``idle_seconds``. A submitted task goes straight to an idle worker, else to a new
    thread, else (at the limit) to a backlog the next free worker takes from."""

    def __init__(self, max_workers: int, *, idle_seconds: float = WORKER_IDLE_SECONDS,
                 name: str = "rpc") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []
        self._backlog: deque[Callable[[], None]] = deque()
        self._threads = 0
        self._numbers = itertools.count(1)

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                slot = self._idle.pop()  # the most recently idle: the others may age out
                slot.task = task
                slot.ready.set()
                return
            if self._threads >= self.max_workers:
                self._backlog.append(task)
                return
            self._threads += 1
        try:
            threading.Thread(target=self._work, args=(task,), daemon=True,
                             name=f"{self.name}-{next(self._numbers)}").start()
        except RuntimeError:
            log.error("cannot start a worker thread threads=%d", self._threads)
            with self._lock:
                self._threads -= 1
                self._backlog.append(task)

    def _work(self, task: Callable[[], None]) -> None:
        slot = _Slot()
        while True:
            try:
                task()
            except BaseException:
                log.exception("worker task failed")
            with self._lock:
                if self._backlog:
                    task = self._backlog.popleft()
                    continue
                slot.task = None
                slot.ready.clear()
                self._idle.append(slot)
            slot.ready.wait(self.idle_seconds)
            with self._lock:
                if slot.task is not None:  # handed a task, possibly just as the wait ended
                    task = slot.task
                    continue
                self._idle.remove(slot)
                self._threads -= 1
                return


class _State(enum.Enum):
    RECEIVING = 1
    RUNNING = 2
    SENDING = 3
    DONE = 4


class _Call:
    __slots__ = ("body", "context", "path", "remote_closed", "reply", "route", "sent", "state",
                 "stream_id", "trailers")

    def __init__(self, stream_id: int, path: str, route: Route | None,
                 context: CallContext) -> None:
        self.stream_id = stream_id
        self.path = path
        self.route = route
        self.context = context
        self.body = bytearray()
        self.state = _State.RECEIVING
        self.remote_closed = False
        self.reply = b""
        self.sent = 0
        self.trailers: list[tuple[bytes, bytes]] = []


Post = Callable[[Callable[[], None]], None]


class Connection:
    """One HTTP/2 connection's gRPC protocol, without a transport.

    Its owner (the server's socket loop, or a yamux session serving a stream in-process)
    feeds it received bytes with ``receive``, writes out what ``data_to_send`` returns, and
    runs the functions given to ``post`` (from any thread) on its own thread, flushing
    afterwards: that is how replies from workers and expired deadlines come back. Only the
    owner's thread touches the connection. ``closing`` means: flush, then close.
    """

    def __init__(self, server: Server, name: str, post: Post) -> None:
        self.server = server
        self.name = name
        self.post = post
        # Received headers are validated; the ones we send are our own constants.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.calls: dict[int, _Call] = {}
        self.buffered = 0
        self.closing = False
        self.closed = False
        self.has_more = False  # replies wait for the next data_to_send (not for a window)
        self._budget = SEND_BUDGET
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    # -- owner API -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write now; while ``has_more``, call again once they are written."""
        self._budget = SEND_BUDGET
        if self.has_more:
            self.has_more = False
            self._pump_all()
        return self.h2.data_to_send()

    def receive(self, data: bytes | memoryview) -> None:
        """Process bytes from the client; on a protocol violation ``closing`` is set (with
        a GOAWAY queued when h2 has one)."""
        if self.closing or self.closed:
            return
        try:
            for event in self.h2.receive_data(data):
                self._on_event(event)
        except h2.exceptions.ProtocolError as err:
            log.warning("connection protocol error conn=%s error=%s", self.name, err)
            self.closing = True
            return
        except Exception:
            # Whatever a client sends must not take the server down with it.
            log.exception("connection failed conn=%s", self.name)
            self.closing = True
            return
        if self.buffered > MAX_BUFFERED_PER_CONNECTION:
            log.warning("connection buffers too much conn=%s bytes=%d", self.name, self.buffered)
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self.closing = True

    def close(self) -> None:
        """The transport is gone: every call on it is cancelled."""
        if self.closed:
            return
        for call in list(self.calls.values()):
            self._end(call)
        self.closed = True

    def shutdown(self) -> None:
        """The server stops: unfinished calls end (UNAVAILABLE), then a GOAWAY."""
        for call in list(self.calls.values()):
            if call.state is not _State.SENDING:
                self._finish(call, StatusCode.UNAVAILABLE, "the agent is stopping", None)
            self._end(call)
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection()
        self.closing = True

    def expire(self, call: _Call) -> None:
        if call.state is _State.DONE:
            return
        log.info("rpc deadline exceeded method=%s conn=%s", call.path, self.name)
        call.context.cancel()
        if call.state is _State.SENDING:
            self._reset(call, h2.errors.ErrorCodes.CANCEL)
        else:
            self._finish(call, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", None)

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id or 0)
            if call is not None:
                call.remote_closed = True
                if call.state is _State.RECEIVING:
                    self._dispatch(call)
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.get(event.stream_id or 0)
            if call is not None:
                log.info("rpc cancelled by client method=%s conn=%s", call.path, self.name)
                call.remote_closed = True
                self._end(call)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                call = self.calls.get(event.stream_id)
                if call is not None and call.state is _State.SENDING:
                    self._pump(call)
            else:
                self._pump_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._pump_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            log.info("client closed the connection conn=%s code=%s", self.name, event.error_code)
            for call in list(self.calls.values()):
                self._end(call)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id or 0
        headers: dict[bytes, bytes] = {}
        metadata: list[tuple[str, str]] = []
        for name, value in event.headers or []:
            key, val = bytes(name), bytes(value)
            headers.setdefault(key, val)
            if not key.startswith(b":") and not key.startswith(b"grpc-"):
                metadata.append((key.decode("latin-1"), val.decode("latin-1")))
        path = headers.get(b":path", b"").decode("utf-8", errors="replace")
        if headers.get(b":method") != b"POST":
            self._respond_http(sid, b"405")
            return
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            self._respond_http(sid, b"415")
            return
        deadline = None
        if b"grpc-timeout" in headers:
            seconds = parse_timeout(headers[b"grpc-timeout"])
            if seconds is None:
                log.warning("bad grpc-timeout conn=%s value=%r", self.name,
                            headers[b"grpc-timeout"][:32])
            else:
                deadline = time.monotonic() + seconds
        server = self.server
        call = _Call(sid, path, server.routes.get(path), CallContext(path, deadline,
                                                                     tuple(metadata)))
        self.calls[sid] = call
        if server.stopping:
            self._finish(call, StatusCode.UNAVAILABLE, "the agent is stopping", None)
            return
        if deadline is not None:
            server.add_deadline(deadline, self, call)
        if call.route is None:
            code, msg = server.unknown(path)
            log.info("rpc unknown method=%s conn=%s", path[:256], self.name)
            self._finish(call, code, msg, None)

    def _respond_http(self, sid: int, status: bytes) -> None:
        """Not a gRPC request: a plain HTTP status, and the stream is over."""
        log.warning("not a grpc request conn=%s stream=%d status=%s", self.name, sid,
                    status.decode())
        self.h2.send_headers(sid, [(b":status", status)], end_stream=True)
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id or 0
        length = event.flow_controlled_length or 0
        if length:
            # The bytes are ours now (bounded below): hand the window back at once.
            self.h2.acknowledge_received_data(length, sid)
        call = self.calls.get(sid)
        if call is None or call.state is not _State.RECEIVING:
            return
        data = event.data or b""
        call.body += data
        self.buffered += len(data)
        if len(call.body) >= PREFIX_LEN:
            flag = call.body[0]
            size = int.from_bytes(call.body[1:PREFIX_LEN], "big")
            limit = self.server.max_message_bytes
            if flag != 0:
                self._finish(call, StatusCode.UNIMPLEMENTED,
                             "compressed messages are not supported", None)
            elif size > limit:
                self._finish(call, StatusCode.RESOURCE_EXHAUSTED,
                             f"request of {size} bytes is larger than the limit {limit}", None)
            elif len(call.body) > PREFIX_LEN + size:
                self._finish(call, StatusCode.INTERNAL,
                             "more than one request message in a unary call", None)

    def _dispatch(self, call: _Call) -> None:
        body = bytes(call.body)
        self.buffered -= len(call.body)
        call.body = bytearray()
        if len(body) < PREFIX_LEN or len(body) != PREFIX_LEN + int.from_bytes(body[1:5], "big"):
            self._finish(call, StatusCode.INTERNAL, "the call carries no complete request", None)
            return
        route = call.route
        assert route is not None
        call.state = _State.RUNNING
        server = self.server
        if route.inline:
            self._send_reply(call, *server.execute(call.path, route, call.context,
                                                   body[PREFIX_LEN:]))
            return

        def run() -> None:
            result = server.execute(call.path, route, call.context, body[PREFIX_LEN:])
            self.post(lambda: self._send_reply(call, *result))

        server.pool.submit(run)

    # -- replies ---------------------------------------------------------------------------

    def _send_reply(self, call: _Call, code: StatusCode, msg: str, reply: bytes) -> None:
        if call.state is not _State.RUNNING or self.closed:
            return  # cancelled meanwhile: nobody waits for it
        self._finish(call, code, msg, reply if code is StatusCode.OK else None)

    def _finish(self, call: _Call, code: StatusCode, msg: str, reply: bytes | None) -> None:
        """Start the reply: a message and trailers, or trailers only (errors)."""
        if call.state is not _State.RUNNING and call.state is not _State.RECEIVING:
            return
        if call.state is _State.RECEIVING:
            self.buffered -= len(call.body)
            call.body = bytearray()
        status = [(b"grpc-status", str(int(code)).encode())]
        if msg:
            status.append((b"grpc-message", encode_grpc_message(msg)))
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        try:
            if reply is None:
                self.h2.send_headers(call.stream_id, head + status, end_stream=True)
                self._end(call, cancel=code is not StatusCode.OK, completed=True)
                return
            self.h2.send_headers(call.stream_id, head)
        except h2.exceptions.H2Error as err:
            log.info("reply dropped method=%s conn=%s error=%s", call.path, self.name, err)
            self._end(call)
            return
        call.reply = reply
        call.trailers = status
        call.state = _State.SENDING
        self._pump(call)

    def _pump(self, call: _Call) -> None:
        """Send what the windows allow; the trailers once the message is out."""
        h = self.h2
        sid = call.stream_id
        view = memoryview(call.reply)
        # The length prefix, then the message in pieces: no copy of the message to join
        # them, and frames small enough for buffers that stay in cache.
        prefix = len(view).to_bytes(PREFIX_LEN, "big")
        total = PREFIX_LEN + len(view)
        try:
            while call.sent < total:
                if self._budget <= 0:
                    self.has_more = True
                    return
                room = min(h.local_flow_control_window(sid), h.max_outbound_frame_size,
                           DATA_CHUNK, total - call.sent)
                if room <= 0:
                    return
                if call.sent < PREFIX_LEN:
                    piece: bytes | memoryview = prefix[call.sent:call.sent + room]
                else:
                    start = call.sent - PREFIX_LEN
                    piece = view[start:start + room]
                h.send_data(sid, piece)
                call.sent += len(piece)
                self._budget -= len(piece)
            h.send_headers(sid, call.trailers, end_stream=True)
        except h2.exceptions.H2Error as err:
            log.info("reply dropped method=%s conn=%s error=%s", call.path, self.name, err)
            self._end(call)
            return
        self._end(call, cancel=False, completed=True)

    def _pump_all(self) -> None:
        for call in list(self.calls.values()):
            if call.state is _State.SENDING:
                self._pump(call)

    def _end(self, call: _Call, *, cancel: bool = True, completed: bool = False) -> None:
        """The call is over for us: ``cancel`` runs the context's callbacks; a client still
        sending is told to stop (NO_ERROR after a ``completed`` reply, else CANCEL)."""
        if call.state is _State.DONE:
            return
        if call.state is _State.RECEIVING:
            self.buffered -= len(call.body)
            call.body = bytearray()
        call.state = _State.DONE
        call.reply = b""
        self.calls.pop(call.stream_id, None)
        if cancel:
            call.context.cancel()
        if not call.remote_closed and not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.NO_ERROR
                                     if completed else h2.errors.ErrorCodes.CANCEL)
            call.remote_closed = True

    def _reset(self, call: _Call, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(call.stream_id, code)
        call.remote_closed = True
        self._end(call)


class _Sock:
    """A connection the server's own loop carries over a socket."""

    __slots__ = ("conn", "fd", "out", "reading", "sock", "writing")

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = bytearray()
        self.reading = True
        self.writing = False


class Server:
    """The gRPC server: ``routes`` maps an HTTP/2 ``:path`` to its ``Route``.

    ``unknown`` answers paths not in ``routes`` (default: UNIMPLEMENTED). The lifecycle
    follows grpcio's server: ``add_insecure_port``, ``start``, ``stop(grace)`` returning an
    event set once everything is closed. Besides its own sockets, ``connection`` makes
    connections other loops carry (yamux streams served in-process).
    """

    def __init__(self, routes: Mapping[str, Route], *, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 unknown: Callable[[str], tuple[StatusCode, str]] | None = None) -> None:
        self.routes = dict(routes)
        self.max_message_bytes = max_message_bytes
        self.pool = WorkerPool(max_workers)
        self.unknown = unknown or (lambda path: (StatusCode.UNIMPLEMENTED,
                                                 f"unknown method {path}"))
        self.stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._posted: deque[tuple[_Sock, Callable[[], None]]] = deque()
        self._new_socks: deque[socket.socket] = deque()
        self._listeners: dict[int, tuple[socket.socket, str]] = {}
        self._socks: dict[int, _Sock] = {}
        self._deadline_lock = threading.Lock()
        self._deadlines: list[tuple[float, int, Connection, _Call]] = []
        self._compact_at = DEADLINE_COMPACT_MIN
        self._wake_at = 0.0  # when the loop's select returns on its own
        self._seq = itertools.count()
        self._conn_numbers = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="grpc-io", daemon=True)
        self._started = False
        self._stop_grace: float | None = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()

    # -- public API ----------------------------------------------------------------------

    def add_insecure_port(self, address: str) -> int:
        """Listen on ``unix:PATH`` (a stale socket at PATH is replaced, any other file is
        refused). Returns 1, or 0 when the address cannot be bound (as grpcio does)."""
        if not address.startswith("unix:"):
            log.error("unsupported address address=%s", address)
            return 0
        path = address[len("unix:"):]
        try:
            sock = bind_unix(path)
        except OSError as err:
            log.error("cannot listen address=%s error=%s", address, err)
            return 0
        self.add_listener(sock, path)
        return 1

    def add_listener(self, sock: socket.socket, path: str = "") -> None:
        """Serve connections accepted on a listening socket (``path`` is unlinked at stop)."""
        sock.setblocking(False)
        self._listeners[sock.fileno()] = (sock, path)
        self._selector.register(sock.fileno(), selectors.EVENT_READ, sock)

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve one connected socket (thread-safe): the server owns and closes it."""
        self._new_socks.append(sock)
        self._wake()

    def connection(self, name: str, post: Post) -> Connection:
        """A connection carried by another loop (see ``Connection``)."""
        return Connection(self, name, post)

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop accepting, let running calls finish for up to ``grace`` seconds, then cancel
        them and close every connection. The returned event is set when all is closed."""
        with self._stop_lock:
            if self._stop_grace is None:
                self._stop_grace = 0.0 if grace is None else max(0.0, grace)
                self.stopping = True
        if not self._started:
            self._close_all()
            self._stopped.set()
        else:
            self._wake()
        return self._stopped

    # -- used by connections (any owner thread) -------------------------------------------

    def add_deadline(self, when: float, conn: Connection, call: _Call) -> None:
        with self._deadline_lock:
            heap = self._deadlines
            if len(heap) >= self._compact_at:
                # Finished calls leave their entries behind: drop them all at once.
                heap[:] = [e for e in heap if e[3].state is not _State.DONE]
                heapq.heapify(heap)
                self._compact_at = max(DEADLINE_COMPACT_MIN, 2 * len(heap))
            heapq.heappush(heap, (when, next(self._seq), conn, call))
            # Most calls end long before their deadline: wake the loop only when it would
            # sleep past this one.
            wake = when < self._wake_at
        if wake:
            self._wake()

    def execute(self, path: str, route: Route, context: CallContext, payload: bytes
                ) -> tuple[StatusCode, str, bytes]:
        """Run one call's handler (on a worker, or inline): its status and reply bytes."""
        code, msg, reply = StatusCode.OK, "", b""
        try:
            request = route.deserialize(payload)
        except Exception as err:
            code, msg = StatusCode.INTERNAL, f"cannot parse the request: {err}"
        else:
            try:
                reply = route.serialize(route.handler(request, context))
            except Abort as ab:
                code, msg = ab.code, ab.details
            except Exception as err:
                log.exception("rpc handler failed method=%s", path)
                code, msg = StatusCode.UNKNOWN, f"{type(err).__name__}: {err}"
        if code is StatusCode.OK and len(reply) > self.max_message_bytes:
            code, msg, reply = (StatusCode.RESOURCE_EXHAUSTED,
                                f"reply of {len(reply)} bytes is larger than the limit "
                                f"{self.max_message_bytes}", b"")
        return code, msg, reply

    # -- I/O thread ------------------------------------------------------------------------

    def _wake(self) -> None:
        # Under the lock: once closed, the fd number may belong to someone else.
        with self._wake_lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._wake_fd, 1)

    def _loop(self) -> None:
        stop_deadline: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self._stop_grace is not None:
                    if stop_deadline is None:
                        stop_deadline = now + self._stop_grace
                        self._close_listeners()
                        log.info("server stopping grace=%.1f", self._stop_grace)
                    if now >= stop_deadline or not any(s.conn.calls
                                                       for s in self._socks.values()):
                        return
                timeout = self._next_timeout(now, stop_deadline)
                for key, mask in self._selector.select(timeout):
                    if key.fd == self._wake_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
                    elif key.fd in self._listeners:
                        self._accept(key.fd)
                    else:
                        s = self._socks.get(key.fd)
                        if s is None:
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._write(s)
                        if mask & selectors.EVENT_READ and not s.conn.closed:
                            self._read(s)
                while self._new_socks:
                    self._add_sock(self._new_socks.popleft())
                while self._posted:
                    s, fn = self._posted.popleft()
                    if not s.conn.closed:
                        fn()
                        self._flush(s)
                self._expire(time.monotonic())
        except Exception:
            log.exception("server I/O loop failed")
        finally:
            self._close_all()
            self._stopped.set()

    def _next_timeout(self, now: float, stop_deadline: float | None) -> float | None:
        when = [d for d in (stop_deadline,) if d is not None]
        with self._deadline_lock:
            while self._deadlines and self._deadlines[0][3].state is _State.DONE:
                heapq.heappop(self._deadlines)
            if self._deadlines:
                when.append(self._deadlines[0][0])
            self._wake_at = min(when) if when else math.inf
        if not when:
            return None
        return max(0.0, min(when) - now)

    def _expire(self, now: float) -> None:
        due: list[tuple[Connection, _Call]] = []
        with self._deadline_lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, conn, call = heapq.heappop(self._deadlines)
                due.append((conn, call))
        for conn, call in due:
            if call.state is not _State.DONE:
                conn.post(lambda c=conn, k=call: c.expire(k))  # type: ignore[misc]

    def _accept(self, fd: int) -> None:
        listener, path = self._listeners[fd]
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.error("accept failed path=%s error=%s", path, err)
                return
            self._add_sock(sock)

    def _add_sock(self, sock: socket.socket) -> None:
        if self.stopping:
            sock.close()
            return
        sock.setblocking(False)
        holder: list[_Sock] = []

        def post(fn: Callable[[], None]) -> None:
            self._posted.append((holder[0], fn))
            self._wake()

        s = _Sock(sock, Connection(self, f"c{next(self._conn_numbers)}", post))
        holder.append(s)
        self._socks[s.fd] = s
        self._selector.register(s.fd, selectors.EVENT_READ, s)
        self._flush(s)

    def _read(self, s: _Sock) -> None:
        try:
            data = s.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.info("connection read failed conn=%s error=%s", s.conn.name, err)
            self._drop(s)
            return
        if not data:
            self._drop(s)
            return
        s.conn.receive(data)
        self._flush(s)

    # -- socket I/O ------------------------------------------------------------------------

    def _flush(self, s: _Sock) -> None:
        if s.conn.closed:
            return
        if not s.writing:
            self._write(s)  # takes the connection's output as the socket drains
        else:
            s.out += s.conn.data_to_send()
            self._update_interest(s)
        if s.conn.closing and not s.conn.closed:
            self._drop(s)  # what could be written went out above

    def _write(self, s: _Sock) -> None:
        conn = s.conn
        while True:
            if not s.out:
                s.out += conn.data_to_send()
                if not s.out:
                    break
            try:
                n = s.sock.send(s.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                log.info("connection write failed conn=%s error=%s", conn.name, err)
                self._drop(s)
                return
            del s.out[:n]
        self._update_interest(s)

    def _update_interest(self, s: _Sock) -> None:
        if s.conn.closed:
            return
        writing = bool(s.out)
        reading = len(s.out) < OUT_HIGH_WATER
        if writing == s.writing and reading == s.reading:
            return
        s.writing, s.reading = writing, reading
        # Never neither: not reading means a full output buffer, so writing.
        mask = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if writing else 0)
        self._selector.modify(s.fd, mask, s)

    def _drop(self, s: _Sock) -> None:
        """Close a connection: every call on it is cancelled."""
        if s.conn.closed:
            return
        s.conn.close()
        self._socks.pop(s.fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(s.fd)
        s.sock.close()

    def _close_listeners(self) -> None:
        for fd, (sock, path) in list(self._listeners.items()):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
            sock.close()
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._listeners.clear()

    def _close_all(self) -> None:
        self._close_listeners()
        for s in list(self._socks.values()):
            s.conn.shutdown()
            with contextlib.suppress(OSError):
                s.sock.send(bytes(s.out) + s.conn.data_to_send())
            self._drop(s)
        while self._new_socks:
            self._new_socks.popleft().close()
        with contextlib.suppress(OSError):
            self._selector.close()
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1


def bind_unix(path: str, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """Listen on a unix socket at ``path``, replacing a stale socket (and only a socket)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        # Never replace a file someone put there, only a socket left by an earlier run.
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
