"""Yamux framing (golden bytes) and the sans-IO session state machine."""

from __future__ import annotations

import pytest
from kata_agent.protocol import yamux
from kata_agent.protocol.yamux import (
    DataReceived,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayCode,
    GoAwayReceived,
    PingAcked,
    ProtocolViolation,
    Session,
    StreamAccepted,
    StreamClosed,
    StreamFinished,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowOpened,
)

W = yamux.INITIAL_WINDOW


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ---- golden vectors (YAMUX-FACTS section 10 and more) ----

GOLDEN = [
    ("00 01 0001 00000001 00000000", Frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)),
    ("00 01 0002 00000001 00000000", Frame(FrameType.WINDOW_UPDATE, Flag.ACK, 1, 0)),
    ("00 02 0001 00000000 0000002a", Frame(FrameType.PING, Flag.SYN, 0, 42)),
    ("00 02 0002 00000000 0000002a", Frame(FrameType.PING, Flag.ACK, 0, 42)),
    ("00 00 0004 00000001 00000000", Frame(FrameType.DATA, Flag.FIN, 1, 0)),
    ("00 03 0000 00000000 00000000", Frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.NORMAL)),
    ("00 03 0000 00000000 00000001", Frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR)),
    ("00 03 0000 00000000 00000002", Frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.INTERNAL_ERROR)),
    ("00 00 0000 00000003 00000005 68656c6c6f", Frame(FrameType.DATA, 0, 3, 5, b"hello")),
    ("00 00 0001 00000005 00000002 6869", Frame(FrameType.DATA, Flag.SYN, 5, 2, b"hi")),
    ("00 00 0006 00000002 00000001 21", Frame(FrameType.DATA, Flag.ACK | Flag.FIN, 2, 1, b"!")),
    ("00 01 0008 00000007 00000000", Frame(FrameType.WINDOW_UPDATE, Flag.RST, 7, 0)),
    ("00 00 0008 00000009 00000000", Frame(FrameType.DATA, Flag.RST, 9, 0)),
    ("00 01 0000 00000001 00020000", Frame(FrameType.WINDOW_UPDATE, 0, 1, 131072)),
    ("00 01 0000 fffffffd ffffffff", Frame(FrameType.WINDOW_UPDATE, 0, 0xFFFFFFFD, 0xFFFFFFFF)),
    ("00 01 0004 00000004 00000000", Frame(FrameType.WINDOW_UPDATE, Flag.FIN, 4, 0)),
]


@pytest.mark.parametrize(("wire", "frame"), GOLDEN)
def test_golden_encode(wire: str, frame: Frame) -> None:
    assert frame.encode() == h(wire)


@pytest.mark.parametrize(("wire", "frame"), GOLDEN)
def test_golden_decode(wire: str, frame: Frame) -> None:
    dec = FrameDecoder()
    assert dec.feed(h(wire)) == [frame]
    assert dec.error is None
    assert dec.buffered == 0


def test_helper_encoders_match_vectors() -> None:
    assert yamux.encode_window_update(1, 0, Flag.SYN) == h("00 01 0001 00000001 00000000")
    assert yamux.encode_ping(42) == h("00 02 0001 00000000 0000002a")
    assert yamux.encode_ping(42, Flag.ACK) == h("00 02 0002 00000000 0000002a")
    assert yamux.encode_data(1, b"", Flag.FIN) == h("00 00 0004 00000001 00000000")
    assert yamux.encode_go_away(GoAwayCode.PROTOCOL_ERROR) == h("00 03 0000 00000000 00000001")
    assert yamux.encode_data(3, b"hello") == h("00 00 0000 00000003 00000005 68656c6c6f")


def test_encoder_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        yamux.encode_header(4, 0, 0, 0)
    with pytest.raises(ValueError):
        yamux.encode_header(0, 0x10000, 0, 0)
    with pytest.raises(ValueError):
        yamux.encode_header(1, 0, 2**32, 0)
    with pytest.raises(ValueError):
        Frame(FrameType.PING, 0, 0, 1, b"x").encode()
    with pytest.raises(ValueError):
        Frame(FrameType.DATA, 0, 1, 3, b"x").encode()


def test_decoder_byte_at_a_time() -> None:
    wire = b"".join(h(w) for w, _ in GOLDEN)
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(wire)):
        frames += dec.feed(wire[i : i + 1])
    assert frames == [f for _, f in GOLDEN]
    assert dec.buffered == 0


