"""The console shell after an agent restart: the shell the previous agent left on the
console is kept, and the new agent's own starts only once it exited (real processes; a
script stands in for the shell, /dev/null for the console)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
from kata_agent.debug_console import ConsoleShell
from kata_agent.engine.state import pid_start_time

from tests.agent_process import wait_for


def test_the_previous_agents_shell_is_kept_until_it_exits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kata_agent.debug_console")
    previous = subprocess.Popen(["sleep", "60"])
    pid_file = tmp_path / "debug-console.pid"
    pid_file.write_text(f"{previous.pid} {pid_start_time(previous.pid)}\n")
    started = tmp_path / "started"
    shell = tmp_path / "shell"
    shell.write_text(f"#!/bin/sh\necho $$ >> {started}\nexec sleep 60\n")
    shell.chmod(0o755)
    console = ConsoleShell(str(shell), device="/dev/null", pid_file=str(pid_file))
    console.thread.start()
    ours = 0
    try:
        wait_for(lambda: "shell of the previous agent kept" in caplog.text, 10,
                 "the previous shell to be kept")
        assert not started.exists()  # no second shell on the console meanwhile
        previous.kill()
        previous.wait()
        wait_for(started.exists, 10, "our shell once the previous one exited")
        ours = int(started.read_text().split()[0])
        # Recorded for the next restart: pid and start time.
        wait_for(lambda: pid_file.read_text().split()[0] == str(ours), 10, "the pid file")
        assert pid_file.read_text().split() == [str(ours), str(pid_start_time(ours))]
    finally:
        console.stop()
        if previous.poll() is None:
            previous.kill()
            previous.wait()
        if ours:
            os.kill(ours, signal.SIGKILL)
        console.thread.join(10)


def test_a_stale_pid_file_does_not_hold_the_shell_back(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    pid_file = tmp_path / "debug-console.pid"
    pid_file.write_text(f"{gone.pid} 12345\n")
    started = tmp_path / "started"
    shell = tmp_path / "shell"
    shell.write_text(f"#!/bin/sh\necho $$ >> {started}\nexec sleep 60\n")
    shell.chmod(0o755)
    console = ConsoleShell(str(shell), device="/dev/null", pid_file=str(pid_file))
    console.thread.start()
    try:
        wait_for(started.exists, 10, "our shell")
    finally:
        console.stop()
        wait_for(lambda: len(started.read_text().split()) >= 1, 10, "the shell pid")
        os.kill(int(started.read_text().split()[0]), signal.SIGKILL)
        console.thread.join(10)
