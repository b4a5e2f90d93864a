"""The service manager's notification protocol, the parts the agent uses.

Under systemd (``Type=notify``) the agent reports ``READY=1`` once it serves, and keeps
the host side of every container's stdio in the manager's file descriptor store
(``FDSTORE=1``, ``FileDescriptorStoreMax=`` in the unit). When the agent dies and the unit
restarts it, the manager hands the stored fds to the new agent (``LISTEN_FDS``,
``LISTEN_FDNAMES``): containers keep their pipes, and their output keeps flowing.

Messages are datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``); fds travel as SCM_RIGHTS. Stored fds come back numbered from 3 in store
order, each with its name.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
MAX_NAME = 255


def valid_name(name: str) -> bool:
    """What the manager accepts as an fd name: printable ASCII without ``:`` (the
    separator of LISTEN_FDNAMES), at most 255 characters."""
    return 0 < len(name) <= MAX_NAME and all(32 < ord(c) < 127 and c != ":" for c in name)


class Notifier:
    """Sends notifications; every call is a no-op when there is no manager to talk to."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr and not (addr.startswith("/") or addr.startswith("@")):
            log.warning("event=notify_socket_unsupported address=%s", addr)
            addr = ""
        return cls(addr or None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def _send(self, text: str, fds: Sequence[int] = ()) -> bool:
        if self._sock is None or self.address is None:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            # Not socket.send_fds: it drops its address argument.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self._sock.sendmsg([text.encode()], rights if fds else [], 0, addr)
        except OSError as e:
            log.warning("event=notify_failed message=%s error=%s", text.split("\n", 1)[0], e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def store(self, name: str, fds: Sequence[int]) -> bool:
        """Keep ``fds`` under ``name`` (the manager holds duplicates; ours stay open)."""
        if not fds or not valid_name(name):
            return False
        return self._send(f"FDSTORE=1\nFDNAME={name}", fds)

    def remove(self, name: str) -> bool:
        """Drop every stored fd named ``name``."""
        if not valid_name(name):
            return False
        return self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(environ: dict[str, str] | None = None, *, unset: bool = True
               ) -> dict[str, list[int]]:
    """The fds the manager passed to this process, by name (unnamed ones under
    ``"unknown"``). Empty unless LISTEN_PID is our pid. The variables are removed from
    the environment (children must not take the fds for theirs) and the fds made
    close-on-exec."""
    env = os.environ if environ is None else environ
    out: dict[str, list[int]] = {}
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        log.warning("event=listen_fds_invalid")
        pid, count = 0, 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return out
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            log.warning("event=listen_fd_missing fd=%d", fd)
            continue
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out
