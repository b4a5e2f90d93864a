"""The sandbox: the one pod a guest runs. Its containers, their processes and streams, the
namespaces they share, the storages mounted for them.

Requests arrive as typed values (converted at the RPC edge); containers are made by the
engine (through the zygote: the agent has threads and never forks its own interpreter).

Exit statuses: the agent is the child subreaper of everything the zygote starts, so every
container process becomes our child once its launcher exits. The ``Reaper`` holds a pidfd
per process and collects each status with ``waitid(P_PIDFD)``: only the processes it
watches are reaped, so ``subprocess`` keeps working for ``ps`` and ``modprobe``.

Shared namespaces: a small pause process (a fresh interpreter run from a sealed copy, see
``pause_main``) owns the sandbox's IPC and UTS namespaces and, with ``sandbox_pidns``, a PID
namespace in which it is pid 1; containers join them by /proc/<pause>/ns/<type>.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_agent import network
from kata_agent.engine import state as sc_state
from kata_agent.engine import syscalls as sc
from kata_agent.engine.container import Engine, Stdio
from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
    StateError,
)
from kata_agent.engine.spec import Process, Spec, validate_id
from kata_agent.engine.state import STOPPED
from kata_agent.iostreams import Cancelled, Canceller, ProcessIO
from kata_agent.persist import Keeper
from kata_agent.policy import Policy
from kata_agent.storage import StorageManager
from kata_agent.storage.spec import DeviceSpec, MountHandle, StorageSpec

log = logging.getLogger(__name__)

DEFAULT_SHARED_DIR = "/run/kata-containers/shared/containers"
DEFAULT_ROOTFS_ROOTS = ("/run/kata-containers",)
DRAIN_GRACE = 2.0  # seconds without a reader after which output counts as abandoned
MAX_KERNEL_MODULES = 64
MAX_MODULE_PARAMS = 64
MAX_PS_ARGS = 32
MAX_PS_OUTPUT = 4 * 1024 * 1024
MAX_HOOKS_PER_PHASE = 64
MAX_CONTAINERS = 1024
MAX_PROCESSES = 1024  # per container
MAX_OOM_EVENTS = 1024
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PS_ARG_RE = re.compile(r"^[A-Za-z0-9_,.=:+%-]{1,128}$")
PAUSE_READY_TIMEOUT = 30.0
REMOVE_WAIT = 60.0  # RemoveContainer timeout 0: how long SIGKILL may take, at most


class RemoveTimeout(EngineError):
    """RemoveContainer's timeout passed before the container was gone."""


# ===================================================================== requests


@dataclass(frozen=True, slots=True)
class KernelModule:
    name: str
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SandboxRequest:
    hostname: str = ""
    dns: tuple[str, ...] = ()
    storages: tuple[StorageSpec, ...] = ()
    sandbox_pidns: bool = False
    sandbox_id: str = ""
    guest_hook_path: str = ""
    kernel_modules: tuple[KernelModule, ...] = ()


