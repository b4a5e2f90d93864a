"""Typing into a booted guest's debug console (``agent.debug_console`` with the VM's console
served on a unix socket, ``VM(console_socket=...)``): the operator's way into a guest."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from kata_agent.host.vm import VM

from tests.agent_process import wait_for

MARKER_BASE = "console-done"


def run_on_console(vm: VM, console: Path, command: str, timeout: float, *,
                   what: str = "the console command") -> None:
    """Run ``command`` (one shell line) in the guest's console shell and wait until it
    finished. The marker printed after it is computed by the shell, so the echo of the
    typed line does not count."""
    n = vm.console_text().count(f"{MARKER_BASE}-42")
    line = f"{command}; echo {MARKER_BASE}-$((6 * 7))\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(console))
        # Connected until the shell ran it: the emulated UART takes the input a few bytes
        # at a time, and what is still unread when the connection closes is lost.
        s.sendall(line.encode())
        s.setblocking(False)

        def done() -> bool:
            # The console's output comes to this connection too: unread, it would fill the
            # socket and stall the guest's console writers (the agent among them).
            with contextlib.suppress(BlockingIOError):
                while s.recv(65536):
                    pass
            return vm.console_text().count(f"{MARKER_BASE}-42") > n

        wait_for(done, timeout, what)
