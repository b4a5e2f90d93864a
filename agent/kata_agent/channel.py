"""Channels: how the host reaches the agent.

The gRPC server listens on a private unix socket (the backend). Yamux channels serve their
streams in-process when given the server's ``endpoints`` (each stream an HTTP/2 connection
driven on the session's thread), else splice them to the backend like the other channels:

- serial: the virtio-serial port named ``agent.channel.0``; one yamux session at a time on
  it, every yamux stream one gRPC connection. When the host goes away the session ends and
  the port is opened again, while containers keep running.
- unix-serial: a unix socket whose every accepted connection is treated as the serial line
  (yamux server on it), so tests and development runs drive the exact code of a VM.
- vsock: AF_VSOCK, one plain gRPC connection per vsock connection (no yamux).
- unix: plain gRPC on a unix socket, served by the gRPC server directly (no splice).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import select
import socket
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Protocol

from kata_agent.bridge import CloseReason, EndpointFactory, YamuxBridge, relay_listener
from kata_agent.config import SERIAL_PORT_NAME, Channel

log = logging.getLogger(__name__)

VIRTIO_PORTS_DIR = "/sys/class/virtio-ports"
# The 1.x agent probed for the port 200 times, 50 ms apart.
PORT_PROBE_TIMEOUT = 10.0
PORT_PROBE_INTERVAL = 0.05
# Every gRPC connection starts with it; a stream that does not is refused at the bridge.
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ChannelError(Exception):
    """The channel cannot be set up."""


class Listener(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def find_serial_port(
    name: str = SERIAL_PORT_NAME,
    *,
    sys_dir: str = VIRTIO_PORTS_DIR,
    dev_dir: str = "/dev",
    timeout: float = PORT_PROBE_TIMEOUT,
) -> str:
    """The /dev node of the virtio-serial port called `name`, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        for name_file in sorted(glob.glob(os.path.join(sys_dir, "*", "name"))):
            try:
                with open(name_file, encoding="ascii", errors="replace") as f:
                    port_name = f.read().strip()
            except OSError:
                continue
            if port_name == name:
                return os.path.join(dev_dir, Path(name_file).parent.name)
        if time.monotonic() >= deadline:
            raise ChannelError(f"no virtio-serial port named {name} under {sys_dir}")
        time.sleep(PORT_PROBE_INTERVAL)


def wait_host_connected(fd: int, stop: threading.Event, poll_interval: float = 1.0) -> bool:
    """Block until the host end of a serial port is open (no POLLHUP). False if stopped.

    virtio-console reports POLLHUP while the host side is closed and wakes pollers when it
    opens; the periodic re-check covers devices that do not wake edge-triggered waiters.
    """
    edge = select.epoll()
    try:
        edge.register(fd, select.EPOLLOUT | select.EPOLLET)
        level = select.poll()
        level.register(fd, select.POLLOUT)
        while not stop.is_set():
            events = level.poll(0)
            if events and not events[0][1] & (select.POLLHUP | select.POLLERR):
                return True
            edge.poll(poll_interval)
        return False
    finally:
        edge.close()


class SerialListener:
    """A yamux server on the virtio-serial port, reopened whenever the host disconnects."""

    def __init__(self, device: str, backend: str, *, retry_delay: float = 0.2,
                 endpoints: EndpointFactory | None = None) -> None:
        self.device = device  # empty: look up agent.channel.0
        self.backend = backend
        self.endpoints = endpoints
        self.retry_delay = retry_delay
        self._stop = threading.Event()
        self._bridge: YamuxBridge | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="serial", daemon=True)
        self.sessions = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            bridge = self._bridge
        if bridge is not None:
            bridge.close()
        self._thread.join(timeout=5)

    def _open(self) -> int:
        path = self.device or find_serial_port()
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        if os.isatty(fd):
            # A tty standing in for the port must pass bytes untouched.
            tty.setraw(fd, termios.TCSANOW)
        log.info("serial port opened path=%s", path)
        return fd

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = self._open()
            except (OSError, ChannelError) as err:
                log.warning("serial port unavailable error=%s", err)
                self._stop.wait(self.retry_delay)
                continue
            try:
                if not wait_host_connected(fd, self._stop):
                    return
                bridge = YamuxBridge(fd, "server", name="serial")
                serve_streams(bridge, self.backend, self.endpoints)
                with self._lock:
                    self._bridge = bridge
                if self._stop.is_set():
                    return
                self.sessions += 1
                log.info("host connected on serial port session=%d", self.sessions)
                reason = bridge.run()
                log.info("serial session ended reason=%s", reason.name)
                if reason is CloseReason.CLOSED:
                    return
            finally:
                with self._lock:
                    self._bridge = None
                os.close(fd)
            # Give a hung-up port a moment before reopening it; the host may be restarting.
            self._stop.wait(self.retry_delay)


