"""The ``Engine`` facade: one object per state root, one method per lifecycle verb.

Used by ``kata-oci`` (with the in-process launcher: the CLI is single-threaded) and by the
gRPC agent (with the zygote launcher: the agent has threads and must never fork Python).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from kata_agent.engine import state as st_mod
from kata_agent.engine.errors import EngineError, HostError, StateError
from kata_agent.engine.state import ContainerState, StateStore
from kata_agent.engine.syscalls import Syscalls

if TYPE_CHECKING:
    from kata_agent.engine.process import LaunchRequest, LaunchResult
    from kata_agent.engine.spec import Process, Spec

# Each verb's module loads when that verb runs: a ``kata-oci delete`` process never loads
# the launcher, the spec parser or the rootfs code.

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stdio:
    """How the container process gets its stdio: three fds the caller made (pipes, or our
    own 0/1/2), or a terminal, whose pty master goes to ``on_console`` (the callee owns
    the fd it receives) unless a console socket is given."""

    fds: tuple[int, int, int] | None = None
    on_console: Callable[[int], None] | None = None

    @classmethod
    def inherit(cls) -> Stdio:
        return cls(fds=(0, 1, 2))


class Launcher(Protocol):
    def launch(self, req: LaunchRequest, fds: Sequence[int]) -> LaunchResult: ...


class InProcessLauncher:
    """Forks from the calling process: only for single-threaded callers (the CLI)."""

    def __init__(self, syscalls: Syscalls | None = None) -> None:
        self.syscalls = syscalls

    def launch(self, req: LaunchRequest, fds: Sequence[int]) -> LaunchResult:
        if threading.active_count() != 1:
            # A fork of a threaded Python can deadlock on locks held by other threads.
            raise HostError("refusing to fork a multi-threaded process; use the zygote")
        from kata_agent.engine.process import launch

        return launch(req, fds, self.syscalls)


class Engine:
    def __init__(self, state_root: str, *, syscalls: Syscalls | None = None,
                 cgroup_root: str = "/sys/fs/cgroup", launcher: Launcher | None = None,
                 use_cgroups: bool = True) -> None:
        self.store = StateStore(state_root)
        self.syscalls = syscalls or Syscalls()
        self.cgroup_root = cgroup_root
        self.launcher: Launcher = launcher or InProcessLauncher(self.syscalls)
        self.use_cgroups = use_cgroups

    # -------------------------------------------------------------- helpers

    def open_cgroup(self, cgroups_path: str, container_id: str, *,
                    existing: bool = False) -> Any:
        """The container's cgroup (engine.cgroups.Cgroup) or None when cgroups are off.
        ``existing``: None unless its directories are there."""
        if not self.use_cgroups:
            return None
        cgroups = importlib.import_module("kata_agent.engine.cgroups")
        cg = cgroups.open_cgroup(cgroups_path, container_id, root=self.cgroup_root)
        if existing and not any(os.path.isdir(p) for p in cg.paths().values()):
            return None
        return cg

    def kill_pid(self, pid: int) -> None:
        from kata_agent.engine import kill as kill_mod

        start = st_mod.pid_start_time(pid)
        if start is not None:
            kill_mod.signal_process(pid, start, signal.SIGKILL)
            kill_mod.wait_gone(pid, start, 10.0)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    # -------------------------------------------------------------- verbs

    def create(self, container_id: str, bundle: str | None, spec: Spec, *, stdio: Stdio,
               console_socket: str | None = None, pid_file: str | None = None,
               preserve_fds: Sequence[int] = (), no_pivot: bool = False) -> ContainerState:
        from kata_agent.engine import create as create_mod

        return create_mod.create(self, container_id, bundle, spec, stdio=stdio,
                                 console_socket=console_socket, pid_file=pid_file,
                                 preserve_fds=preserve_fds, no_pivot=no_pivot)

    def start(self, container_id: str) -> None:
        from kata_agent.engine import start as start_mod

        start_mod.start(self, container_id)

    def exec_process(self, container_id: str, process: Process, *, stdio: Stdio,
                     console_socket: str | None = None, pid_file: str | None = None,
                     preserve_fds: Sequence[int] = ()) -> int:
        from kata_agent.engine import exec as exec_mod

        return exec_mod.exec_process(self, container_id, process, stdio=stdio,
                                     console_socket=console_socket, pid_file=pid_file,
                                     preserve_fds=preserve_fds)

    def kill(self, container_id: str, sig: int, all: bool = False) -> None:
        from kata_agent.engine import kill as kill_mod

        kill_mod.kill(self, container_id, sig, all)

    def delete(self, container_id: str, force: bool = False) -> None:
        from kata_agent.engine import delete as delete_mod

        delete_mod.delete(self, container_id, force)

    def state(self, container_id: str) -> ContainerState:
        cstate = self.store.load(container_id)
        frozen = False
        if st_mod.pid_alive(cstate.pid, cstate.pid_start_time):
            cg = self.open_cgroup(cstate.cgroups_path, container_id, existing=True)
            frozen = cg is not None and bool(cg.is_frozen())
        return replace(cstate, status=st_mod.live_status(self.store, cstate, frozen=frozen))

    def list(self) -> builtins.list[ContainerState]:
        out = []
        for cid in self.store.ids():
            try:
                out.append(self.state(cid))
            except EngineError as e:
                log.warning("event=state_unreadable container=%s error=%s", cid, e)
        return out

    def _running_cgroup(self, container_id: str, allowed: Sequence[str]) -> Any:
        cstate = self.state(container_id)
        if cstate.status not in allowed:
            raise StateError(f"container {container_id!r} is {cstate.status}")
        cg = self.open_cgroup(cstate.cgroups_path, container_id, existing=True)
        if cg is None:
            raise StateError(f"container {container_id!r} has no cgroup")
        return cg

    def pause(self, container_id: str) -> None:
        self._running_cgroup(container_id, (st_mod.RUNNING, st_mod.CREATED)).freeze()

    def resume(self, container_id: str) -> None:
        self._running_cgroup(container_id, (st_mod.PAUSED,)).thaw()

    def update(self, container_id: str, resources: Any) -> None:
        self._running_cgroup(container_id, (st_mod.RUNNING, st_mod.CREATED, st_mod.PAUSED)
                             ).apply(resources)

    def stats(self, container_id: str) -> Any:
        return self._running_cgroup(container_id, (st_mod.RUNNING, st_mod.CREATED,
                                                   st_mod.PAUSED)).stats()

    def ps(self, container_id: str) -> builtins.list[int]:
        cstate = self.state(container_id)
        cg = self.open_cgroup(cstate.cgroups_path, container_id, existing=True)
        if cg is not None:
            return sorted(int(p) for p in cg.procs())
        return [cstate.pid] if cstate.status != st_mod.STOPPED else []