def test_decoder_accepts_memoryview_and_keeps_partial() -> None:
    wire = h("00 00 0000 00000003 00000005 68656c6c6f")
    buf = bytearray(wire[:14])
    dec = FrameDecoder()
    assert dec.feed(memoryview(buf)) == []
    buf[:] = b"\xff" * 14  # the caller reuses its buffer: the decoder must have copied
    assert dec.buffered == 14
    assert dec.feed(memoryview(wire)[14:]) == [Frame(0, 0, 3, 5, b"hello")]


@pytest.mark.parametrize("bad", ["01 01 0001 00000001 00000000", "00 04 0000 00000000 00000000"])
def test_decoder_rejects_bad_version_and_type(bad: str) -> None:
    good = h("00 02 0001 00000000 0000002a")
    dec = FrameDecoder()
    assert dec.feed(good + h(bad) + good) == [Frame(FrameType.PING, Flag.SYN, 0, 42)]
    assert dec.error is not None
    assert dec.feed(good) == []


def test_decoder_rejects_data_larger_than_window() -> None:
    dec = FrameDecoder()
    assert dec.feed(yamux.encode_header(0, 0, 1, W + 1)) == []
    assert dec.error is not None and "exceeds" in dec.error


# ---- session helpers ----


def pair() -> tuple[Session, Session]:
    return Session("client"), Session("server")


def pump(src: Session, dst: Session) -> list[yamux.Event]:
    return dst.receive_data(src.data_to_send())


def decode_all(data: bytes) -> list[Frame]:
    dec = FrameDecoder(max_data_length=2**32)
    frames = dec.feed(data)
    assert dec.error is None and dec.buffered == 0
    return frames


def established() -> tuple[Session, Session, int]:
    c, s = pair()
    sid = c.open_stream()
    assert pump(c, s) == [StreamOpened(sid)]
    s.accept_stream(sid)
    assert pump(s, c) == [StreamAccepted(sid)]
    return c, s, sid


# ---- session: opening ----


def test_open_sends_window_update_syn_and_ids_alternate() -> None:
    c, s = pair()
    assert c.open_stream() == 1
    assert c.data_to_send() == h("00 01 0001 00000001 00000000")
    assert c.open_stream() == 3
    assert s.open_stream() == 2
    assert s.open_stream() == 4
    assert c.stream_state(1) is StreamState.SYN_SENT


def test_accept_sends_ack_and_data_may_precede_it() -> None:
    c, s = pair()
    sid = c.open_stream()
    assert c.send_data(sid, b"early") == 5
    events = pump(c, s)
    assert events == [StreamOpened(sid), DataReceived(sid, b"early")]
    assert s.stream_state(sid) is StreamState.SYN_RECEIVED
    s.accept_stream(sid)
    assert s.data_to_send() == h("00 01 0002 00000001 00000000")
    assert c.receive_data(h("00 01 0002 00000001 00000000")) == [StreamAccepted(sid)]
    assert c.stream_state(sid) is StreamState.ESTABLISHED


def test_refuse_sends_rst_and_opener_sees_reset() -> None:
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    s.refuse_stream(sid)
    assert s.data_to_send() == h("00 01 0008 00000001 00000000")
    assert c.receive_data(h("00 01 0008 00000001 00000000")) == [StreamReset(sid)]
    assert c.stream_state(sid) is None


def test_duplicate_syn_is_protocol_error() -> None:
    s = Session("server")
    syn = h("00 01 0001 00000001 00000000")
    assert s.receive_data(syn) == [StreamOpened(1)]
    events = s.receive_data(syn)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert "duplicate SYN" in events[0].reason
    assert s.data_to_send().endswith(h("00 03 0000 00000000 00000001"))
    assert s.terminated
    assert s.receive_data(h("00 02 0001 00000000 00000001")) == []


def test_syn_with_own_parity_is_protocol_error() -> None:
    s = Session("server")
    events = s.receive_data(h("00 01 0001 00000002 00000000"))
    assert isinstance(events[0], ProtocolViolation)


def test_backlog_overflow_gets_rst() -> None:
    s = Session("server", accept_backlog=2)
    wire = b"".join(yamux.encode_window_update(i, 0, Flag.SYN) for i in (1, 3, 5))
    assert s.receive_data(wire) == [StreamOpened(1), StreamOpened(3)]
    assert s.data_to_send() == h("00 01 0008 00000005 00000000")
    s.accept_stream(1)
    s.data_to_send()
    assert s.receive_data(yamux.encode_window_update(7, 0, Flag.SYN)) == [StreamOpened(7)]
    assert s.data_to_send() == b""


