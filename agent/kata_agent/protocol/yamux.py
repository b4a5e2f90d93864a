"""Yamux framing and session state machine, without any I/O.

A `Session` consumes bytes read from the transport (`receive_data`) and returns events;
every action (open, accept, send, close, ping, GoAway) appends frames to one outgoing
buffer that the caller writes to the transport. Nothing here blocks or buffers without
bound: received data per stream is limited by the receive window we advertise, and data
is only framed when the peer's window allows it.

Wire format (12-byte big-endian header ``version u8, type u8, flags u16, stream u32,
length u32``; only Data frames carry a payload) and behaviour follow hashicorp/yamux as
used by Kata Containers 1.x.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

PROTO_VERSION = 0
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size
INITIAL_WINDOW = 256 * 1024
DEFAULT_ACCEPT_BACKLOG = 256
U32_MAX = 0xFFFFFFFF
# Opening is refused once the next id reaches this value (the reference does the same).
STREAM_ID_LIMIT = U32_MAX - 1


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    NONE = 0
    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class GoAwayCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


_DATA = 0
_WINDOW_UPDATE = 1
_PING = 2
_GO_AWAY = 3
_SYN = 0x1
_ACK = 0x2
_FIN = 0x4
_RST = 0x8


class YamuxError(Exception):
    """Base of the errors raised to the application."""


class SessionClosedError(YamuxError):
    """The session ended (protocol error, GoAway error received); nothing more can be sent."""


class StreamError(YamuxError):
    """An operation on a stream that does not exist or is in the wrong state."""


class StreamsExhaustedError(YamuxError):
    """No stream id left for this side."""


class RemoteGoAwayError(YamuxError):
    """The peer sent GoAway: it accepts no new streams."""


class OpenLimitError(YamuxError):
    """Too many of our opens are still waiting for the peer's ACK; retry after one arrives."""


