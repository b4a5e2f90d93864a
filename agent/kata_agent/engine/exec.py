"""``exec``: start another process inside a running container: join the init's
namespaces and cgroup, take its credentials from the given process spec."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kata_agent.engine import state as st_mod
from kata_agent.engine.create import hand_over_console, write_pid_file
from kata_agent.engine.errors import EngineError, SpecError, StateError
from kata_agent.engine.process import LaunchRequest
from kata_agent.engine.spec import Process

if TYPE_CHECKING:
    from kata_agent.engine.container import Engine, Stdio

log = logging.getLogger(__name__)


def exec_process(engine: Engine, container_id: str, process: Process, *, stdio: Stdio,
                 console_socket: str | None = None, pid_file: str | None = None,
                 preserve_fds: Sequence[int] = ()) -> int:
    cstate = engine.state(container_id)
    if cstate.status not in (st_mod.RUNNING, st_mod.CREATED):
        raise StateError(f"cannot exec in a {cstate.status} container {container_id!r}")
    if process.terminal and console_socket is None and stdio.on_console is None:
        raise SpecError("a terminal needs --console-socket", field="process.terminal")
    if not process.terminal and stdio.fds is None:
        raise EngineError("no stdio given for a process without terminal")
    cg = engine.open_cgroup(cstate.cgroups_path, container_id, existing=True)
    procs: tuple[str, ...] = ()
    if cg is not None:
        procs = tuple(sorted({os.path.join(d, "cgroup.procs") for d in cg.paths().values()}))
    req = LaunchRequest(kind="exec", container_id=container_id, spec=cstate.config,
                        process=process.raw, init_pid=cstate.pid, cgroup_procs=procs,
                        preserve_fds=len(preserve_fds))
    stdio_fds = () if process.terminal else (stdio.fds or ())
    result = engine.launcher.launch(req, [*stdio_fds, *preserve_fds])
    hand_over_console(result.console_fd, stdio, console_socket)
    if pid_file:
        write_pid_file(pid_file, result.pid)
    log.info("event=exec container=%s pid=%d", container_id, result.pid)
    return result.pid