def test_default_backlog_is_256() -> None:
    s = Session("server")
    wire = b"".join(yamux.encode_window_update(2 * i + 1, 0, Flag.SYN) for i in range(257))
    events = s.receive_data(wire)
    assert len(events) == 256
    assert decode_all(s.data_to_send()) == [Frame(FrameType.WINDOW_UPDATE, Flag.RST, 513, 0)]


def test_unacked_opens_are_bounded() -> None:
    c = Session("client", max_unacked_opens=2)
    c.open_stream()
    c.open_stream()
    assert not c.can_open()
    with pytest.raises(yamux.OpenLimitError):
        c.open_stream()
    c.receive_data(yamux.encode_window_update(1, 0, Flag.ACK))
    assert c.can_open()
    assert c.open_stream() == 5


def test_stream_id_exhaustion() -> None:
    c = Session("client", first_stream_id=0xFFFFFFFB)
    assert c.open_stream() == 0xFFFFFFFB
    assert c.open_stream() == 0xFFFFFFFD
    assert not c.can_open()
    with pytest.raises(yamux.StreamsExhaustedError):
        c.open_stream()
    s = Session("server", first_stream_id=0xFFFFFFFC)
    assert s.open_stream() == 0xFFFFFFFC
    with pytest.raises(yamux.StreamsExhaustedError):
        s.open_stream()
    with pytest.raises(ValueError):
        Session("server", first_stream_id=3)


# ---- data and windows ----


def test_data_round_trip_and_frame_bytes() -> None:
    c, s, sid = established()
    assert c.send_data(sid, b"hello") == 5
    wire = c.data_to_send()
    assert wire == h("00 00 0000 00000001 00000005 68656c6c6f")
    assert s.receive_data(wire) == [DataReceived(sid, b"hello")]


def test_receive_window_exceeded_on_fresh_stream() -> None:
    s = Session("server")
    s.receive_data(yamux.encode_window_update(1, 0, Flag.SYN))
    events = s.receive_data(yamux.encode_header(0, 0, 1, W + 1) + bytes(W + 1))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert decode_all(s.data_to_send()) == [Frame(FrameType.GO_AWAY, 0, 0, 1)]


def test_receive_window_exceeded_cumulatively() -> None:
    s = Session("server")
    s.receive_data(yamux.encode_window_update(1, 0, Flag.SYN))
    events = s.receive_data(yamux.encode_data(1, bytes(W)))
    assert events == [DataReceived(1, bytes(W))]
    events = s.receive_data(yamux.encode_data(1, b"x"))
    assert isinstance(events[0], ProtocolViolation)
    assert "window" in events[0].reason


