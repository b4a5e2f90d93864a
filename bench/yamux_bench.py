"""Micro-benchmark of the yamux codec and of a stream through two bridges.

Usage: .venv/bin/python bench/yamux_bench.py [--mib N] [--rounds N]
Prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import pty
import selectors
import socket
import statistics
import tempfile
import threading
import time
import tty
from collections.abc import Callable

from kata_agent.bridge import YamuxBridge
from kata_agent.protocol import yamux


def _best_of(fn: Callable[[], float], repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


def bench_encode(payload_size: int, frames: int) -> tuple[float, float]:
    payload = bytes(payload_size)

    def run() -> float:
        s = yamux.Session("client")
        sid = s.open_stream()
        s.data_to_send()
        # the peer's window updates, as the receiving side would send them
        refill = yamux.encode_window_update(sid, yamux.INITIAL_WINDOW)
        t0 = time.perf_counter()
        for _ in range(frames):
            if s.send_window(sid) < payload_size:
                s.receive_data(refill)
            s.send_data(sid, payload)
            if len(s.output) > 1 << 20:
                s.output_written(len(s.output))
        return time.perf_counter() - t0

    dt = _best_of(run)
    return frames / dt, frames * payload_size / dt / 1e6


def bench_decode(payload_size: int, frames: int, chunk: int) -> tuple[float, float]:
    blob = b"".join(yamux.encode_data(1, bytes(payload_size)) for _ in range(frames))

    def run() -> float:
        dec = yamux.FrameDecoder()
        view = memoryview(blob)
        t0 = time.perf_counter()
        for off in range(0, len(blob), chunk):
            dec.feed(view[off : off + chunk])
        return time.perf_counter() - t0

    dt = _best_of(run)
    return frames / dt, frames * payload_size / dt / 1e6


class _Backend:
    """A unix server that either discards everything (counting) or echoes it."""

    def __init__(self, path: str, echo: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.echo = echo
        self.received = 0
        self.done = threading.Event()
        self.target = -1
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(1 << 18)
                if not data:
                    return
                if self.echo:
                    conn.sendall(data)
                else:
                    self.received += len(data)
                    if self.received == self.target:
                        self.done.set()


_Bridges = tuple[
    YamuxBridge, YamuxBridge, list[threading.Thread], "list[socket.socket] | list[_Fd]"
]


class _Fd:
    """A bare fd with the close() of a socket (pty ends)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


def _bridges(backend: str, transport: str = "socketpair") -> _Bridges:
    ends: list[socket.socket] | list[_Fd]
    if transport == "pty":
        master, slave = pty.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        ends = [_Fd(master), _Fd(slave)]
    else:
        ends = list(socket.socketpair())
    client = YamuxBridge(ends[0].fileno(), "client", name="bench-client")
    server = YamuxBridge(ends[1].fileno(), "server", name="bench-server")
    server.serve_streams_to(backend)
    threads = [threading.Thread(target=br.run, daemon=True) for br in (client, server)]
    for t in threads:
        t.start()
    return client, server, threads, ends


def bench_stream(tmp: str, mib: int, transport: str) -> float:
    path = os.path.join(tmp, f"sink-{transport}.sock")
    backend = _Backend(path, echo=False)
    client, server, threads, socks = _bridges(path, transport)
    total = mib * 1024 * 1024
    backend.target = total
    s = client.open_stream_socket()
    chunk = bytes(256 * 1024)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        sent += s.send(chunk[: min(len(chunk), total - sent)])
    backend.done.wait(120)
    dt = time.perf_counter() - t0
    s.close()
    client.close()
    server.close()
    for t in threads:
        t.join(10)
    for x in socks:
        x.close()
    return total / dt / 1e6


def bench_round_trip(tmp: str, rounds: int, size: int) -> tuple[float, float]:
    path = os.path.join(tmp, f"echo-{size}.sock")
    _Backend(path, echo=True)
    client, server, threads, socks = _bridges(path)
    s = client.open_stream_socket()
    msg = bytes(size)
    times = []
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                sel.select()
                got += len(s.recv(1 << 16))
            times.append(time.perf_counter() - t0)
    s.close()
    client.close()
    server.close()
    for t in threads:
        t.join(10)
    for x in socks:
        x.close()
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99) - 1] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=64, help="MiB pushed through the bridges")
    ap.add_argument("--rounds", type=int, default=2000, help="round trips for the latency rows")
    args = ap.parse_args()
    rows: list[tuple[str, str, str]] = []
    for size in (1, 64, 4096, 65536):
        n = 200_000 if size <= 4096 else 20_000
        fps, mbs = bench_encode(size, n)
        rows.append((f"encode data frame, {size} B payload", f"{fps:,.0f} frames/s",
                     f"{mbs:,.1f} MB/s"))
    for size in (0, 64, 4096, 65536):
        n = 200_000 if size <= 4096 else 20_000
        fps, mbs = bench_decode(size, n, 256 * 1024)
        rows.append((f"decode data frame, {size} B payload", f"{fps:,.0f} frames/s",
                     f"{mbs:,.1f} MB/s"))
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("socketpair", "pty"):
            mbs = bench_stream(tmp, args.mib, transport)
            rows.append((f"1 stream through 2 bridges over a {transport}, {args.mib} MiB", "",
                         f"{mbs:,.1f} MB/s"))
        for size in (64, 4096):
            p50, p99 = bench_round_trip(tmp, args.rounds, size)
            rows.append((f"echo round trip via 2 bridges, {size} B", f"p50 {p50:,.0f} us",
                         f"p99 {p99:,.0f} us"))
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'rate':>20}  {'throughput':>14}")
    for name, a, b in rows:
        print(f"{name:<{w}}  {a:>20}  {b:>14}")


if __name__ == "__main__":
    main()
