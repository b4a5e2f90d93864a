"""The zygote: a single-threaded process that forks container processes for a threaded
caller (the gRPC agent must never fork its own interpreter: a lock held by another thread
at fork time stays held forever in the child).

The caller starts it before any thread with ``ZygoteLauncher.start()``: a fresh exec of a
sealed memfd copy of the interpreter (so containers never reach the host's python binary,
see engine/process.py), connected by a SOCK_SEQPACKET socketpair. Each request is one
JSON message with its fds attached by SCM_RIGHTS; each reply is one message: the new pid
(plus a pty master fd for terminals) or the error as data.

The zygote does not reap container inits: they are reparented to the nearest subreaper
(the agent), which owns their exit status.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

from kata_agent.engine import process as proc_mod
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError
from kata_agent.engine.process import LaunchRequest, LaunchResult

log = logging.getLogger(__name__)

MAX_FDS = 200  # SCM_RIGHTS carries at most 253 fds per message


class ZygoteLauncher:
    """Client side of the zygote; thread-safe (one request at a time)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self._sock = sock
        self._proc = proc
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> ZygoteLauncher:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        exe = proc_mod.sealed_interpreter_fd()
        try:
            # Fresh exec (subprocess forks in C and execs at once): no Python runs in a
            # fork of the caller, and the zygote's /proc/self/exe is the sealed copy.
            proc = subprocess.Popen(
                [sys.executable, "-m", "kata_agent.engine.zygote", str(theirs.fileno()),
                 str(exe)],
                executable=f"/proc/self/fd/{exe}", pass_fds=(theirs.fileno(), exe),
                stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            os.close(exe)
            theirs.close()
        log.info("event=zygote_started pid=%d", proc.pid)
        return cls(mine, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def launch(self, req: LaunchRequest, fds: Sequence[int]) -> LaunchResult:
        if len(fds) > MAX_FDS:
            raise HostError(f"too many fds for one request ({len(fds)} > {MAX_FDS})")
        with self._lock:
            try:
                proc_mod.send_msg(self._sock, {"op": "launch", "request": req.to_json()}, fds)
                msg, got = proc_mod.recv_msg(self._sock, maxfds=1)
            except OSError as e:
                raise HostError(f"zygote unreachable: {e}", errno=e.errno or 0) from e
        if msg is None:
            raise HostError("zygote exited")
        if msg.get("type") == "error":
            for fd in got:
                os.close(fd)
            raise proc_mod.error_from_data(msg)
        return LaunchResult(pid=int(msg["pid"]), console_fd=got[0] if got else None)

    def close(self) -> None:
        self._sock.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def serve(sock: socket.socket, syscalls: sc.Syscalls | None = None) -> None:
    """Answer launch requests until the caller closes its end."""
    syscalls = syscalls or sc.Syscalls()
    while True:
        msg, fds = proc_mod.recv_msg(sock, maxfds=MAX_FDS)
        if msg is None:
            return
        try:
            if msg.get("op") != "launch":
                raise HostError(f"unknown zygote op {msg.get('op')!r}")
            req = LaunchRequest.from_json(msg["request"])
            res = proc_mod.launch(req, fds, syscalls)
        except Exception as e:  # errors travel back as data; the zygote stays up
            log.info("event=launch_failed error=%s", e)
            proc_mod.send_msg(sock, proc_mod.error_to_data(e))
            continue
        finally:
            for fd in fds:
                os.close(fd)
        reply = {"type": "launched", "pid": res.pid}
        if res.console_fd is not None:
            proc_mod.send_msg(sock, reply, [res.console_fd])
            os.close(res.console_fd)
        else:
            proc_mod.send_msg(sock, reply)


def main(argv: Sequence[str]) -> int:
    sock_fd, exe_fd = int(argv[0]), int(argv[1])
    os.close(exe_fd)
    syscalls = sc.Syscalls()
    # Die with the caller: a zygote without a client has nothing to do.
    syscalls.prctl(sc.PR_SET_PDEATHSIG, 9)
    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)
    serve(sock, syscalls)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
