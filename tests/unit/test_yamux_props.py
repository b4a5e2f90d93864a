"""Property tests: the yamux decoder and session on random input and random chunking."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from kata_agent.protocol import yamux
from kata_agent.protocol.yamux import Frame, FrameDecoder, ProtocolViolation, Session

frames_strategy = st.builds(
    lambda t, flags, sid, n, payload: (
        Frame(0, flags, sid, len(payload), payload) if t == 0 else Frame(t, flags, sid, n)
    ),
    st.integers(0, 3),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=64),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def decode(chunks: list[bytes]) -> tuple[list[Frame], str | None]:
    dec = FrameDecoder()
    frames: list[Frame] = []
    for chunk in chunks:
        frames += dec.feed(chunk)
    return frames, dec.error


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_strategy, max_size=20), st.lists(st.integers(0, 10_000), max_size=30))
def test_valid_frames_survive_any_chunking(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(f.encode() for f in frames)
    got, error = decode(chunked(wire, cuts))
    assert error is None
    assert got == frames


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 5000), max_size=30))
def test_random_bytes_never_crash_and_rechunking_is_invisible(data: bytes, cuts: list[int]) -> None:
    whole = decode([data])
    pieces = decode(chunked(data, cuts))
    assert whole == pieces
    frames, error = whole
    # every frame yielded is valid and re-encodes to the prefix it came from
    prefix = b"".join(f.encode() for f in frames)
    assert data.startswith(prefix)
    for f in frames:
        assert 0 <= f.type <= 3
    if error is not None:
        bad = data[len(prefix) : len(prefix) + 12]
        assert len(bad) == 12
        assert bad[0] != 0 or bad[1] > 3 or int.from_bytes(bad[8:12], "big") > yamux.INITIAL_WINDOW


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 5000), max_size=20))
def test_session_on_random_input_never_crashes(data: bytes, cuts: list[int]) -> None:
    s = Session("server")
    events: list[yamux.Event] = []
    for chunk in chunked(data, cuts):
        events += s.receive_data(chunk)
        # the application takes every byte at once
        for ev in events:
            if isinstance(ev, yamux.DataReceived) and s.stream_state(ev.stream_id) is not None:
                s.consumed(ev.stream_id, len(ev.data))
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert events[-1] is violations[0]
        assert s.terminated
        assert s.data_to_send().endswith(yamux.encode_go_away(1))
    # output is always well-formed frames
    dec = FrameDecoder(max_data_length=2**32)
    dec.feed(s.data_to_send())
    assert dec.error is None and dec.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 200_000)), max_size=60),
       st.lists(st.integers(1, 70_000), max_size=60))
def test_two_sessions_random_traffic_stays_within_windows(
    ops: list[tuple[int, int]], wire_chunks: list[int]
) -> None:
    """A client and a server exchange data under random scheduling: no side ever sees a
    protocol violation, bytes arrive intact and in order, and held data stays bounded."""
    c, s = Session("client"), Session("server")
    sid = c.open_stream()
    sent = {c: bytearray(), s: bytearray()}
    got = {c: bytearray(), s: bytearray()}
    held = {c: 0, s: 0}
    wire = {c: bytearray(), s: bytearray()}  # bytes in flight towards the key's peer
    peer = {c: s, s: c}
    counter = 0
    chunk_iter = iter(wire_chunks)

    def deliver(src: Session) -> None:
        wire[src] += src.data_to_send()
        n = next(chunk_iter, len(wire[src]))
        data = bytes(wire[src][:n])
        del wire[src][:n]
        dst = peer[src]
        for ev in dst.receive_data(data):
            assert not isinstance(ev, ProtocolViolation), ev
            if isinstance(ev, yamux.StreamOpened):
                dst.accept_stream(ev.stream_id)
            elif isinstance(ev, yamux.DataReceived):
                got[dst] += ev.data
                held[dst] += len(ev.data)
                assert held[dst] <= yamux.INITIAL_WINDOW

    for op, size in ops:
        side = c if op % 2 == 0 else s
        if op < 2:
            if side is s and s.stream_state(sid) is None:
                continue
            payload = bytes((counter + i) & 0xFF for i in range(min(size, 5000)))
            counter += 1
            if side is s and s.stream_state(sid) is yamux.StreamState.SYN_RECEIVED:
                continue
            taken = side.send_data(sid, payload)
            sent[side] += payload[:taken]
        elif op < 4:
            take = min(size, held[side])
            side.consumed(sid, take)
            held[side] -= take
        else:
            deliver(c)
            deliver(s)
    # drain everything
    for _ in range(100):
        for side in (c, s):
            side.consumed(sid, held[side])
            held[side] = 0
        deliver(c)
        deliver(s)
        if not wire[c] and not wire[s] and not c.output and not s.output:
            break
    assert bytes(got[s]) == bytes(sent[c])
    assert bytes(got[c]) == bytes(sent[s])
