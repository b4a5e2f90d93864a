"""Start a real `kata-agent` process for tests and wait for it with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds (1 ms at first, backing off to 50 ms); raise
    TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class AgentProcess:
    def __init__(self, tmp: Path, channel: str, extra: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.channel = channel
        self.log_path = tmp / "agent.log"
        self.runtime_dir = tmp / "run"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmdline = tmp / "cmdline"
        cmdline.write_text("console=ttyS0 agent.log=debug\n")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kata_agent",
                "--channel",
                channel,
                "--cmdline",
                str(cmdline),
                "--runtime-dir",
                str(self.runtime_dir),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # A service manager of the test run's own must not receive this agent's fds.
            env={**{k: v for k, v in os.environ.items()
                    if k != "NOTIFY_SOCKET" and not k.startswith("LISTEN_")},
                 "PYTHONUNBUFFERED": "1"},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            return "agent ready" in self.log_text()

        wait_for(ready, timeout, "the agent to be ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
