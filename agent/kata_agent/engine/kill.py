"""``kill``: signal the init (through a pidfd, checked against the recorded start time,
so a recycled pid is never signalled) or every process of the container's cgroup."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from typing import TYPE_CHECKING, Any

from kata_agent.engine import state as st_mod
from kata_agent.engine.errors import HostError, StateError

if TYPE_CHECKING:
    from kata_agent.engine.container import Engine

log = logging.getLogger(__name__)

_OPEN: Any = object()  # kill_and_wait: open the cgroup itself


def open_pidfd(pid: int, start_time: int) -> int | None:
    """A pidfd for the process, or None when it is gone or the pid was recycled."""
    if pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked after opening: the pidfd now pins this exact process.
    if st_mod.pid_start_time(pid) != start_time:
        os.close(fd)
        return None
    return fd


def signal_process(pid: int, start_time: int, sig: int) -> bool:
    fd = open_pidfd(pid, start_time)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    """Wait until the process exits (a pidfd turns readable at exit)."""
    fd = open_pidfd(pid, start_time)
    if fd is None:
        return True
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)


def kill(engine: Engine, container_id: str, sig: int, all: bool = False) -> None:
    cstate = engine.state(container_id)
    if cstate.status == st_mod.STOPPED and not all:
        raise StateError(f"container {container_id!r} is not running")
    if all:
        cg = engine.open_cgroup(cstate.cgroups_path, container_id, existing=True)
        if cg is not None:
            cg.kill_all(sig)
            if cstate.status == st_mod.PAUSED and sig == signal.SIGKILL:
                cg.thaw()
            log.info("event=killed_all container=%s signal=%d", container_id, sig)
            return
    if not signal_process(cstate.pid, cstate.pid_start_time, sig):
        raise StateError(f"container {container_id!r} is not running")
    log.info("event=killed container=%s pid=%d signal=%d", container_id, cstate.pid, sig)


def kill_and_wait(engine: Engine, cstate: st_mod.ContainerState, timeout: float = 10.0,
                  cg: Any = _OPEN) -> None:
    """SIGKILL everything in the container's cgroup and its init, and wait for the init.
    ``cg``: the container's cgroup when the caller opened it already (None: it has none)."""
    if cg is _OPEN:
        cg = engine.open_cgroup(cstate.cgroups_path, cstate.id, existing=True)
    if cg is not None:
        with contextlib.suppress(OSError, HostError):
            # Nothing in it (the usual case after the workload exited) means nothing can
            # fork in it either: skip the freeze-signal-thaw round.
            if cg.procs():
                cg.kill_all(signal.SIGKILL)
                cg.thaw()
    signal_process(cstate.pid, cstate.pid_start_time, signal.SIGKILL)
    if not wait_gone(cstate.pid, cstate.pid_start_time, timeout):
        raise HostError(f"container {cstate.id!r} init {cstate.pid} did not exit")