@dataclass(frozen=True, slots=True)
class ContainerRequest:
    container_id: str
    exec_id: str
    oci: Mapping[str, Any]
    storages: tuple[StorageSpec, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    sandbox_pidns: bool = False


@dataclass(frozen=True, slots=True)
class NetworkStats:
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Where things live in the guest (tests point these at scratch locations)."""

    shared_dir: str = DEFAULT_SHARED_DIR
    rootfs_roots: tuple[str, ...] = DEFAULT_ROOTFS_ROOTS
    resolv_conf: str = "/etc/resolv.conf"


# ===================================================================== reaping


class ExitWatch:
    """One watched child: its pidfd (for signals that cannot hit a recycled pid) and,
    once it exited, its status as a shell reports it (code, or 128 + signal)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.status: int | None = None
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        self._released = False

    @property
    def exited(self) -> bool:
        return self.status is not None

    def on_exit(self, cb: Callable[[], None]) -> None:
        with self._lock:
            if self.status is None:
                self._wakers.append(cb)
                return
        cb()

    def _set(self, status: int) -> None:
        with self._lock:
            self.status = status
            wakers, self._wakers = self._wakers, []
            if self._released and self.pidfd >= 0:
                os.close(self.pidfd)  # released while running: the fd was ours to close
        for cb in wakers:
            cb()

    def wait(self, cancel: Canceller | None = None, timeout: float | None = None) -> int:
        if self.status is not None:
            return self.status
        ev = threading.Event()
        self.on_exit(ev.set)
        if cancel is not None:
            cancel.on_cancel(ev.set)
        try:
            ev.wait(timeout)
        finally:
            # Hosts that poll with short deadlines must not grow the list forever.
            with self._lock, contextlib.suppress(ValueError):
                self._wakers.remove(ev.set)
        if self.status is not None:
            return self.status
        if cancel is not None and cancel.is_set:
            raise Cancelled("cancelled")
        raise TimeoutError(f"process {self.pid} still running")

    def send_signal(self, sig: int) -> bool:
        """False when the process is gone already."""
        with self._lock:
            if self._released or self.status is not None:
                return False
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                return False
            return True

    def release(self) -> None:
        """Give up the pidfd. While the process runs the reaper still polls it, so it
        is closed when the reaper collected the status."""
        with self._lock:
            if not self._released:
                self._released = True
                if self.status is not None and self.pidfd >= 0:
                    os.close(self.pidfd)


def status_of(res: Any) -> int:
    if res.si_code == os.CLD_EXITED:
        return int(res.si_status)
    return 128 + int(res.si_status)


class Reaper:
    """Collects the exit status of the processes it was asked to watch (one thread, one
    poll over all their pidfds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._watches: dict[int, ExitWatch] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    def watch(self, pid: int) -> ExitWatch:
        return self._add(ExitWatch(pid, os.pidfd_open(pid)))

    def _add(self, w: ExitWatch) -> ExitWatch:
        pidfd = w.pidfd
        with self._lock:
            self._watches[pidfd] = w
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
                self._thread.start()
        os.eventfd_write(self._wake, 1)
        return w

    def adopt(self, pid: int, start_time: int) -> ExitWatch:
        """Watch a process a previous agent started (after a restart): it is not our
        child, so its exit status goes to whoever reaps it and is reported as 255."""
        from kata_agent.engine.kill import open_pidfd

        pidfd = open_pidfd(pid, start_time)
        if pidfd is None:
            w = ExitWatch(pid, -1)
            log.warning("event=exit_status_lost pid=%d reason=exited_during_restart", pid)
            w._set(255)
            return w
        return self._add(ExitWatch(pid, pidfd))

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                fds = list(self._watches)
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                self._collect(fd)

    def _collect(self, pidfd: int) -> None:
        with self._lock:
            w = self._watches.get(pidfd)
        if w is None:
            return
        try:
            res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child (no subreaper): it exited, its status went elsewhere.
            log.warning("event=exit_status_lost pid=%d", w.pid)
            status = 255
        except OSError as e:
            log.error("event=waitid_failed pid=%d error=%s", w.pid, e)
            status = 255
        else:
            if res is None:
                return
            status = status_of(res)
        with self._lock:
            self._watches.pop(pidfd, None)
        log.info("event=process_exited pid=%d status=%d", w.pid, status)
        w._set(status)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            t = self._thread
        os.eventfd_write(self._wake, 1)
        if t is not None:
            t.join(5)


# ===================================================================== pause process


class PauseProcess:
    """Owner of the sandbox's shared namespaces (see ``pause_main``)."""

    def __init__(self, proc: subprocess.Popen[bytes] | None, pid: int, pidfd: int) -> None:
        self._proc = proc  # None: adopted after an agent restart, not our child
        self.pid = pid
        self._pidfd = pidfd
        self.start_time = sc_state.pid_start_time(pid) or 0

    @classmethod
    def adopt(cls, pid: int, start_time: int) -> PauseProcess | None:
        """The holder a previous agent started, if it still runs."""
        from kata_agent.engine.kill import open_pidfd

        pidfd = open_pidfd(pid, start_time)
        return None if pidfd is None else cls(None, pid, pidfd)

    @classmethod
    def start(cls, *, new_pid: bool, hostname: str, outlive_agent: bool = False
              ) -> PauseProcess:
        from kata_agent.engine import process as proc_mod

        flags = sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | (sc.CLONE_NEWPID if new_pid else 0)
        exe = proc_mod.sealed_interpreter_fd()
        try:
            # A fresh exec from a sealed copy of the interpreter: containers that share
            # its PID namespace never reach the host's python binary through /proc/1/exe.
            proc = subprocess.Popen(
                [sys.executable, "-m", "kata_agent.sandbox", "pause", str(flags), hostname,
                 "outlive" if outlive_agent else "with-agent"],
                executable=f"/proc/self/fd/{exe}", pass_fds=(exe,), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, close_fds=True,
            )
        finally:
            os.close(exe)
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout.fileno(), PAUSE_READY_TIMEOUT)
            pid = int(line)
        except (ValueError, OSError, TimeoutError) as e:
            proc.kill()
            proc.wait()
            raise HostError(f"the sandbox pause process did not start: {e}") from e
        finally:
            proc.stdout.close()
        log.info("event=pause_started pid=%d pidns=%s", pid, new_pid)
        return cls(proc, pid, os.pidfd_open(pid))

    def ns_path(self, kind: str) -> str:
        return f"/proc/{self.pid}/ns/{kind}"

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return not select.select([self._pidfd], [], [], 0)[0]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        # Not our child (adopted): its pidfd turns readable when it is gone.
        if self._proc is None and not select.select([self._pidfd], [], [], 10)[0]:
            log.error("event=pause_stop_timeout pid=%d", self.pid)
        os.close(self._pidfd)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        log.info("event=pause_stopped pid=%d", self.pid)


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 64)
        if not chunk:
            raise OSError(errno.EPIPE, "exited before it was ready")
        buf += chunk
        if len(buf) > 64:
            raise ValueError("unexpected output")
    return buf.decode().strip()


