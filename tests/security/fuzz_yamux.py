"""Coverage-guided fuzzing of the yamux session with atheris (libFuzzer).

    python tests/security/fuzz_yamux.py -max_total_time=60 CORPUS_DIR
    python tests/security/fuzz_yamux.py --write-seeds CORPUS_DIR

The first input byte picks the role, the backlog and what the application does; the rest
is fed to a fresh ``Session`` in chunks whose sizes come from the input too. Any exception,
or any broken bound (buffering past a window, more pending streams than the backlog, more
than two answers per frame, malformed output), is a crash that libFuzzer saves and reports.
``make fuzz`` runs it for a fixed time; the hypothesis suites under tests/unit run in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports():
    from kata_agent.protocol import yamux

HEADER = yamux.HEADER_SIZE
WINDOW = yamux.INITIAL_WINDOW


def _answer(s: yamux.Session, events: list[yamux.Event], mode: int) -> int:
    """What a correct application does with the events; returns frames it caused."""
    before = s.frames_out
    for ev in events:
        if isinstance(ev, yamux.StreamOpened):
            if (s.terminated
                    or s.stream_state(ev.stream_id) is not yamux.StreamState.SYN_RECEIVED):
                continue
            if mode & 1:
                s.accept_stream(ev.stream_id)
            else:
                s.refuse_stream(ev.stream_id)
        elif isinstance(ev, yamux.DataReceived):
            if s.stream_state(ev.stream_id) is not None and mode & 2:
                s.consumed(ev.stream_id, len(ev.data))
            if mode & 4 and not s.terminated and s.send_window(ev.stream_id) > 0:
                s.send_data(ev.stream_id, b"reply")
    # Accepts are answers to frames (counted in the bound); sends are the application's.
    return s.frames_out - before if mode & 4 else 0


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    control, step = data[0], data[1]
    role: Literal["client", "server"] = "client" if control & 0x80 else "server"
    backlog = 1 + (control >> 4 & 0x7)
    mode = control & 0x7
    s = yamux.Session(role, accept_backlog=backlog, max_unacked_opens=8)
    app_frames = 0
    if role == "client":
        s.open_stream()
        s.open_stream()
        app_frames = 2
    body = data[2:]
    size = 1 + step * 7
    violations = 0
    for off in range(0, len(body), size):
        events = s.receive_data(body[off:off + size])
        violations += sum(isinstance(e, yamux.ProtocolViolation) for e in events)
        app_frames += _answer(s, events, mode)
        if s._decoder.buffered > HEADER + WINDOW:
            raise AssertionError(f"decoder holds {s._decoder.buffered} bytes")
        pending = sum(1 for sid in list(s._streams)
                      if s.stream_state(sid) is yamux.StreamState.SYN_RECEIVED)
        if pending > backlog:
            raise AssertionError(f"{pending} streams pending, backlog {backlog}")
        for st in s._streams.values():
            if not 0 <= st.recv_held <= WINDOW or not 0 <= st.recv_window <= WINDOW:
                raise AssertionError(f"stream {st.sid} window out of bounds")
    if violations > 1 or (violations and not s.terminated):
        raise AssertionError(f"{violations} violations, terminated={s.terminated}")
    if s.frames_out - app_frames > 2 * s.frames_in + 1:
        raise AssertionError(f"{s.frames_out} frames out for {s.frames_in} in")
    dec = yamux.FrameDecoder(max_data_length=2**32 - 1)
    dec.feed(s.data_to_send())
    if dec.error is not None or dec.buffered:
        raise AssertionError(f"malformed output: {dec.error} buffered={dec.buffered}")


def seeds() -> dict[str, bytes]:
    """Small real conversations (both directions) with every frame kind."""
    c, s = yamux.Session("client"), yamux.Session("server")
    to_server, to_client = bytearray(), bytearray()

    def flush() -> None:
        for _ in range(10):
            a = c.data_to_send()
            to_server.extend(a)
            for ev in s.receive_data(a):
                if isinstance(ev, yamux.StreamOpened):
                    s.accept_stream(ev.stream_id)
            b = s.data_to_send()
            to_client.extend(b)
            c.receive_data(b)
            if not a and not b:
                return

    sid = c.open_stream()
    c.open_stream()
    flush()
    c.send_data(sid, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    c.ping()
    s.send_data(sid, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    flush()
    c.close_stream(sid)
    s.close_stream(sid)
    s.ping(9)
    flush()
    c.go_away()
    flush()
    return {"server-accepting": bytes([0x13, 3]) + bytes(to_server),
            "server-refusing": bytes([0x70, 0]) + bytes(to_server),
            "client": bytes([0x97, 1]) + bytes(to_client)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in seeds().items():
            (out / name).write_bytes(blob)
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