def test_exactly_window_is_fine_and_consumption_reopens() -> None:
    c, s, sid = established()
    assert c.send_data(sid, bytes(W + 10)) == W
    assert c.send_window(sid) == 0
    assert c.send_data(sid, b"more") == 0
    events = pump(c, s)
    assert events == [DataReceived(sid, bytes(W))]
    s.consumed(sid, W // 2 - 1)
    assert s.data_to_send() == b""  # below half the window: no update yet
    s.consumed(sid, 1)
    assert s.data_to_send() == yamux.encode_window_update(sid, W // 2)
    assert c.receive_data(yamux.encode_window_update(sid, W // 2)) == [WindowOpened(sid, W // 2)]
    assert c.send_window(sid) == W // 2


def test_send_frames_never_exceed_peer_window() -> None:
    c, _s, sid = established()
    total = 0
    for _ in range(10):
        total += c.send_data(sid, bytes(100_000))
    assert total == W
    frames = decode_all(c.data_to_send())
    assert sum(f.length for f in frames) == W
    assert all(f.length <= W for f in frames)


def test_consumed_more_than_held_is_an_error() -> None:
    c, s, sid = established()
    c.send_data(sid, b"abc")
    pump(c, s)
    with pytest.raises(yamux.StreamError):
        s.consumed(sid, 4)


def test_window_update_delta_added_and_capped() -> None:
    c, _s, sid = established()
    c.receive_data(yamux.encode_window_update(sid, 1000))
    assert c.send_window(sid) == W + 1000
    c.receive_data(yamux.encode_window_update(sid, yamux.U32_MAX))
    assert c.send_window(sid) == yamux.U32_MAX


# ---- half close and reset ----


def test_half_close_client_first() -> None:
    c, s, sid = established()
    assert c.close_stream(sid) is False
    assert c.data_to_send() == yamux.encode_window_update(sid, 0, Flag.FIN)
    assert s.receive_data(yamux.encode_window_update(sid, 0, Flag.FIN)) == [StreamFinished(sid)]
    assert s.stream_state(sid) is StreamState.REMOTE_CLOSE
    # the other direction still works
    assert s.send_data(sid, b"reply") == 5
    assert pump(s, c) == [DataReceived(sid, b"reply")]
    with pytest.raises(yamux.StreamError):
        c.send_data(sid, b"no")
    assert s.close_stream(sid) is True
    assert s.stream_state(sid) is None
    assert pump(s, c) == [StreamFinished(sid), StreamClosed(sid)]
    assert c.stream_state(sid) is None and c.stream_count == 0


def test_half_close_server_first_with_data_and_fin_together() -> None:
    c, _s, sid = established()
    events = c.receive_data(yamux.encode_data(sid, b"bye", Flag.FIN))
    assert events == [DataReceived(sid, b"bye"), StreamFinished(sid)]
    assert c.stream_state(sid) is StreamState.REMOTE_CLOSE
    assert c.send_data(sid, b"still") == 5
    assert c.close_stream(sid) is True


def test_data_after_fin_and_duplicate_fin_are_errors() -> None:
    for second in (yamux.encode_data(1, b"x"), yamux.encode_window_update(1, 0, Flag.FIN)):
        _c, s, sid = established()
        s.receive_data(yamux.encode_window_update(sid, 0, Flag.FIN))
        events = s.receive_data(second)
        assert isinstance(events[0], ProtocolViolation)


def test_rst_closes_at_once_both_ways() -> None:
    c, s, sid = established()
    c.reset_stream(sid)
    assert c.stream_state(sid) is None
    assert pump(c, s) == [StreamReset(sid)]
    assert s.stream_state(sid) is None
    with pytest.raises(yamux.StreamError):
        s.send_data(sid, b"x")


def test_frames_for_unknown_streams_are_ignored() -> None:
    s = Session("server")
    wire = (yamux.encode_data(9, b"ignored") + yamux.encode_window_update(11, 5)
            + yamux.encode_window_update(13, 0, Flag.FIN | Flag.RST))
    assert s.receive_data(wire) == []
    assert not s.terminated
    assert s.data_to_send() == b""


# ---- ping and goaway ----


def test_ping_is_answered_with_same_value() -> None:
    s = Session("server")
    assert s.receive_data(h("00 02 0001 00000000 0000002a")) == []
    assert s.data_to_send() == h("00 02 0002 00000000 0000002a")
    c = Session("client")
    value = c.ping()
    s.receive_data(c.data_to_send())
    assert c.receive_data(s.data_to_send()) == [PingAcked(value)]


def test_local_goaway_refuses_new_syn_keeps_streams() -> None:
    c, s, sid = established()
    s.go_away()
    assert s.data_to_send() == h("00 03 0000 00000000 00000000")
    new = c.open_stream()
    assert pump(c, s) == []
    assert s.data_to_send() == yamux.encode_window_update(new, 0, Flag.RST)
    c.send_data(sid, b"ok")
    assert pump(c, s) == [DataReceived(sid, b"ok")]


def test_remote_normal_goaway_stops_opens_keeps_streams() -> None:
    c, _s, sid = established()
    assert c.receive_data(yamux.encode_go_away(0)) == [GoAwayReceived(0)]
    assert not c.terminated
    with pytest.raises(yamux.RemoteGoAwayError):
        c.open_stream()
    assert c.send_data(sid, b"x") == 1


@pytest.mark.parametrize("code", [1, 2, 7])
def test_remote_error_goaway_ends_session(code: int) -> None:
    c, _s, sid = established()
    assert c.receive_data(yamux.encode_go_away(code)) == [GoAwayReceived(code)]
    assert c.terminated
    with pytest.raises(yamux.SessionClosedError):
        c.send_data(sid, b"x")


@pytest.mark.parametrize("bad", ["01 01 0001 00000001 00000000", "00 04 0000 00000000 00000000"])
def test_session_bad_header_sends_goaway_protocol_error(bad: str) -> None:
    s = Session("server")
    events = s.receive_data(h("00 02 0001 00000000 00000007") + h(bad))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert decode_all(s.data_to_send()) == [
        Frame(FrameType.PING, Flag.ACK, 0, 7),
        Frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR),
    ]


def test_stream_opened_and_reset_by_one_frame_leaves_no_trace() -> None:
    s = yamux.Session("server")
    events = s.receive_data(yamux.encode_window_update(1, 0, flags=yamux.Flag.SYN | yamux.Flag.RST))
    assert events == []
    assert s.stream_state(1) is None
    assert s.data_to_send() == b""
