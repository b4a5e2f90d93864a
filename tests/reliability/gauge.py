"""What a long-running agent may leak, read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_targets(pid: int) -> list[str]:
    """What each open fd points at (for a readable failure message)."""
    found = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            found.append(f"{name}->{os.readlink(f'/proc/{pid}/fd/{name}')}")
        except FileNotFoundError:
            continue
    return found


@dataclass(frozen=True, slots=True)
class Snapshot:
    fds: int
    threads: int
    rss: int

    @classmethod
    def of(cls, pid: int) -> Snapshot:
        return cls(fd_count(pid), thread_count(pid), rss_bytes(pid))


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:
            continue
    return names


# x86_64 and arm64 numbers of the calls a thread blocks in while waiting on fds.
_POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}


def threads_in_poll(pid: int) -> int:
    """Threads of ``pid`` blocked in poll/ppoll (where the agent waits for stream data)."""
    numbers = _POLL_SYSCALLS.get(os.uname().machine, set())
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            line = Path(f"/proc/{pid}/task/{tid}/syscall").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if line.split(" ", 1)[0] in numbers:
            count += 1
    return count
