"""``create``: reserve the id, make the cgroup, start the init blocked before exec, record
the state. Any failure undoes every step done so far: no state dir, cgroup, process or
mount is left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kata_agent.engine import state as st_mod
from kata_agent.engine.errors import EngineError, SpecError
from kata_agent.engine.process import LaunchRequest, send_console
from kata_agent.engine.spec import Spec, validate_id
from kata_agent.engine.state import ContainerState

if TYPE_CHECKING:
    from kata_agent.engine.cgroups.base import Cgroup
    from kata_agent.engine.container import Engine, Stdio

log = logging.getLogger(__name__)


def bind_exec_socket(state_dir: str) -> socket.socket:
    """The socket the init waits on until ``start``. Bound through the dir's fd so long
    state roots do not hit the 108-byte sun_path limit."""
    dfd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(f"/proc/self/fd/{dfd}/{st_mod.EXEC_SOCKET}")
        s.listen(1)
    except BaseException:
        s.close()
        raise
    finally:
        os.close(dfd)
    return s


def check_rootfs(spec: Spec, bundle: str | None) -> str:
    path = spec.rootfs_path(bundle)
    if not os.path.isdir(path):
        raise SpecError(f"rootfs {path!r} does not exist or is not a directory",
                        field="root.path")
    return os.path.realpath(path)


def write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def hand_over_console(fd: int | None, stdio: Stdio, console_socket: str | None) -> None:
    if fd is None:
        return
    try:
        if console_socket is not None:
            send_console(console_socket, fd)
        elif stdio.on_console is not None:
            stdio.on_console(os.dup(fd))
    finally:
        os.close(fd)


def create(engine: Engine, container_id: str, bundle: str | None, spec: Spec, *, stdio: Stdio,
           console_socket: str | None = None, pid_file: str | None = None,
           preserve_fds: Sequence[int] = (), no_pivot: bool = False) -> ContainerState:
    validate_id(container_id)
    proc = spec.process
    if proc is None:
        raise SpecError("is required to create a container", field="process")
    rootfs = check_rootfs(spec, bundle)
    if proc.terminal and console_socket is None and stdio.on_console is None:
        raise SpecError("a terminal needs --console-socket", field="process.terminal")
    if not proc.terminal and stdio.fds is None:
        raise EngineError("no stdio given for a process without terminal")
    with contextlib.ExitStack() as undo:
        state_dir = engine.store.reserve(container_id)
        undo.callback(engine.store.remove, container_id)
        cg = engine.open_cgroup(spec.linux.cgroups_path, container_id)
        cg_paths: dict[str, str] = {}
        cg_version = 0
        cg_procs: tuple[str, ...] = ()
        if cg is not None:
            cg.create()
            undo.callback(discard_cgroup, cg)
            if spec.linux.resources is not None:
                cg.apply(spec.linux.resources)
            cg_paths = dict(cg.paths())
            cg_version = cg.version
            cg_procs = tuple(sorted({os.path.join(d, "cgroup.procs")
                                     for d in cg_paths.values()}))
        lsock = bind_exec_socket(state_dir)
        undo.callback(lsock.close)
        req = LaunchRequest(kind="create", container_id=container_id, spec=spec.raw,
                            process=proc.raw, rootfs=rootfs,
                            bundle=os.path.realpath(bundle) if bundle else "",
                            cgroup_procs=cg_procs,
                            cgroup_paths=cg_paths, cgroup_version=cg_version,
                            no_pivot=no_pivot, preserve_fds=len(preserve_fds))
        stdio_fds = () if proc.terminal else (stdio.fds or ())
        fds = [*stdio_fds, lsock.fileno(), *preserve_fds]
        result = engine.launcher.launch(req, fds)
        undo.callback(engine.kill_pid, result.pid)
        lsock.close()
        hand_over_console(result.console_fd, stdio, console_socket)
        start_time = st_mod.pid_start_time(result.pid)
        if start_time is None:
            raise EngineError(f"container init {result.pid} exited during create")
        cstate = ContainerState(
            id=container_id, pid=result.pid, pid_start_time=start_time,
            bundle=os.path.realpath(bundle) if bundle else "", rootfs=rootfs,
            status=st_mod.CREATED, created=st_mod.now_rfc3339(),
            annotations=dict(spec.annotations), cgroup_paths=cg_paths,
            cgroups_path=spec.linux.cgroups_path, owner=_owner(), config=spec.raw)
        engine.store.save(cstate)
        run_hooks(spec, ("prestart", "create_runtime"), cstate)
        if pid_file:
            write_pid_file(pid_file, result.pid)
        undo.pop_all()
    log.info("event=created container=%s pid=%d", container_id, cstate.pid)
    return cstate


def discard_cgroup(cg: Cgroup) -> None:
    """Undo of a failed create. The launch joins the cgroup before forking anything, so
    killing what is in it also takes an init the launch lost track of (a step timing out
    after the init was forked); only then can the directories go."""
    cg.kill_all(signal.SIGKILL)
    cg.destroy()


def _owner() -> str:
    return "" if os.geteuid() == 0 else str(os.geteuid())


def run_hooks(spec: Spec, phases: Sequence[str], cstate: ContainerState) -> None:
    """Runtime-namespace hooks (prestart, createRuntime, poststart, poststop)."""
    if spec.hooks is None:
        return
    from kata_agent.engine import hooks
    doc: dict[str, Any] = cstate.oci_state(spec.oci_version or "1.0.2")
    for phase in phases:
        hooks.run_hooks(getattr(spec.hooks, phase), doc, phase=phase)