def pause_main(argv: Sequence[str]) -> int:
    """``python -m kata_agent.sandbox pause FLAGS HOSTNAME [outlive|with-agent]``: unshare
    the namespaces, fork the holder (pid 1 of the new PID namespace when asked), print its
    pid, wait for it. It dies with the agent unless it must outlive it (the agent keeps its
    containers across restarts)."""
    flags, hostname = int(argv[0]), argv[1] if len(argv) > 1 else ""
    outlive = len(argv) > 2 and argv[2] == "outlive"
    syscalls = sc.Syscalls()
    # Not PR_SET_PDEATHSIG: it fires when the agent *thread* that started us ends, and
    # the agent's RPC threads come and go. The agent process itself is watched below.
    agent = -1 if outlive else os.pidfd_open(os.getppid())
    syscalls.unshare(flags)
    if hostname:
        syscalls.sethostname(hostname)
    # Nobody in the sandbox may open our /proc/<pid>/exe or fds.
    syscalls.prctl(sc.PR_SET_DUMPABLE, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    pid = os.fork()
    if pid == 0:
        syscalls.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(1)
        # Reap whatever gets reparented to us; a blocked SIGCHLD stays pending, so no
        # exit is missed between the last wait and sigwait.
        while True:
            while True:
                try:
                    reaped, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if reaped == 0:
                    break
            signal.sigwait([signal.SIGCHLD])
    os.write(1, f"{pid}\n".encode())
    os.close(1)
    holder = os.pidfd_open(pid)
    ready = select.select([holder] + ([agent] if agent >= 0 else []), [], [])[0]
    if holder not in ready:
        return 0  # the agent is gone: the holder dies with us (its PDEATHSIG)
    os.waitpid(pid, 0)
    return 0


# ===================================================================== OOM events


class OOMWatcher:
    """Turns cgroup OOM notifications into container ids for GetOOMEvent.

    v1: an eventfd registered on memory.oom_control through cgroup.event_control.
    v2: memory.events, whose changes wake poll() with POLLPRI.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # key fd -> (container id, cgroup, fds to close, poll events)
        self._sources: dict[int, tuple[str, Any, list[int], int]] = {}
        self._counts: dict[int, int] = {}
        self._events: collections.deque[str] = collections.deque(maxlen=MAX_OOM_EVENTS)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, container_id: str, cg: Any) -> None:
        if cg is None:
            return
        paths = cg.paths()
        try:
            if cg.version == 1:
                mem = paths.get("memory")
                if mem is None:
                    return
                ctl = os.open(os.path.join(mem, "memory.oom_control"),
                              os.O_RDONLY | os.O_CLOEXEC)
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    with open(os.path.join(mem, "cgroup.event_control"), "w") as f:
                        f.write(f"{efd} {ctl}")
                except OSError:
                    os.close(efd)
                    os.close(ctl)
                    raise
                source = (container_id, cg, [efd, ctl], select.POLLIN)
                key = efd
            else:
                fd = os.open(os.path.join(paths[""], "memory.events"),
                             os.O_RDONLY | os.O_CLOEXEC)
                source = (container_id, cg, [fd], select.POLLPRI)
                key = fd
        except (OSError, KeyError) as e:
            log.warning("event=oom_watch_unavailable container=%s error=%s", container_id, e)
            return
        with self._lock:
            self._sources[key] = source
            self._counts[key] = _oom_count(cg)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oom", daemon=True)
                self._thread.start()
        os.eventfd_write(self._wake, 1)

    def remove(self, container_id: str) -> None:
        with self._lock:
            for key, (cid, _, fds, _) in list(self._sources.items()):
                if cid == container_id:
                    del self._sources[key]
                    self._counts.pop(key, None)
                    for fd in fds:
                        os.close(fd)
        os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                poller = select.poll()
                poller.register(self._wake, select.POLLIN)
                for key, (_, _, _, ev) in self._sources.items():
                    poller.register(key, ev)
            ready = poller.poll()
            with self._lock:
                for fd, _ in ready:
                    if fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                        continue
                    src = self._sources.get(fd)
                    if src is None:
                        continue
                    cid, cg, _fds, ev = src
                    if ev == select.POLLIN:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                    now = _oom_count(cg)
                    before = self._counts.get(fd, 0)
                    self._counts[fd] = now
                    if ev == select.POLLIN:
                        # v1 signals when the OOM begins, before the kill is counted, and
                        # also when the cgroup is removed: only the first is an event.
                        oom = os.path.isdir(cg.paths().get("memory", ""))
                    else:
                        # Any change of memory.events wakes us: only a new kill counts.
                        oom = now > before
                    if oom:
                        log.warning("event=oom container=%s", cid)
                        self._events.append(cid)
                        self._lock.notify_all()

    def next_event(self, cancel: Canceller | None) -> str:
        """Block until a container had an OOM kill; its id."""
        if cancel is not None:
            def poke() -> None:
                with self._lock:
                    self._lock.notify_all()
            cancel.on_cancel(poke)
        with self._lock:
            while not self._events:
                if cancel is not None and cancel.is_set:
                    raise Cancelled("cancelled")
                self._lock.wait()
            return self._events.popleft()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        os.eventfd_write(self._wake, 1)


def _oom_count(cg: Any) -> int:
    try:
        return int(cg.oom_kill_count())
    except (OSError, EngineError):
        return 0


# ===================================================================== state


@dataclass(slots=True)
class ProcessEntry:
    exec_id: str
    pid: int
    watch: ExitWatch
    io: ProcessIO
    init: bool = False
    start_time: int = 0
    key: str = ""  # its stdio's name in the service manager's fd store ("": not stored)

    def release(self, keeper: Keeper | None = None) -> None:
        if keeper is not None and self.key:
            keeper.drop_stdio(self.key)
        self.io.close()
        self.watch.release()

    def to_json(self) -> dict[str, Any]:
        return {"exec_id": self.exec_id, "pid": self.pid, "start": self.start_time,
                "init": self.init, "key": self.key, "tty": self.io.terminal,
                "stdin_closed": self.io.stdin.closed}


@dataclass(slots=True)
class ContainerEntry:
    id: str
    init_exec_id: str
    storages: list[MountHandle] = field(default_factory=list)
    processes: dict[str, ProcessEntry] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False  # False while CreateContainer is still running

    @property
    def init(self) -> ProcessEntry:
        return self.processes[self.init_exec_id]


class Sandbox:
    """Every container operation of the agent; thread-safe."""

    def __init__(self, engine: Engine, storage: StorageManager, *, pipe_size: int = 0,
                 paths: SandboxPaths | None = None, syscalls: sc.Syscalls | None = None,
                 drain_grace: float = DRAIN_GRACE, policy: Policy | None = None,
                 keeper: Keeper | None = None) -> None:
        self.engine = engine
        self.keeper = keeper
        self.policy = policy or Policy.allow_all()
        self.storage = storage
        self.pipe_size = pipe_size
        self.paths = paths or SandboxPaths()
        self.syscalls = syscalls or sc.Syscalls()
        self.drain_grace = drain_grace
        self.reaper = Reaper()
        self.oom = OOMWatcher()
        self._lock = threading.RLock()
        self._containers: dict[str, ContainerEntry] = {}
        self.created = False
        self.sandbox_id = ""
        self.hostname = ""
        self._pause: PauseProcess | None = None
        self._sandbox_pidns = False
        self._storages: list[MountHandle] = []
        self._guest_hooks: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ sandbox

    def create_sandbox(self, req: SandboxRequest) -> None:
        with self._lock:
            if self.created:
                raise AlreadyExistsError("the sandbox exists already", field="sandbox")
            if req.sandbox_id:
                validate_id(req.sandbox_id, "sandbox_id")
            if len(req.hostname) > 64 or "\0" in req.hostname:
                raise SpecError("hostname longer than 64 bytes", field="hostname")
            hooks = self._load_guest_hooks(req.guest_hook_path)
            with contextlib.ExitStack() as undo:
                self._load_modules(req.kernel_modules)
                if req.hostname:
                    self.syscalls.sethostname(req.hostname)
                network.write_dns(Path(self.paths.resolv_conf), list(req.dns))
                handles: list[MountHandle] = []
                undo.callback(self._remove_storages, handles)
                for i, spec in enumerate(req.storages):
                    try:
                        handles.append(self.storage.add(spec))
                    except EngineError as e:
                        e.field = f"storages[{i}].{e.field}" if e.field else f"storages[{i}]"
                        raise
                pause = PauseProcess.start(new_pid=req.sandbox_pidns, hostname=req.hostname,
                                           outlive_agent=self.keeper is not None)
                undo.pop_all()
            self._pause = pause
            self._sandbox_pidns = req.sandbox_pidns
            self._storages = handles
            self._guest_hooks = hooks
            self.sandbox_id = req.sandbox_id
            self.hostname = req.hostname
            self.created = True
            self._persist()
        log.info("event=sandbox_created id=%s pidns=%s storages=%d", req.sandbox_id,
                 req.sandbox_pidns, len(handles))

    def destroy_sandbox(self) -> None:
        with self._lock:
            if not self.created:
                log.info("event=destroy_without_sandbox")
                return
            ids = list(self._containers)
        errors: list[EngineError] = []
        for cid in ids:
            try:
                self.remove_container(cid, timeout=0)
            except NotFoundError:
                pass
            except EngineError as e:
                log.error("event=remove_failed container=%s error=%s", cid, e)
                errors.append(e)
        with self._lock:
            try:
                self._remove_storages(self._storages)
            except EngineError as e:
                errors.append(e)
            if self._pause is not None:
                self._pause.stop()
                self._pause = None
            self._storages = []
            self._guest_hooks = {}
            self.sandbox_id = ""
            self.created = False
            self._persist()
        os.sync()
        if errors:
            raise errors[0]
        log.info("event=sandbox_destroyed")

    def close(self) -> None:
        """Agent shutdown: take everything down."""
        with contextlib.suppress(EngineError):
            self.destroy_sandbox()
        self.reaper.close()
        self.oom.close()

    def _remove_storages(self, handles: list[MountHandle]) -> None:
        first: EngineError | None = None
        for h in reversed(handles):
            try:
                self.storage.remove(h)
            except EngineError as e:
                log.error("event=storage_remove_failed mount_point=%s error=%s",
                          h.mount_point, e)
                first = first or e
        handles.clear()
        if first is not None:
            raise first

    def _load_modules(self, modules: Sequence[KernelModule]) -> None:
        if len(modules) > MAX_KERNEL_MODULES:
            raise SpecError(f"more than {MAX_KERNEL_MODULES} modules", field="kernel_modules")
        for i, m in enumerate(modules):
            if not _MODULE_RE.match(m.name):
                raise SpecError(f"invalid module name {m.name!r}",
                                field=f"kernel_modules[{i}].name")
            if len(m.parameters) > MAX_MODULE_PARAMS or any(
                    not p or len(p) > 1024 or any(c.isspace() or c == "\0" for c in p)
                    or p.startswith("-") for p in m.parameters):
                raise SpecError("invalid module parameters",
                                field=f"kernel_modules[{i}].parameters")
        for m in modules:
            try:
                out = subprocess.run(["modprobe", "--", m.name, *m.parameters],
                                     capture_output=True, timeout=60, check=False)
            except FileNotFoundError as e:
                raise HostError("modprobe is not installed in this guest",
                                errno=errno.ENOENT) from e
            except subprocess.TimeoutExpired as e:
                raise HostError(f"modprobe {m.name} timed out") from e
            if out.returncode != 0:
                raise HostError(f"modprobe {m.name} failed: "
                                f"{out.stderr.decode(errors='replace').strip()[:512]}")
            log.info("event=module_loaded name=%s", m.name)

    def _load_guest_hooks(self, path: str) -> dict[str, list[dict[str, Any]]]:
        """Executables in <path>/{prestart,poststart,poststop}, added to every container."""
        if not path:
            return {}
        if not os.path.isabs(path):
            raise SpecError("must be an absolute path", field="guest_hook_path")
        hooks: dict[str, list[dict[str, Any]]] = {}
        for phase in ("prestart", "poststart", "poststop"):
            d = os.path.join(path, phase)
            try:
                names = sorted(os.listdir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise HostError(f"cannot read guest hooks in {d}: {e.strerror}") from e
            found = []
            for name in names[:MAX_HOOKS_PER_PHASE]:
                p = os.path.join(d, name)
                if os.path.isfile(p) and os.access(p, os.X_OK):
                    found.append({"path": p, "args": [p, phase]})
            if found:
                hooks[phase] = found
        log.info("event=guest_hooks path=%s count=%d", path,
                 sum(len(v) for v in hooks.values()))
        return hooks

    # ------------------------------------------------------------------ lookups

    def _container(self, cid: str) -> ContainerEntry:
        validate_id(cid, "container_id")
        with self._lock:
            c = self._containers.get(cid)
        if c is None or not c.ready:
            raise NotFoundError(f"container {cid!r} does not exist", field="container_id")
        return c

    def process(self, cid: str, exec_id: str) -> ProcessEntry:
        c = self._container(cid)
        if exec_id:
            validate_id(exec_id, "exec_id")
        with self._lock:
            p = c.processes.get(exec_id or c.init_exec_id)
        if p is None:
            raise NotFoundError(f"process {exec_id!r} of {cid!r} does not exist",
                                field="exec_id")
        return p

    def container_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._containers)

    # ------------------------------------------------------------------ containers

    def create_container(self, req: ContainerRequest) -> None:
        cid = validate_id(req.container_id, "container_id")
        exec_id = validate_id(req.exec_id or cid, "exec_id")
        entry = ContainerEntry(id=cid, init_exec_id=exec_id)
        with self._lock:
            if not self.created:
                raise StateError("no sandbox: CreateSandbox first", field="sandbox")
            if cid in self._containers:
                raise AlreadyExistsError(f"container {cid!r} exists already",
                                         field="container_id")
            if len(self._containers) >= MAX_CONTAINERS:
                raise StateError(f"more than {MAX_CONTAINERS} containers")
            self._containers[cid] = entry  # reserves the id while we work
        try:
            with contextlib.ExitStack() as undo:
                undo.callback(self._remove_storages, entry.storages)
                for i, s in enumerate(req.storages):
                    try:
                        entry.storages.append(self.storage.add(s))
                    except EngineError as e:
                        e.field = f"storages[{i}].{e.field}" if e.field else f"storages[{i}]"
                        raise
                oci = self._container_oci(req)
                spec = Spec.from_oci(oci)
                if spec.process is None:
                    raise SpecError("is required", field="OCI.Process")
                proc = self._start_init(cid, exec_id, spec, undo)
                entry.processes[exec_id] = proc
                undo.pop_all()
        except BaseException:
            with self._lock:
                self._containers.pop(cid, None)
            raise
        cg = self.engine.open_cgroup(spec.linux.cgroups_path, cid, existing=True)
        self.oom.add(cid, cg)
        with self._lock:
            entry.ready = True
            self._persist()
        log.info("event=container_created container=%s exec_id=%s pid=%d", cid, exec_id,
                 proc.pid)

    def _container_oci(self, req: ContainerRequest) -> dict[str, Any]:
        oci = copy.deepcopy(dict(req.oci))
        cid = req.container_id
        if req.devices:
            from kata_agent.storage.devices import update_spec_devices

            resolved = [self.storage.resolve_device(d) for d in req.devices]
            update_spec_devices(oci, resolved)
        root = oci.get("root")
        if not isinstance(root, dict) or not root.get("path"):
            raise SpecError("is required", field="OCI.Root.Path")
        path = str(root["path"])
        if not os.path.isabs(path):
            path = os.path.join(self.paths.shared_dir, cid, path)
        real = os.path.realpath(path)
        # The host names the rootfs: it must be something mounted for the sandbox, not
        # an arbitrary guest directory such as /.
        if not any(real == r or real.startswith(r.rstrip("/") + "/")
                   for r in self.paths.rootfs_roots):
            raise SpecError(f"rootfs {path!r} is outside {', '.join(self.paths.rootfs_roots)}",
                            field="OCI.Root.Path")
        root["path"] = real
        process = oci.get("process")
        args = process.get("args") if isinstance(process, dict) else None
        self.policy.check_container([str(a) for a in args or ()], real)
        self._apply_namespaces(oci, req.sandbox_pidns)
        self._apply_guest_hooks(oci)
        return oci

    def _apply_namespaces(self, oci: dict[str, Any], sandbox_pidns: bool) -> None:
        """Namespace paths sent by the host mean nothing in the guest: IPC and UTS always
        join the sandbox's, PID joins the sandbox's with sandbox_pidns, else is new."""
        linux = oci.setdefault("linux", {})
        nss = [dict(n) for n in linux.get("namespaces", []) if isinstance(n, dict)]
        pause = self._pause
        if pause is None or not pause.alive():
            raise StateError("the sandbox's namespace holder is gone")
        shared_pid = sandbox_pidns or self._sandbox_pidns
        out: list[dict[str, Any]] = []
        for n in nss:
            t = n.get("type")
            if t in ("ipc", "uts", "pid"):
                continue
            n.pop("path", None)
            out.append(n)
        out.append({"type": "ipc", "path": pause.ns_path("ipc")})
        out.append({"type": "uts", "path": pause.ns_path("uts")})
        out.append({"type": "pid", "path": pause.ns_path("pid")} if shared_pid
                   else {"type": "pid"})
        linux["namespaces"] = out

    def _apply_guest_hooks(self, oci: dict[str, Any]) -> None:
        if not self._guest_hooks:
            return
        hooks = oci.setdefault("hooks", {})
        for phase, items in self._guest_hooks.items():
            hooks[phase] = [*hooks.get(phase, []), *items]

    def _stdio(self, terminal: bool) -> tuple[Stdio, Callable[[], ProcessIO], list[int]]:
        """The engine's Stdio plus a way to get our side once the process exists."""
        if terminal:
            got: list[int] = []
            stdio = Stdio(on_console=got.append)

            def tty_io() -> ProcessIO:
                if not got:
                    raise HostError("the terminal of the new process was not received")
                return ProcessIO.terminal_master(got[0])
            return stdio, tty_io, got
        io, child = ProcessIO.pipes(self.pipe_size)
        return Stdio(fds=child), lambda: io, list(child)

    def _start_init(self, cid: str, exec_id: str, spec: Spec,
                    undo: contextlib.ExitStack) -> ProcessEntry:
        assert spec.process is not None
        stdio, our_side, fds = self._stdio(spec.process.terminal)
        try:
            cstate = self.engine.create(cid, None, spec, stdio=stdio)
        except BaseException:
            for fd in fds:
                os.close(fd)
            if not spec.process.terminal:
                our_side().close()
            raise
        if not spec.process.terminal:
            for fd in fds:  # the process holds its own copies now
                os.close(fd)
        undo.callback(self.engine.delete, cid, True)
        io = our_side()
        watch = self.reaper.watch(cstate.pid)
        watch.on_exit(io.process_exited)
        return ProcessEntry(exec_id=exec_id, pid=cstate.pid, watch=watch, io=io, init=True,
                            start_time=cstate.pid_start_time, key=self._keep_stdio(io))

    def _keep_stdio(self, io: ProcessIO) -> str:
        """Hand the process's stdio to the service manager's fd store, so it survives an
        agent restart; returns the key it is stored under."""
        if self.keeper is None:
            return ""
        key = self.keeper.new_key()
        self.keeper.store_stdio(key, io.host_fds())
        return key

    def start_container(self, cid: str) -> None:
        c = self._container(cid)
        with c.lock:
            self.engine.start(cid)

    def remove_container(self, cid: str, timeout: int = 0) -> None:
        c = self._container(cid)
        with c.lock:
            init = c.processes.get(c.init_exec_id)
            with contextlib.suppress(EngineError):
                if self.engine.state(cid).status != STOPPED:
                    self.engine.kill(cid, signal.SIGKILL, all=True)
            if init is not None:
                try:
                    init.watch.wait(timeout=timeout or REMOVE_WAIT)
                except TimeoutError as e:
                    raise RemoveTimeout(f"container {cid!r} still running after "
                                        f"{timeout or REMOVE_WAIT}s",
                                        errno=errno.ETIMEDOUT) from e
            self.oom.remove(cid)
            self.engine.delete(cid, force=True)
            with self._lock:
                procs = list(c.processes.values())
                c.processes.clear()
                self._containers.pop(cid, None)
            for p in procs:
                p.release(self.keeper)
            try:
                self._remove_storages(c.storages)
            finally:
                with self._lock:
                    self._persist()
        log.info("event=container_removed container=%s", cid)

    def update_container(self, cid: str, resources: Mapping[str, Any]) -> None:
        self._container(cid)
        from kata_agent.engine.resources import LinuxResources  # loaded when first used

        self.engine.update(cid, LinuxResources.from_oci(resources))

    def pause_container(self, cid: str) -> None:
        self._container(cid)
        self.engine.pause(cid)

    def resume_container(self, cid: str) -> None:
        self._container(cid)
        self.engine.resume(cid)

    def stats_container(self, cid: str) -> tuple[Any, list[NetworkStats]]:
        c = self._container(cid)
        stats = self.engine.stats(cid)
        init = c.processes.get(c.init_exec_id)
        path = "/proc/net/dev"
        if init is not None and not init.watch.exited:
            path = f"/proc/{init.pid}/net/dev"
        try:
            with open(path) as f:
                net = parse_net_dev(f.read())
        except OSError as e:
            log.warning("event=net_stats_unreadable path=%s error=%s", path, e)
            net = []
        return stats, net

    def list_processes(self, cid: str, fmt: str, args: Sequence[str]) -> bytes:
        self._container(cid)
        if fmt not in ("table", "json"):
            raise SpecError(f"invalid format {fmt!r}: table or json", field="format")
        pids = self.engine.ps(cid)
        if fmt == "json":
            return json.dumps(pids).encode()
        if len(args) > MAX_PS_ARGS or any(not _PS_ARG_RE.match(a) for a in args):
            raise SpecError("invalid ps arguments", field="args")
        try:
            out = subprocess.run(["ps", *(args or ["-ef"])], capture_output=True, timeout=30,
                                 check=False)
        except FileNotFoundError as e:
            raise HostError("ps is not installed in this guest", errno=errno.ENOENT) from e
        except subprocess.TimeoutExpired as e:
            raise HostError("ps timed out") from e
        if out.returncode != 0:
            raise HostError(f"ps failed: {out.stderr.decode(errors='replace')[:512]}")
        return filter_ps(out.stdout[:MAX_PS_OUTPUT], set(pids))

    # ------------------------------------------------------------------ processes

    def exec_process(self, cid: str, exec_id: str, process_oci: Mapping[str, Any]) -> None:
        c = self._container(cid)
        validate_id(exec_id, "exec_id")
        proc = Process.from_oci(process_oci, "process")
        self.policy.check_exec(proc.args)
        with c.lock:
            with self._lock:
                if exec_id in c.processes:
                    raise AlreadyExistsError(f"process {exec_id!r} exists already",
                                             field="exec_id")
                if len(c.processes) >= MAX_PROCESSES:
                    raise StateError(f"more than {MAX_PROCESSES} processes in {cid!r}")
            stdio, our_side, fds = self._stdio(proc.terminal)
            try:
                pid = self.engine.exec_process(cid, proc, stdio=stdio)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                if not proc.terminal:
                    our_side().close()
                raise
            if not proc.terminal:
                for fd in fds:
                    os.close(fd)
            io = our_side()
            watch = self.reaper.watch(pid)
            watch.on_exit(io.process_exited)
            entry = ProcessEntry(exec_id=exec_id, pid=pid, watch=watch, io=io,
                                 start_time=sc_state.pid_start_time(pid) or 0,
                                 key=self._keep_stdio(io))
            with self._lock:
                c.processes[exec_id] = entry
                self._persist()
        log.info("event=exec container=%s exec_id=%s pid=%d", cid, exec_id, pid)

    def signal_process(self, cid: str, exec_id: str, sig: int) -> None:
        if not 1 <= sig <= 64:
            raise SpecError(f"invalid signal {sig}", field="signal")
        c = self._container(cid)
        if self.engine.state(cid).status == STOPPED:
            log.info("event=signal_discarded container=%s signal=%d reason=stopped", cid, sig)
            return
        if not exec_id:
            self.engine.kill(cid, sig, all=True)
            return
        p = self.process(cid, exec_id)
        if p.exec_id == c.init_exec_id and sig == signal.SIGTERM and \
                not signal_handled(p.pid, sig):
            # pid 1 of a PID namespace ignores signals it has no handler for; the host
            # means "stop", so it gets what would stop it.
            sig = signal.SIGKILL
        if not p.watch.send_signal(sig):
            log.info("event=signal_discarded container=%s exec_id=%s reason=exited", cid,
                     exec_id)

    def wait_process(self, cid: str, exec_id: str, cancel: Canceller | None) -> int:
        p = self.process(cid, exec_id)
        status = p.watch.wait(cancel)
        p.io.wait_drained(self.drain_grace, cancel)
        if not p.init:
            with self._lock:
                c = self._containers.get(cid)
                if c is not None and c.processes.get(p.exec_id) is p:
                    del c.processes[p.exec_id]
                self._persist()
            p.release(self.keeper)
        log.info("event=waited container=%s exec_id=%s status=%d", cid, p.exec_id, status)
        return status

    def close_stdin(self, cid: str, exec_id: str) -> None:
        p = self.process(cid, exec_id)
        p.io.stdin.close()
        if self.keeper is not None and p.key and not p.io.terminal:
            # The stored copy would keep the pipe open: the process would never see EOF.
            self.keeper.drop_stdio(p.key, ("stdin",))
            with self._lock:
                self._persist()

    # ------------------------------------------------------------------ restarts

    def _persist(self) -> None:
        """Write the journal (caller holds ``self._lock``); a failure is logged: the
        sandbox works on, it only would not survive a restart."""
        if self.keeper is None:
            return
        pause = self._pause
        doc: dict[str, Any] = {"sandbox": None, "containers": []}
        if self.created and pause is not None:
            doc["sandbox"] = {
                "id": self.sandbox_id, "hostname": self.hostname,
                "pidns": self._sandbox_pidns, "pause_pid": pause.pid,
                "pause_start": pause.start_time, "guest_hooks": self._guest_hooks,
                "storages": [_handle_json(h) for h in self._storages],
            }
            doc["storage"] = self.storage.snapshot()
            doc["containers"] = [
                {"id": c.id, "init": c.init_exec_id,
                 "storages": [_handle_json(h) for h in c.storages],
                 "processes": [p.to_json() for p in c.processes.values()]}
                for c in self._containers.values() if c.ready]
        try:
            self.keeper.save(doc)
        except OSError as e:
            log.error("event=journal_write_failed error=%s", e)

    def restore(self, fds: dict[str, list[int]]) -> None:
        """After an agent restart: take back the sandbox the journal describes, with the
        stdio fds the service manager passed in (``sdnotify.listen_fds``). Processes that
        ended while no agent ran are reported with status 255; fds nobody claims are
        closed and dropped from the store."""
        assert self.keeper is not None
        doc = self.keeper.load()
        sb = doc.get("sandbox") if doc else None
        try:
            if doc is not None and isinstance(sb, dict):
                with self._lock:
                    self._restore(doc, sb, fds)
                    self._persist()
        except (AttributeError, KeyError, TypeError, ValueError, EngineError, OSError) as e:
            log.error("event=restore_failed error=%s", e)
        for name, left in fds.items():
            for fd in left:
                os.close(fd)
            self.keeper.notifier.remove(name)
            log.warning("event=stored_fd_unclaimed name=%s", name)
        fds.clear()
        if doc is not None:
            self._delete_orphans()

    def _delete_orphans(self) -> None:
        """Containers the engine has state for but the journal does not name: a create that
        was under way when the previous agent died. Nothing can reach them any more, so
        they are deleted (process, cgroup, state) instead of leaking."""
        with self._lock:
            known = set(self._containers)
        for cid in list(self.engine.store.ids()):
            if cid in known:
                continue
            log.warning("event=restore_orphan_deleted container=%s", cid)
            try:
                self.engine.delete(cid, force=True)
            except EngineError as e:
                log.error("event=restore_orphan_delete_failed container=%s error=%s", cid, e)

    def _restore(self, doc: dict[str, Any], sb: dict[str, Any],
                 fds: dict[str, list[int]]) -> None:
        def take(key: str, kind: str) -> int:
            got = fds.pop(f"{key}.{kind}", []) if key else []
            for extra in got[1:]:
                os.close(extra)
            return got[0] if got else -1

        pause = PauseProcess.adopt(int(sb["pause_pid"]), int(sb["pause_start"]))
        if pause is None:
            log.error("event=restore_pause_gone pid=%s", sb["pause_pid"])
        self.storage.adopt(list(doc.get("storage") or []))
        self._pause = pause
        self._sandbox_pidns = bool(sb["pidns"])
        self.sandbox_id = str(sb["id"])
        self.hostname = str(sb["hostname"])
        self._guest_hooks = dict(sb.get("guest_hooks") or {})
        self._storages = [MountHandle(**h) for h in sb.get("storages", [])]
        self.created = True
        for c in doc.get("containers", []):
            cid = validate_id(c["id"], "container_id")
            entry = ContainerEntry(id=cid, init_exec_id=validate_id(c["init"], "exec_id"),
                                   storages=[MountHandle(**h) for h in c["storages"]],
                                   ready=True)
            for pj in c["processes"]:
                key = str(pj["key"])
                if pj["tty"]:
                    tty = take(key, "tty")
                    io = (ProcessIO.terminal_master(tty) if tty >= 0
                          else ProcessIO.from_fds(-1, -1, -1))
                else:
                    io = ProcessIO.from_fds(take(key, "stdin"), take(key, "stdout"),
                                            take(key, "stderr"))
                if pj.get("stdin_closed"):
                    io.stdin.close()
                watch = self.reaper.adopt(int(pj["pid"]), int(pj["start"]))
                watch.on_exit(io.process_exited)
                eid = validate_id(pj["exec_id"], "exec_id")
                entry.processes[eid] = ProcessEntry(
                    exec_id=eid, pid=int(pj["pid"]), watch=watch, io=io,
                    init=bool(pj["init"]), start_time=int(pj["start"]), key=key)
            self._containers[cid] = entry
            try:
                cstate = self.engine.state(cid)
                self.oom.add(cid, self.engine.open_cgroup(cstate.cgroups_path, cid,
                                                          existing=True))
            except EngineError as e:
                log.warning("event=restore_no_engine_state container=%s error=%s", cid, e)
            log.info("event=container_restored container=%s processes=%d", cid,
                     len(entry.processes))
        log.info("event=sandbox_restored id=%s containers=%d", self.sandbox_id,
                 len(self._containers))

    def set_container_cpus(self, cpus: str) -> None:
        """After CPU hotplug: let every container use the CPUs now online."""
        from kata_agent.engine.resources import LinuxResources

        for cid in self.container_ids():
            with contextlib.suppress(EngineError):
                self.engine.update(cid, LinuxResources.from_oci({"cpu": {"cpus": cpus}}))


def _handle_json(h: MountHandle) -> dict[str, str]:
    return {"mount_point": h.mount_point, "driver": h.driver, "source": h.source}


def signal_handled(pid: int, sig: int) -> bool:
    """Whether the process installed a handler for ``sig`` (SigCgt of /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split(":", 1)[1].strip(), 16) & (1 << (sig - 1)))
    except (OSError, ValueError):
        pass
    return False


def parse_net_dev(text: str) -> list[NetworkStats]:
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        f = rest.split()
        if not sep or len(f) < 16:
            continue
        try:
            n = [int(x) for x in f]
        except ValueError:
            continue
        out.append(NetworkStats(name=name.strip(), rx_bytes=n[0], rx_packets=n[1],
                                rx_errors=n[2], rx_dropped=n[3], tx_bytes=n[8],
                                tx_packets=n[9], tx_errors=n[10], tx_dropped=n[11]))
    return out


def filter_ps(output: bytes, pids: set[int]) -> bytes:
    """The header line and the lines whose PID column is one of ``pids``."""
    lines = output.decode(errors="replace").splitlines()
    if not lines:
        raise HostError("ps printed nothing")
    header = lines[0].split()
    if "PID" not in header:
        raise HostError("ps output has no PID column")
    col = header.index("PID")
    kept = [lines[0]]
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > col and fields[col].isdigit() and int(fields[col]) in pids:
            kept.append(line)
    return ("\n".join(kept) + "\n").encode()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "pause":
        sys.exit(pause_main(sys.argv[2:]))
    sys.exit(2)
