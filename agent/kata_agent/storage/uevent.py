"""Kernel uevents: parse the netlink messages and wait for a device to appear.

The kernel broadcasts one datagram per device event on NETLINK_KOBJECT_UEVENT, multicast
group 1, in the form ``ACTION@DEVPATH\\0KEY=VALUE\\0KEY=VALUE...``. A waiter subscribes
first and only then looks in sysfs, so a device that arrives between the two is never missed.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kata_agent.engine.errors import HostError

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
MAX_UEVENT_BYTES = 8192  # the kernel caps one uevent at UEVENT_BUFFER_SIZE (2048) + header
MAX_ENV_KEYS = 64

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Uevent:
    action: str
    devpath: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devname(self) -> str:
        return self.env.get("DEVNAME", "")

    @property
    def seqnum(self) -> str:
        return self.env.get("SEQNUM", "")


def parse_uevent(data: bytes) -> Uevent | None:
    """One kernel uevent datagram, or None for anything else (udev's re-broadcasts start
    with ``libudev``; garbage from a confused sender is dropped, not raised)."""
    if len(data) > MAX_UEVENT_BYTES or data.startswith(b"libudev"):
        return None
    parts = data.split(b"\0")
    head = parts[0].decode("utf-8", "replace")
    action, sep, devpath = head.partition("@")
    if not sep or not action or not devpath.startswith("/"):
        return None
    env: dict[str, str] = {}
    for raw in parts[1:]:
        if not raw:
            continue
        key, eq, value = raw.decode("utf-8", "replace").partition("=")
        if not eq or not key:
            continue
        if len(env) >= MAX_ENV_KEYS:
            break
        env[key] = value
    if env.get("ACTION", action) != action or env.get("DEVPATH", devpath) != devpath:
        return None
    return Uevent(action=action, devpath=devpath, env=env)


class UeventSource(Protocol):
    """Where uevent datagrams come from: the kernel socket, or a list in unit tests."""

    def receive(self, timeout: float) -> bytes | None: ...

    def close(self) -> None: ...


class NetlinkUeventSource:
    """A NETLINK_KOBJECT_UEVENT socket bound to the kernel's multicast group."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                   NETLINK_KOBJECT_UEVENT)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, KERNEL_GROUP))
        except OSError:
            self._sock.close()
            raise

    def receive(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
        if not ready:
            return None
        data, addr = self._sock.recvfrom(MAX_UEVENT_BYTES)
        # Only the kernel (port id 0) sends real uevents; a local process could forge them.
        if addr[0] != 0:
            return b""
        return data

    def close(self) -> None:
        self._sock.close()


SourceFactory = Callable[[], UeventSource]


def wait_for_device(source_factory: SourceFactory, *, what: str, timeout: float,
                    existing: Callable[[], T | None], match: Callable[[Uevent], T | None]) -> T:
    """Return ``existing()`` if the device is there, else the result of ``match`` on the
    first uevent it accepts; HostError(ETIMEDOUT) after ``timeout`` seconds.

    The socket is opened before ``existing`` looks, so no event falls between the two."""
    try:
        source = source_factory()
    except OSError as e:
        raise HostError(f"cannot listen for uevents: {e.strerror}", errno=e.errno or 0) from e
    try:
        found = existing()
        if found is not None:
            log.debug("event=device_present what=%s", what)
            return found
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            data = source.receive(left)
            if data is None:
                continue
            ev = parse_uevent(data)
            if ev is None:
                continue
            log.debug("event=uevent action=%s devpath=%s subsystem=%s seqnum=%s",
                      ev.action, ev.devpath, ev.subsystem, ev.seqnum)
            hit = match(ev)
            if hit is not None:
                log.info("event=device_hotplugged what=%s devpath=%s", what, ev.devpath)
                return hit
        # A last look: the device may have come with an event we could not decode.
        found = existing()
        if found is not None:
            return found
        raise HostError(f"timeout after {timeout:g}s waiting for device {what}",
                        errno=errno.ETIMEDOUT)
    finally:
        source.close()
