"""The proxy: many local clients multiplexed onto one serial connection.

This is the role kata-proxy played for Kata 1.x: a VM's serial port (a unix socket made by
QEMU) accepts a single connection, so every runtime or shim connection to a local socket
becomes one yamux stream on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Sequence

from kata_agent.bridge import CloseReason, YamuxBridge
from kata_agent.channel import bind_unix
from kata_agent.host.client import HEARTBEAT_INTERVAL

log = logging.getLogger(__name__)


class Proxy:
    """Connects to `serial_path` and serves each connection on `listen_paths` as a stream."""

    def __init__(self, serial_path: str, listen_paths: Sequence[str]) -> None:
        self.listen_paths = list(listen_paths)
        self._transport = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._transport.connect(serial_path)
        self._transport.setblocking(False)
        self._listeners = [bind_unix(p, backlog=128) for p in self.listen_paths]
        self.bridge = YamuxBridge(
            self._transport.fileno(), "client", ping_interval=HEARTBEAT_INTERVAL, name="proxy"
        )
        for listener in self._listeners:
            self.bridge.add_listener(listener)
        self.ready = threading.Event()

    def run(self) -> CloseReason:
        log.info("proxy serving listen=%s", ",".join(self.listen_paths))
        self.ready.set()
        try:
            return self.bridge.run()
        finally:
            for listener, path in zip(self._listeners, self.listen_paths, strict=True):
                listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._transport.close()

    def close(self) -> None:
        self.bridge.close()
