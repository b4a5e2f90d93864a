"""The debug console: a shell for an operator, asked for with `agent.debug_console`.

On the guest console by default; with `agent.debug_console_vport=PORT` a shell is served to
each connection on that vsock port instead. Shells are started with fork+exec done by the
C library (subprocess without preexec_fn), never by forking this threaded process to run
Python code.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import threading
from collections.abc import Sequence

from kata_agent.config import AgentConfig

log = logging.getLogger(__name__)

SHELLS: Sequence[str] = ("/bin/bash", "/bin/sh")
CONSOLE = "/dev/console"


def find_shell(candidates: Sequence[str] = SHELLS) -> str | None:
    for shell in candidates:
        if os.access(shell, os.X_OK):
            return shell
    return None


class _Console:
    def __init__(self, name: str, target: object) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.stopping.set()


class ConsoleShell(_Console):
    """Keeps a shell running on the console device, restarting it when it exits.

    With ``pid_file`` (in the agent's runtime dir) the shell's pid is recorded there: an
    agent restarted by systemd finds the shell its predecessor left on the console still
    running, keeps it, and starts its own only when that one exits. Two shells would
    fight over the console's input.
    """

    def __init__(self, shell: str, device: str = CONSOLE, pid_file: str | None = None) -> None:
        super().__init__("debug-console", self._run)
        self.shell = shell
        self.device = device
        self.pid_file = pid_file

    def _wait_for_previous(self) -> None:
        from kata_agent.engine.kill import open_pidfd

        if self.pid_file is None:
            return
        try:
            with open(self.pid_file) as f:
                pid, start = (int(word) for word in f.read().split())
            pidfd = open_pidfd(pid, start)
        except (OSError, ValueError):
            return
        if pidfd is None:
            return
        try:
            log.info("debug console shell of the previous agent kept pid=%d", pid)
            while not self.stopping.is_set():
                if select.select([pidfd], [], [], 0.5)[0]:
                    return  # it exited
        finally:
            os.close(pidfd)

    def _record(self, pid: int) -> None:
        from kata_agent.engine.state import pid_start_time

        if self.pid_file is None:
            return
        try:
            tmp = f"{self.pid_file}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{pid} {pid_start_time(pid) or 0}\n")
            os.rename(tmp, self.pid_file)
        except OSError as err:
            log.warning("debug console pid not recorded path=%s error=%s", self.pid_file, err)

    def _run(self) -> None:
        self._wait_for_previous()
        while not self.stopping.is_set():
            try:
                fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as err:
                log.error("debug console unavailable device=%s error=%s", self.device, err)
                return
            try:
                proc = subprocess.Popen(
                    [self.shell, "-i"],
                    stdin=fd,
                    stdout=fd,
                    stderr=fd,
                    start_new_session=True,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "vt100"},
                )
            finally:
                os.close(fd)
            log.info("debug console shell started pid=%d", proc.pid)
            self._record(proc.pid)
            proc.wait()
            self.stopping.wait(0.5)


class VsockShell(_Console):
    """Serves a shell to every connection on a vsock port."""

    def __init__(self, shell: str, port: int) -> None:
        super().__init__("debug-console-vsock", self._run)
        self.shell = shell
        self.port = port

    def _run(self) -> None:
        try:
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind((socket.VMADDR_CID_ANY, self.port))
            listener.listen(4)
        except OSError as err:
            log.error("debug console vsock unavailable port=%d error=%s", self.port, err)
            return
        with listener:
            listener.settimeout(1.0)
            while not self.stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as err:
                    log.error("debug console accept failed error=%s", err)
                    return
                with conn:
                    proc = subprocess.Popen(
                        [self.shell, "-i"],
                        stdin=conn.fileno(),
                        stdout=conn.fileno(),
                        stderr=conn.fileno(),
                        start_new_session=True,
                    )
                log.info("debug console shell started pid=%d vport=%d", proc.pid, self.port)
                threading.Thread(target=proc.wait, daemon=True).start()


def start(cfg: AgentConfig, runtime_dir: str | None = None) -> list[_Console]:
    if not cfg.debug_console:
        return []
    shell = find_shell()
    if shell is None:
        log.error("debug console asked for but no shell found candidates=%s", ",".join(SHELLS))
        return []
    console: _Console = (
        VsockShell(shell, cfg.debug_console_vport)
        if cfg.debug_console_vport
        else ConsoleShell(shell, pid_file=os.path.join(runtime_dir, "debug-console.pid")
                          if runtime_dir else None)
    )
    console.thread.start()
    return [console]
