"""Host-side client: dial an agent and get gRPC stubs.

Addresses:
- ``unix-serial:PATH``: PATH is a unix socket that is a VM's serial port (a QEMU chardev
  in server mode) or an agent's unix-serial channel. A yamux client runs on it with a 1 Hz
  ping (the heartbeat kata-proxy sent to keep QEMU's emulated port awake); each gRPC
  connection is one yamux stream.
- ``vsock:CID:PORT``: plain gRPC over vsock (grpcio refuses vsock addresses, so a local
  socket is relayed to it).
- ``unix:PATH``: plain gRPC on a unix socket.

grpcio cannot use a socket it did not connect itself, so the streams are reached through
a private listening socket in a 0700 temporary directory, spliced by the bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from kata_agent.bridge import CloseReason, YamuxBridge, relay_listener
from kata_agent.protocol import agent_pb2_grpc, health_pb2_grpc

HEARTBEAT_INTERVAL = 1.0


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    kind: str  # unix-serial | vsock | unix
    path: str = ""
    cid: int = 0
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        return f"{self.kind}:{self.path}"


def parse_address(text: str) -> Address:
    kind, _, rest = text.partition(":")
    if kind in ("unix-serial", "unix"):
        if not rest:
            raise AddressError(f"{kind} address needs a path: {kind}:PATH")
        return Address(kind, path=rest)
    if kind == "vsock":
        cid_text, _, port_text = rest.partition(":")
        try:
            cid, port = int(cid_text, 10), int(port_text, 10)
        except ValueError:
            raise AddressError(f"vsock address must be vsock:CID:PORT, got {text!r}") from None
        if not (0 <= cid < 2**32 and 0 < port < 2**32):
            raise AddressError(f"vsock CID or port out of range in {text!r}")
        return Address("vsock", cid=cid, port=port)
    raise AddressError(
        f"unknown address {text!r}: use unix-serial:PATH, vsock:CID:PORT or unix:PATH"
    )


def _private_listener() -> tuple[socket.socket, str]:
    tmpdir = tempfile.mkdtemp(prefix="kata-agent-ctl-")  # mkdtemp makes it 0700
    path = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(64)
    return sock, path


def dial_vsock(cid: int, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect((cid, port))
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class AgentClient:
    """A connection to one agent: `.agent` (grpc.AgentService) and `.health` (grpc.Health)."""

    def __init__(self, address: str | Address, *, connect_timeout: float = 5.0) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self._bridge: YamuxBridge | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._transport: socket.socket | None = None
        self._listener: socket.socket | None = None
        self.session_end: CloseReason | None = None
        target = self._connect(connect_timeout)
        self.channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _connect(self, timeout: float) -> str:
        addr = self.address
        if addr.kind == "unix":
            return f"unix:{addr.path}"
        listener, local_path = _private_listener()
        self._listener = listener
        if addr.kind == "unix-serial":
            transport = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            transport.settimeout(timeout)
            try:
                transport.connect(addr.path)
            except OSError:
                transport.close()
                self._cleanup_listener()
                raise
            transport.setblocking(False)
            self._transport = transport
            bridge = YamuxBridge(
                transport.fileno(), "client", ping_interval=HEARTBEAT_INTERVAL, name="host"
            )
            bridge.add_listener(listener)
            self._bridge = bridge
            self._spawn(self._run_bridge, "yamux-client")
        else:
            self._spawn(
                lambda: relay_listener(
                    listener, lambda: dial_vsock(addr.cid, addr.port, timeout), self._stop
                ),
                "vsock-relay",
            )
        return f"unix:{local_path}"

    def _run_bridge(self) -> None:
        assert self._bridge is not None
        self.session_end = self._bridge.run()

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the gRPC channel is connected (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _cleanup_listener(self) -> None:
        if self._listener is None:
            return
        path = self._listener.getsockname()
        self._listener.close()
        self._listener = None
        if isinstance(path, str) and path:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def close(self) -> None:
        self.channel.close()
        self._stop.set()
        if self._bridge is not None:
            self._bridge.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._transport is not None:
            self._transport.close()
        self._cleanup_listener()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.close()