def serve_streams(bridge: YamuxBridge, backend: str, endpoints: EndpointFactory | None) -> None:
    """In-process when the server's endpoints are at hand (no hop), else via the backend."""
    if endpoints is not None:
        bridge.serve_streams_with(endpoints, preface=HTTP2_CLIENT_PREFACE)
    else:
        bridge.serve_streams_to(backend, preface=HTTP2_CLIENT_PREFACE)


def bind_unix(path: str, mode: int = 0o600, backlog: int = 64) -> socket.socket:
    """Listen on a unix socket at `path`, replacing a stale socket (only a socket); a
    ChannelError when something else is there."""
    from kata_agent.h2server import bind_unix as bind

    try:
        return bind(path, mode, backlog)
    except FileExistsError as e:
        raise ChannelError(str(e)) from e


class UnixSerialListener:
    """Every connection accepted on a unix socket is a serial line carrying a yamux session."""

    def __init__(self, path: str, backend: str, *,
                 endpoints: EndpointFactory | None = None) -> None:
        self.path = path
        self.backend = backend
        self.endpoints = endpoints
        self._sock = bind_unix(path)
        self._stop = threading.Event()
        self._bridges: set[YamuxBridge] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="unix-serial", daemon=True)
        self.sessions = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._sock.close()
        with self._lock:
            bridges = list(self._bridges)
        for bridge in bridges:
            bridge.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as err:
                if self._stop.is_set():
                    return
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed path=%s error=%s", self.path, err)
                    self._stop.wait(0.1)
                    continue
                log.error("accept failed path=%s error=%s", self.path, err)
                return
            self.sessions += 1
            threading.Thread(
                target=self._session, args=(conn, self.sessions), name="yamux", daemon=True
            ).start()

    def _session(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.setblocking(False)
            bridge = YamuxBridge(conn.fileno(), "server", name=f"unix-serial-{number}")
            serve_streams(bridge, self.backend, self.endpoints)
            with self._lock:
                self._bridges.add(bridge)
            log.info("host connected path=%s session=%d", self.path, number)
            try:
                reason = bridge.run()
            finally:
                with self._lock:
                    self._bridges.discard(bridge)
            log.info("session ended path=%s session=%d reason=%s", self.path, number, reason.name)


class VsockListener:
    """Plain gRPC over AF_VSOCK: each vsock connection spliced to the backend."""

    def __init__(self, port: int, backend: str) -> None:
        self.port = port
        self.backend = backend
        self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind((socket.VMADDR_CID_ANY, port))
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=relay_listener, args=(self._sock, backend, self._stop), name="vsock", daemon=True
        )

    def start(self) -> None:
        log.info("listening on vsock port=%d", self.port)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def make_listener(channel: Channel, backend: str, *,
                  endpoints: EndpointFactory | None = None) -> Listener | None:
    """The listener for a channel; None for `unix`, which the gRPC server serves itself.
    ``endpoints`` (the server's ``connection``) lets yamux channels serve in-process."""
    if channel.kind == "serial":
        return SerialListener(channel.path, backend, endpoints=endpoints)
    if channel.kind == "unix-serial":
        return UnixSerialListener(channel.path, backend, endpoints=endpoints)
    if channel.kind == "vsock":
        return VsockListener(channel.port, backend)
    if channel.kind == "unix":
        return None
    raise ChannelError(f"unknown channel kind {channel.kind}")