@dataclass(slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if self.type == _DATA:
            if self.length != len(self.payload):
                raise ValueError("data frame length does not match its payload")
            return encode_header(_DATA, self.flags, self.stream_id, self.length) + self.payload
        if self.payload:
            raise ValueError("only data frames carry a payload")
        return encode_header(self.type, self.flags, self.stream_id, self.length)


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    if not 0 <= frame_type <= _GO_AWAY:
        raise ValueError(f"invalid frame type {frame_type}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"invalid flags {flags}")
    if not 0 <= stream_id <= U32_MAX or not 0 <= length <= U32_MAX:
        raise ValueError("stream id and length are 32-bit unsigned")
    return HEADER.pack(PROTO_VERSION, frame_type, flags, stream_id, length)


def encode_data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(_DATA, flags, stream_id, len(payload)) + payload


def encode_window_update(stream_id: int, delta: int, flags: int = 0) -> bytes:
    return encode_header(_WINDOW_UPDATE, flags, stream_id, delta)


def encode_ping(value: int, flags: int = _SYN) -> bytes:
    return encode_header(_PING, flags, 0, value)


def encode_go_away(code: int = GoAwayCode.NORMAL) -> bytes:
    return encode_header(_GO_AWAY, 0, 0, code)


class FrameDecoder:
    """Incremental decoder: feed arbitrary chunks, get whole frames back.

    A bad version or type, or a Data frame longer than `max_data_length` (larger than any
    receive window we advertise), sets `error`; the frames decoded before it are still
    returned and everything after it is ignored. At most one frame is buffered.
    """

    __slots__ = ("_buf", "error", "frames_in", "max_data_length")

    def __init__(self, max_data_length: int = INITIAL_WINDOW) -> None:
        self._buf = bytearray()
        self.error: str | None = None
        self.max_data_length = max_data_length
        self.frames_in = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self.error is not None or not data:
            return []
        buf = self._buf
        src: bytes | bytearray | memoryview
        if buf:
            buf += data
            src = buf
        else:
            src = data
        frames: list[Frame] = []
        off = 0
        size = len(src)
        unpack = HEADER.unpack_from
        limit = self.max_data_length
        with memoryview(src) as view:
            while size - off >= HEADER_SIZE:
                version, ftype, flags, sid, length = unpack(view, off)
                if version != PROTO_VERSION:
                    self.error = f"invalid protocol version {version}"
                    break
                if ftype == _DATA:
                    if length > limit:
                        self.error = f"data frame of {length} bytes exceeds the window {limit}"
                        break
                    end = off + HEADER_SIZE + length
                    if end > size:
                        break
                    payload = bytes(view[off + HEADER_SIZE : end]) if length else b""
                elif ftype <= _GO_AWAY:
                    end = off + HEADER_SIZE
                    payload = b""
                else:
                    self.error = f"invalid message type {ftype}"
                    break
                frames.append(Frame(ftype, flags, sid, length, payload))
                off = end
            if src is not buf and self.error is None and off < size:
                self._buf = bytearray(view[off:])
        if src is buf:
            if self.error is not None:
                buf.clear()
            else:
                del buf[:off]
        self.frames_in += len(frames)
        return frames


# ---- events returned by Session.receive_data ----


@dataclass(slots=True)
class StreamOpened:
    """The peer opened a stream: call accept_stream or refuse_stream."""

    stream_id: int


@dataclass(slots=True)
class StreamAccepted:
    """The peer ACKed a stream we opened."""

    stream_id: int


@dataclass(slots=True)
class DataReceived:
    """Payload for a stream; call `consumed` once the application has taken it."""

    stream_id: int
    data: bytes


@dataclass(slots=True)
class StreamFinished:
    """The peer half-closed the stream (FIN): no more data will arrive."""

    stream_id: int


@dataclass(slots=True)
class StreamClosed:
    """Both sides sent FIN; the session forgot the stream."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The peer reset (or refused) the stream; the session forgot it."""

    stream_id: int


@dataclass(slots=True)
class WindowOpened:
    """The stream's send window went from zero to `window`."""

    stream_id: int
    window: int


@dataclass(slots=True)
class PingAcked:
    value: int


@dataclass(slots=True)
class GoAwayReceived:
    code: int


@dataclass(slots=True)
class ProtocolViolation:
    """The peer broke the protocol; GoAway(protocol error) is queued, the session is over."""

    reason: str


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamFinished
    | StreamClosed
    | StreamReset
    | WindowOpened
    | PingAcked
    | GoAwayReceived
    | ProtocolViolation
)


class StreamState(enum.Enum):
    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    LOCAL_CLOSE = "local-close"
    REMOTE_CLOSE = "remote-close"


class _Stream:
    __slots__ = (
        "local_fin",
        "phase",
        "recv_held",
        "recv_window",
        "remote_fin",
        "send_window",
        "sid",
    )

    def __init__(self, sid: int, phase: StreamState) -> None:
        self.sid = sid
        self.phase = phase  # SYN_SENT, SYN_RECEIVED or ESTABLISHED
        self.send_window = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW
        self.recv_held = 0  # delivered to the application, not yet consumed
        self.local_fin = False
        self.remote_fin = False


class Session:
    """One yamux session, either role, as a pure state machine."""

    def __init__(
        self,
        role: Literal["client", "server"],
        *,
        accept_backlog: int = DEFAULT_ACCEPT_BACKLOG,
        max_unacked_opens: int | None = None,
        first_stream_id: int | None = None,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"invalid role {role!r}")
        if accept_backlog < 1:
            raise ValueError("accept_backlog must be positive")
        self.role = role
        self._local_parity = 1 if role == "client" else 0
        start = 1 if role == "client" else 2
        if first_stream_id is not None:
            if first_stream_id <= 0 or first_stream_id % 2 != self._local_parity:
                raise ValueError(f"first_stream_id {first_stream_id} has the wrong parity")
            start = first_stream_id
        self._next_id = start
        self.accept_backlog = accept_backlog
        self.max_unacked_opens = accept_backlog if max_unacked_opens is None else max_unacked_opens
        self._streams: dict[int, _Stream] = {}
        self._pending_accept = 0
        self._unacked_opens = 0
        self._out = bytearray()
        self._decoder = FrameDecoder(INITIAL_WINDOW)
        self._ping_id = 0
        self.local_goaway = False
        self.remote_goaway = False
        self.terminated = False
        self.frames_out = 0

    # ---- transport side ----

    @property
    def output(self) -> bytearray:
        """The live outgoing buffer; after writing n bytes of it call `output_written(n)`."""
        return self._out

    def output_written(self, n: int) -> None:
        del self._out[:n]

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def frames_in(self) -> int:
        return self._decoder.frames_in

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.terminated:
            return []
        events: list[Event] = []
        for frame in self._decoder.feed(data):
            self._handle(frame, events)
            if self.terminated:
                return events
        if self._decoder.error is not None:
            events.append(self._protocol_error(self._decoder.error))
        return events

    # ---- queries ----

    def send_window(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        if st is None or st.local_fin or st.phase is StreamState.SYN_RECEIVED:
            return 0
        return st.send_window

    def stream_state(self, stream_id: int) -> StreamState | None:
        st = self._streams.get(stream_id)
        if st is None:
            return None
        if st.local_fin:
            return StreamState.LOCAL_CLOSE
        if st.remote_fin:
            return StreamState.REMOTE_CLOSE
        return st.phase

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def can_open(self) -> bool:
        return (
            not self.terminated
            and not self.remote_goaway
            and self._next_id < STREAM_ID_LIMIT
            and self._unacked_opens < self.max_unacked_opens
        )

    # ---- application side ----

    def open_stream(self) -> int:
        self._check_alive()
        if self.remote_goaway:
            raise RemoteGoAwayError("the peer sent GoAway")
        if self._next_id >= STREAM_ID_LIMIT:
            raise StreamsExhaustedError("stream ids exhausted")
        if self._unacked_opens >= self.max_unacked_opens:
            raise OpenLimitError(f"{self._unacked_opens} opens wait for an ACK")
        sid = self._next_id
        self._next_id += 2
        self._streams[sid] = _Stream(sid, StreamState.SYN_SENT)
        self._unacked_opens += 1
        self._frame(_WINDOW_UPDATE, _SYN, sid, 0)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        self._check_alive()
        st = self._get(stream_id)
        if st.phase is not StreamState.SYN_RECEIVED:
            raise StreamError(f"stream {stream_id} is not waiting to be accepted")
        st.phase = StreamState.ESTABLISHED
        self._pending_accept -= 1
        self._frame(_WINDOW_UPDATE, _ACK, stream_id, self._window_delta(st, force=True))

    def refuse_stream(self, stream_id: int) -> None:
        self.reset_stream(stream_id)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Frame as much of `data` as the send window allows; returns the bytes taken."""
        self._check_alive()
        st = self._get(stream_id)
        if st.local_fin:
            raise StreamError(f"stream {stream_id} is closed for sending")
        if st.phase is StreamState.SYN_RECEIVED:
            raise StreamError(f"stream {stream_id} is not accepted yet")
        n = min(len(data), st.send_window)
        if n <= 0:
            return 0
        st.send_window -= n
        out = self._out
        out += HEADER.pack(PROTO_VERSION, _DATA, 0, stream_id, n)
        out += data if n == len(data) else memoryview(data)[:n]
        self.frames_out += 1
        return n

    def close_stream(self, stream_id: int) -> bool:
        """Half-close (FIN). Returns True when the stream is now closed both ways."""
        self._check_alive()
        st = self._get(stream_id)
        if st.local_fin:
            return False
        if st.phase is StreamState.SYN_RECEIVED:
            raise StreamError(f"stream {stream_id} is not accepted yet")
        st.local_fin = True
        self._frame(_WINDOW_UPDATE, _FIN, stream_id, 0)
        if st.remote_fin:
            self._forget(st)
            return True
        return False

    def reset_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None or self.terminated:
            return
        self._frame(_WINDOW_UPDATE, _RST, stream_id, 0)
        self._forget(st)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` received bytes: the window may be reopened."""
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return
        if n > st.recv_held:
            raise StreamError(f"stream {stream_id}: consumed {n} > held {st.recv_held}")
        st.recv_held -= n
        if st.remote_fin or self.terminated or st.phase is StreamState.SYN_RECEIVED:
            return
        delta = self._window_delta(st, force=False)
        if delta:
            self._frame(_WINDOW_UPDATE, 0, stream_id, delta)

    def ping(self, value: int | None = None) -> int:
        self._check_alive()
        if value is None:
            self._ping_id = (self._ping_id + 1) & U32_MAX
            value = self._ping_id
        self._frame(_PING, _SYN, 0, value)
        return value

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        if self.local_goaway or self.terminated:
            return
        self.local_goaway = True
        self._frame(_GO_AWAY, 0, 0, code)

    # ---- internals ----

    def _check_alive(self) -> None:
        if self.terminated:
            raise SessionClosedError("session terminated")

    def _get(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamError(f"unknown stream {stream_id}")
        return st

    def _frame(self, ftype: int, flags: int, sid: int, length: int) -> None:
        self._out += HEADER.pack(PROTO_VERSION, ftype, flags, sid, length)
        self.frames_out += 1

    def _window_delta(self, st: _Stream, *, force: bool) -> int:
        # Reopen only what the application has taken, and only in large steps, so a slow
        # reader holds the peer back and updates stay rare.
        delta = (INITIAL_WINDOW - st.recv_held) - st.recv_window
        if delta <= 0 or (delta < INITIAL_WINDOW // 2 and not force):
            return 0
        st.recv_window += delta
        return delta

    def _forget(self, st: _Stream) -> None:
        del self._streams[st.sid]
        if st.phase is StreamState.SYN_RECEIVED:
            self._pending_accept -= 1
        elif st.phase is StreamState.SYN_SENT:
            self._unacked_opens -= 1

    def _protocol_error(self, reason: str) -> ProtocolViolation:
        log.debug("yamux protocol error role=%s reason=%s", self.role, reason)
        if not self.terminated:
            if not self.local_goaway:
                self.local_goaway = True
            self._frame(_GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR)
            self.terminated = True
        return ProtocolViolation(reason)

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        ftype = frame.type
        if ftype <= _WINDOW_UPDATE:
            self._handle_stream_frame(frame, events)
        elif ftype == _PING:
            if frame.flags & _SYN:
                # Always answered, keepalive or not: the Kata host proxy relies on it.
                self._frame(_PING, _ACK, 0, frame.length)
            elif frame.flags & _ACK:
                events.append(PingAcked(frame.length))
        else:
            code = frame.length
            self.remote_goaway = True
            if code != GoAwayCode.NORMAL:
                self.terminated = True
            log.debug("yamux goaway received role=%s code=%d", self.role, code)
            events.append(GoAwayReceived(code))

    def _handle_stream_frame(self, frame: Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        flags = frame.flags
        st = self._streams.get(sid)
        if flags & _SYN:
            if st is not None:
                events.append(self._protocol_error(f"duplicate SYN for stream {sid}"))
                return
            if sid == 0 or sid & 1 == self._local_parity:
                # An id of our own parity would collide with the streams we open.
                events.append(self._protocol_error(f"SYN with invalid stream id {sid}"))
                return
            if flags & _RST:
                # Opened and aborted by the same frame: nothing to accept, nothing to
                # answer; whatever payload it carries belongs to no stream.
                log.debug("yamux stream opened and reset at once role=%s stream=%d",
                          self.role, sid)
                return
            if self.local_goaway or self._pending_accept >= self.accept_backlog:
                log.debug("yamux refusing stream role=%s stream=%d backlog=%d",
                          self.role, sid, self._pending_accept)
                self._frame(_WINDOW_UPDATE, _RST, sid, 0)
                return
            st = _Stream(sid, StreamState.SYN_RECEIVED)
            self._streams[sid] = st
            self._pending_accept += 1
            events.append(StreamOpened(sid))
        elif st is None:
            log.debug("yamux frame for unknown stream role=%s stream=%d type=%d len=%d",
                      self.role, sid, frame.type, frame.length)
            return
        if flags & _ACK and st.phase is StreamState.SYN_SENT:
            st.phase = StreamState.ESTABLISHED
            self._unacked_opens -= 1
            events.append(StreamAccepted(sid))
        if frame.type == _WINDOW_UPDATE:
            delta = frame.length
            if delta:
                old = st.send_window
                st.send_window = min(U32_MAX, old + delta)
                if old == 0 and not st.local_fin:
                    events.append(WindowOpened(sid, st.send_window))
        elif frame.length:
            n = frame.length
            if st.remote_fin:
                events.append(self._protocol_error(f"data after FIN on stream {sid}"))
                return
            if n > st.recv_window:
                events.append(self._protocol_error(
                    f"receive window exceeded on stream {sid}: {n} > {st.recv_window}"))
                return
            st.recv_window -= n
            st.recv_held += n
            events.append(DataReceived(sid, frame.payload))
        if flags & _RST:
            self._forget(st)
            events.append(StreamReset(sid))
            return
        if flags & _FIN:
            if st.remote_fin:
                events.append(self._protocol_error(f"duplicate FIN on stream {sid}"))
                return
            st.remote_fin = True
            events.append(StreamFinished(sid))
            if st.local_fin:
                self._forget(st)
                events.append(StreamClosed(sid))
