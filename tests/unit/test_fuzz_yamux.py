"""Fuzzing the yamux session with mutated captures of real conversations, for both roles.

tests/unit/test_yamux_props.py feeds random bytes to a server session; here the inputs are
valid frame streams recorded from two real sessions and then damaged the way a broken or
hostile peer would (bit flips, truncation, splices of other captures, duplicated and
reordered spans, giant length fields). Whatever arrives, the session must: raise nothing,
report at most one ProtocolViolation and then stop, keep every buffer within its window,
answer with a bounded number of well-formed frames, and finish each call promptly.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kata_agent.bridge import YamuxBridge
from kata_agent.protocol import yamux
from kata_agent.protocol.yamux import FrameDecoder, ProtocolViolation, Session

# Per example; the whole file stays well under 60 s in CI.
FUZZ = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
# Generous: one call on a few kilobytes must never come near this.
CALL_SECONDS = 1.0


def _pump(src: Session, dst: Session, wire: list[bytes], app: _App | None = None) -> None:
    data = src.data_to_send()
    if data:
        wire.append(data)
        events = dst.receive_data(data)
        if app is not None:
            app.handle(dst, events)


@dataclass
class _App:
    """Application side of a session: accepts every stream and consumes what arrives."""

    accept: bool = True
    received: dict[int, bytearray] = field(default_factory=dict)

    def handle(self, s: Session, events: list[yamux.Event]) -> None:
        for ev in events:
            if isinstance(ev, yamux.StreamOpened):
                # The same frame may have opened and reset (or the session may have ended
                # since): only a stream still waiting can be answered.
                if (s.terminated
                        or s.stream_state(ev.stream_id) is not yamux.StreamState.SYN_RECEIVED):
                    continue
                if self.accept:
                    s.accept_stream(ev.stream_id)
                else:
                    s.refuse_stream(ev.stream_id)
            elif isinstance(ev, yamux.DataReceived):
                self.received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if s.stream_state(ev.stream_id) is not None:
                    s.consumed(ev.stream_id, len(ev.data))


def record_conversation() -> tuple[bytes, bytes]:
    """Client->server and server->client bytes of a conversation using every frame kind:
    opens, data both ways (a grpc-sized message and a window's worth), window updates,
    pings, half-closes, a reset and a GoAway."""
    c, s = Session("client"), Session("server")
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    capp, sapp = _App(), _App()

    def flush() -> None:
        for _ in range(20):
            _pump(c, s, to_server, sapp)
            _pump(s, c, to_client, capp)
            if not c.output and not s.output:
                return

    a = c.open_stream()
    b = c.open_stream()
    flush()
    c.send_data(a, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)) * 4)
    c.ping()
    flush()
    s.send_data(a, b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + b"s" * 18)
    big = bytes(i & 0xFF for i in range(yamux.INITIAL_WINDOW))
    taken = c.send_data(b, big)
    assert taken == yamux.INITIAL_WINDOW
    flush()
    c.send_data(b, b"after the window reopened")
    c.close_stream(a)
    flush()
    s.close_stream(a)
    s.reset_stream(b)
    s.ping(7)
    flush()
    c.go_away()
    flush()
    return b"".join(to_server), b"".join(to_client)


TO_SERVER, TO_CLIENT = record_conversation()
CAPTURES = {"server": TO_SERVER, "client": TO_CLIENT}


def _frame_offsets(data: bytes) -> list[int]:
    offs, off = [], 0
    while off + yamux.HEADER_SIZE <= len(data):
        offs.append(off)
        _, t, _, _, n = yamux.HEADER.unpack_from(data, off)
        off += yamux.HEADER_SIZE + (n if t == 0 else 0)
    return offs


def test_captures_are_clean_conversations() -> None:
    """The seeds are valid: unmutated, both roles accept them without a violation."""
    for role, data in CAPTURES.items():
        s, out = drive(role, data, [], accept=True, backlog=256, send_back=False)
        events = out.events
        check_outcome(s, out)
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        assert any(isinstance(e, yamux.DataReceived) for e in events)
        kinds = {data[off + 1] for off in _frame_offsets(data)}
        assert kinds >= {0, 1, 2}, kinds
    assert TO_SERVER[-11] == yamux.FrameType.GO_AWAY


# -------------------------------------------------------------------- mutations

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**7)),
    st.tuples(st.just("splice"), st.integers(0, 10**7), st.integers(0, 10**7),
              st.integers(0, 600)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**7), st.integers(1, 600)),
    st.tuples(st.just("insert"), st.integers(0, 10**7), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("header"), st.integers(0, 10**7), st.integers(0, 3),
              st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("swap_frames"), st.integers(0, 10**7), st.integers(0, 10**7)),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    other = TO_CLIENT if data is TO_SERVER else TO_SERVER
    for op in ops:
        kind = op[0]
        n = max(len(buf), 1)
        if kind == "flip":
            _, pos, bit = op
            if buf:
                buf[int(pos) % n] ^= 1 << int(bit)
        elif kind == "truncate":
            del buf[int(op[1]) % n:]
        elif kind == "splice":
            _, pos, src, length = op
            s = int(src) % max(len(other), 1)
            at = int(pos) % (len(buf) + 1)
            buf[at:at] = other[s:s + int(length)]
        elif kind == "duplicate":
            _, pos, length = op
            at = int(pos) % n
            buf[at:at] = buf[at:at + int(length)]
        elif kind == "insert":
            _, pos, blob = op
            at = int(pos) % (len(buf) + 1)
            buf[at:at] = blob
        elif kind == "header":
            # Rewrite one frame header in place: type, flags, stream id and length.
            _, which, ftype, flags, sid, length = op
            offs = _frame_offsets(bytes(buf))
            if offs:
                off = offs[int(which) % len(offs)]
                struct.pack_into(">BBHII", buf, off, 0, ftype, flags, sid, length)
        elif kind == "swap_frames":
            offs = _frame_offsets(bytes(buf))
            if len(offs) >= 2:
                i = int(op[1]) % len(offs)
                j = int(op[2]) % len(offs)
                i, j = sorted((i, j))
                if i != j:
                    ends = [*offs[1:], len(buf)]
                    a, b = bytes(buf[offs[i]:ends[i]]), bytes(buf[offs[j]:ends[j]])
                    buf[offs[j]:ends[j]] = a
                    buf[offs[i]:ends[i]] = b
    return bytes(buf)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@dataclass
class Outcome:
    events: list[yamux.Event]
    frames_out: int
    frames_in: int


def drive(role: str, data: bytes, cuts: list[int], *, accept: bool, backlog: int,
          send_back: bool) -> tuple[Session, Outcome]:
    """Feed ``data`` to a fresh session in chunks, checking the bounds after every call."""
    s = Session(role, accept_backlog=backlog, max_unacked_opens=8)  # type: ignore[arg-type]
    app = _App(accept=accept)
    events: list[yamux.Event] = []
    app_frames = 0
    if role == "client":
        # The recorded server side answers the client's two opens: make them first.
        s.open_stream()
        s.open_stream()
        app_frames = 2
    # Cut at frame boundaries too, so the application consumes between frames as a real
    # reader does and replays go deep into the conversation.
    for chunk in chunked(data, cuts + _frame_offsets(data)):
        started = time.monotonic()
        got = s.receive_data(chunk)
        assert time.monotonic() - started < CALL_SECONDS
        events += got
        app.handle(s, got)
        if send_back and not s.terminated:
            for ev in got:
                if isinstance(ev, yamux.DataReceived) and s.send_window(ev.stream_id) > 0:
                    before = s.frames_out
                    s.send_data(ev.stream_id, b"echo")
                    app_frames += s.frames_out - before
        # Never more buffered than one header plus the largest frame we accept.
        assert s._decoder.buffered <= yamux.HEADER_SIZE + yamux.INITIAL_WINDOW
        # Streams waiting for accept never exceed the backlog.
        pending = sum(1 for sid in list(s._streams)
                      if s.stream_state(sid) is yamux.StreamState.SYN_RECEIVED)
        assert pending <= backlog
        for st_ in s._streams.values():
            assert 0 <= st_.recv_held <= yamux.INITIAL_WINDOW
            assert 0 <= st_.recv_window <= yamux.INITIAL_WINDOW
            assert 0 <= st_.send_window <= yamux.U32_MAX
    return s, Outcome(events, s.frames_out - app_frames, s.frames_in)


def check_outcome(s: Session, out: Outcome) -> None:
    violations = [e for e in out.events if isinstance(e, ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert s.terminated
        assert out.events[-1] is violations[0]
        # A terminated session takes nothing more and says nothing more.
        before = len(s.output)
        assert s.receive_data(TO_SERVER[:64]) == []
        assert len(s.output) == before
    # Each incoming frame earns at most two answers (ping ACK, RST, or accept plus window
    # update) and the session adds at most one GoAway: no amplification.
    assert out.frames_out <= 2 * out.frames_in + 1
    wire = s.data_to_send()
    dec = FrameDecoder(max_data_length=2**32 - 1)
    frames = dec.feed(wire)
    assert dec.error is None and dec.buffered == 0
    for f in frames:
        assert f.type in (0, 1, 2, 3)


@FUZZ
@given(st.sampled_from(["server", "client"]), st.lists(mutation, min_size=1, max_size=6),
       st.lists(st.integers(0, 10**6), max_size=12), st.booleans(), st.integers(1, 8),
       st.booleans())
def test_mutated_captures(role: str, ops: list[tuple[Any, ...]], cuts: list[int],
                          accept: bool, backlog: int, send_back: bool) -> None:
    data = mutate(CAPTURES[role], ops)
    s, out = drive(role, data, cuts, accept=accept, backlog=backlog, send_back=send_back)
    check_outcome(s, out)


@FUZZ
@given(st.sampled_from(["server", "client"]),
       st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 2, 4, 8, 3, 5, 0xF]),
                          st.sampled_from([0, 1, 2, 3, 4, 5, 0xFFFFFFFF, 0xFFFFFFFE]),
                          st.integers(0, 2 * yamux.INITIAL_WINDOW)),
                min_size=1, max_size=40),
       st.lists(st.integers(0, 10**6), max_size=12))
def test_hostile_frame_sequences(role: str, frames: list[tuple[int, int, int, int]],
                                 cuts: list[int]) -> None:
    """Frames with valid headers but hostile meaning: SYN floods, duplicate SYNs, data
    beyond the window (declared, not sent: the length field alone must not make us buffer
    more than a window), window updates to the 32-bit limit, FIN/RST on unknown ids."""
    wire = bytearray()
    for ftype, flags, sid, length in frames:
        if ftype == 0:
            # Data frames carry what they declare, but never more than a little over the
            # window so the example stays small; the decoder must refuse the rest.
            payload_len = min(length, yamux.INITIAL_WINDOW + 1)
            wire += yamux.HEADER.pack(0, 0, flags, sid, payload_len) + b"\xAA" * payload_len
        else:
            wire += yamux.HEADER.pack(0, ftype, flags, sid, length)
    s, out = drive(role, bytes(wire), cuts, accept=False, backlog=4, send_back=False)
    check_outcome(s, out)


@FUZZ
@given(st.sampled_from(["server", "client"]), st.integers(0, 0xFFFFFFFF),
       st.integers(0, yamux.INITIAL_WINDOW))
def test_declared_length_never_buffers_past_the_window(role: str, length: int,
                                                       sent: int) -> None:
    """A data header that promises ``length`` bytes and then sends only part of them: we
    either refuse at once (beyond the window) or hold at most that one frame."""
    sid = 1 if role == "server" else 2
    head = yamux.HEADER.pack(0, 0, 1, sid, length)
    s = Session(role)  # type: ignore[arg-type]
    events = s.receive_data(head + b"\x00" * min(sent, length))
    if length > yamux.INITIAL_WINDOW:
        assert any(isinstance(e, ProtocolViolation) for e in events)
        assert s.terminated and s._decoder.buffered == 0
    else:
        assert s._decoder.buffered <= yamux.HEADER_SIZE + length


def test_syn_flood_is_bounded_by_the_backlog() -> None:
    """Ten thousand SYNs nobody accepts: the session holds at most the backlog, refuses
    the rest with one RST each."""
    backlog = 16
    s = Session("server", accept_backlog=backlog)
    flood = b"".join(yamux.encode_window_update(2 * i + 1, 0, flags=yamux.Flag.SYN)
                     for i in range(10_000))
    started = time.monotonic()
    events = s.receive_data(flood)
    assert time.monotonic() - started < 5.0
    assert sum(isinstance(e, yamux.StreamOpened) for e in events) == backlog
    assert s.stream_count == backlog
    # The queued ones wait for the application; every other SYN gets exactly one RST.
    frames = FrameDecoder().feed(s.data_to_send())
    assert s.frames_out == len(frames) == 10_000 - backlog
    assert all(f.flags == yamux.Flag.RST for f in frames)


def test_ping_flood_answers_one_for_one() -> None:
    """Pings are always answered, but never with more than one frame each."""
    s = Session("client")
    pings = b"".join(yamux.encode_ping(i) for i in range(5000))
    s.receive_data(pings)
    assert len(s.data_to_send()) == 5000 * yamux.HEADER_SIZE


def test_bridge_survives_a_stream_opened_and_reset_in_one_frame(tmp_path: Path) -> None:
    """Attack: one 12-byte frame (window update, flags SYN|RST) from the host, found by
    test_mutated_captures. The bridge must keep serving: pings after it are answered."""
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(str(tmp_path / "backend.sock"))
    backend.listen(16)
    host, guest = socket.socketpair()
    bridge = YamuxBridge(guest.fileno(), "server", name="fuzz")
    bridge.serve_streams_to(str(tmp_path / "backend.sock"))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run()
        except BaseException as err:  # recorded for the assertion below
            failure.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        host.settimeout(0.05)
        dec = FrameDecoder()

        def ping(value: int) -> None:
            host.sendall(yamux.encode_ping(value))
            frames: list[yamux.Frame] = []
            deadline = time.monotonic() + 20
            while not any(f.type == yamux.FrameType.PING and f.length == value
                          for f in frames):
                assert not failure, failure
                assert time.monotonic() < deadline, "no ping answer"
                try:
                    data = host.recv(4096)
                except TimeoutError:
                    continue
                assert data, "bridge closed the channel"
                frames += dec.feed(data)

        host.sendall(yamux.encode_window_update(1, 0, flags=yamux.Flag.SYN | yamux.Flag.RST))
        ping(1)
        ping(2)  # answered only by a bridge still running after the frame above
        assert not failure
        assert thread.is_alive()
    finally:
        bridge.close()
        thread.join(10)
        host.close()
        guest.close()
        backend.close()
