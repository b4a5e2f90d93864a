"""Process stdio streams: bounded reads, EOF, close, cancellation, drain ordering."""

from __future__ import annotations

import contextlib
import os
import pty
import threading
from collections.abc import Callable, Iterator

import pytest
from kata_agent.iostreams import (
    MAX_IO_CHUNK,
    Cancelled,
    Canceller,
    ProcessIO,
    StreamEOF,
)

from tests.agent_process import wait_for

Pipes = tuple[ProcessIO, tuple[int, int, int]]


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    io, child = ProcessIO.pipes()
    yield io, child
    io.close()
    for fd in child:
        with contextlib.suppress(OSError):
            os.close(fd)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_read_returns_at_most_len_and_leaves_the_rest_in_the_pipe(pipes: Pipes) -> None:
    io, (_, out_w, _) = pipes
    os.write(out_w, b"0123456789")
    assert io.stdout.read(4) == b"0123"
    assert io.stdout.pending_bytes() == 6
    assert io.stdout.read(100) == b"456789"


def test_eof_after_writer_closes_and_stays_eof(pipes: Pipes) -> None:
    io, (_in_r, out_w, _err_w) = pipes
    os.write(out_w, b"last")
    os.close(out_w)
    assert io.stdout.read(10) == b"last"
    with pytest.raises(StreamEOF):
        io.stdout.read(10)
    with pytest.raises(StreamEOF):
        io.stdout.read(10)
    assert io.stdout.eof


def test_read_length_is_bounded(pipes: Pipes) -> None:
    io, _ = pipes
    with pytest.raises(ValueError):
        io.stdout.read(MAX_IO_CHUNK + 1)
    with pytest.raises(ValueError):
        io.stdout.read(0)
    with pytest.raises(ValueError):
        io.stdin.write(b"x" * (MAX_IO_CHUNK + 1))


def test_blocked_read_wakes_on_close(pipes: Pipes) -> None:
    io, _ = pipes
    t, out = in_thread(lambda: io.stdout.read(10))
    io.close()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(out[0], StreamEOF)


def test_blocked_read_wakes_on_cancel(pipes: Pipes) -> None:
    io, _ = pipes
    cancel = Canceller()
    t, out = in_thread(lambda: io.stdout.read(10, cancel))
    cancel.set()
    t.join(10)
    cancel.close()
    assert isinstance(out[0], Cancelled)


def test_write_stdin_roundtrip_and_close(pipes: Pipes) -> None:
    io, (in_r, _, _) = pipes
    assert io.stdin.write(b"hello") == 5
    assert os.read(in_r, 10) == b"hello"
    io.stdin.close()
    assert os.read(in_r, 10) == b""  # EOF for the process
    with pytest.raises(StreamEOF):
        io.stdin.write(b"more")


def test_full_pipe_write_blocks_until_read_then_completes(pipes: Pipes) -> None:
    io, (in_r, _, _) = pipes
    size = 256 * 1024  # larger than the default 64 KiB pipe
    t, out = in_thread(lambda: io.stdin.write(b"a" * size))
    got = 0
    while got < size:
        got += len(os.read(in_r, 65536))
    t.join(10)
    assert out == [size]


def test_write_to_closed_reader_is_eof(pipes: Pipes) -> None:
    io, (in_r, _, _) = pipes
    os.close(in_r)
    with pytest.raises(StreamEOF):
        io.stdin.write(b"x")


def test_drained_waits_for_the_pipe_to_empty(pipes: Pipes) -> None:
    io, (_, out_w, _err_w) = pipes
    os.write(out_w, b"x" * 1000)
    io.process_exited()
    assert not io.stdout.drained(grace=60)
    assert io.stderr is not None and io.stderr.drained(grace=60)  # empty pipe
    t, out = in_thread(lambda: io.wait_drained(60, None))
    assert io.stdout.read(1000) == b"x" * 1000
    t.join(10)
    assert not t.is_alive() and out == [None]


def test_drained_after_grace_when_nobody_reads(pipes: Pipes) -> None:
    io, (_, out_w, _) = pipes
    os.write(out_w, b"unread")
    io.process_exited()
    assert not io.stdout.drained(grace=60)
    wait_for(lambda: io.stdout.drained(grace=0.05), 5, "grace to pass")


def test_wait_drained_honours_cancel(pipes: Pipes) -> None:
    io, (_, out_w, _) = pipes
    os.write(out_w, b"unread")
    cancel = Canceller()
    t, out = in_thread(lambda: io.wait_drained(600, cancel))
    cancel.set()
    t.join(10)
    cancel.close()
    assert isinstance(out[0], Cancelled)


def test_no_byte_lost_with_small_reads(pipes: Pipes) -> None:
    io, (_, out_w, _) = pipes
    pattern = bytes(range(256)) * 1024  # 256 KiB through a 64 KiB pipe

    def writer() -> None:
        view = memoryview(pattern)
        done = 0
        while done < len(pattern):
            done += os.write(out_w, view[done:])
        os.close(out_w)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = bytearray()
    while True:
        try:
            got += io.stdout.read(3001)
        except StreamEOF:
            break
    t.join(10)
    assert bytes(got) == pattern


def test_terminal_master_roundtrip_resize_and_eio_as_eof() -> None:
    master, slave = pty.openpty()
    io = ProcessIO.terminal_master(master)
    try:
        assert io.terminal and io.stderr is None
        io.resize(40, 120)
        import fcntl
        import struct
        import termios

        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
        assert (rows, cols) == (40, 120)
        os.write(slave, b"out\n")
        assert io.stdout.read(100) == b"out\r\n"  # ONLCR of the line discipline
        os.close(slave)
        with pytest.raises(StreamEOF):
            io.stdout.read(100)
    finally:
        io.close()


def test_resize_without_terminal_is_refused(pipes: Pipes) -> None:
    io, _ = pipes
    with pytest.raises(ValueError):
        io.resize(1, 1)


def test_pipe_size_is_applied() -> None:
    import fcntl

    io, child = ProcessIO.pipes(pipe_size=128 * 1024)
    try:
        # F_GETPIPE_SZ on the process's end shows the size of the shared pipe.
        assert fcntl.fcntl(child[1], 1032) >= 128 * 1024
    finally:
        io.close()
        for fd in child:
            os.close(fd)
