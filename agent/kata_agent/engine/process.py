"""Starting a container process: the launcher (runs in a single-threaded process: the
``kata-oci`` CLI or the zygote), the intermediate stage that joins/creates namespaces, and
the container init that sets up the rootfs and credentials and finally execs the workload.

Processes and messages::

    launcher --fork--> stage1: join ns by path, unshare user ns (launcher maps ids),
                               unshare the rest, --fork--> init (pid 1 of a new pid ns)
    launcher <-- {"type": "pid"} -- stage1 (exits)
    launcher <-- {"type": "console"} + pty master fd -- init   (terminal only)
    launcher <-- {"type": "ready"} | {"type": "error", ...} -- init

Errors raised in stage1 or init travel back as data and are re-raised by the launcher with
their type, errno and spec field.

Overwriting the engine from a container (CVE-2019-5736 class): until it execs the workload,
the container init is a fork of the launcher's Python interpreter, and a workload that
execs ``#!/proc/self/exe`` would re-run that interpreter inside the container. The launcher
therefore always runs from a sealed memfd copy of the interpreter (``reexec_sealed``: the
CLI re-execs itself, the zygote is exec'd that way): ``/proc/<pid>/exe`` of every process
we put in a container is that memfd, which F_SEAL_WRITE makes unwritable for everyone, so
no path or fd reaching the host's python binary ever exists in the container. On top, the
processes are non-dumpable until the workload exec, so other container processes cannot
open their /proc/<pid>/fd or /proc/<pid>/exe, and every fd above the ones asked for is
close-on-exec.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import termios
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from kata_agent import safe_path
from kata_agent.engine import errors, mounts, namespaces
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import EngineError, HostError, SpecError
from kata_agent.engine.sealed import SEALED_NAME as SEALED_NAME
from kata_agent.engine.sealed import reexec_sealed as reexec_sealed
from kata_agent.engine.sealed import running_sealed as running_sealed
from kata_agent.engine.sealed import sealed_interpreter_fd as sealed_interpreter_fd
from kata_agent.engine.spec import Process, Spec

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MSG_MAX = 1 << 20
# How long the launcher waits for each step of a container process (its rootfs setup,
# createContainer hooks...) before giving up on it and killing it.
LAUNCH_STEP_TIMEOUT = 120.0
TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431


# ---------------------------------------------------------------- requests and results

@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """Everything a launcher needs, as plain data (it crosses the zygote socket as JSON).

    ``fds`` given alongside, in this order: stdin, stdout, stderr (unless the process has a
    terminal), the exec-wait listening socket (create only), then ``preserve_fds`` fds that
    the workload gets as 3, 4, ...
    """

    kind: str  # "create" or "exec"
    container_id: str
    spec: Mapping[str, Any]
    process: Mapping[str, Any]
    rootfs: str = ""
    bundle: str = ""
    init_pid: int = 0
    cgroup_procs: tuple[str, ...] = ()
    cgroup_paths: Mapping[str, str] = field(default_factory=dict)
    cgroup_version: int = 0
    no_pivot: bool = False
    preserve_fds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LaunchRequest:
        kw = dict(d)
        kw["cgroup_procs"] = tuple(kw.get("cgroup_procs", ()))
        return cls(**kw)

    def fd_count(self, terminal: bool) -> int:
        return (0 if terminal else 3) + (1 if self.kind == "create" else 0) + self.preserve_fds


@dataclass(frozen=True, slots=True)
class LaunchResult:
    pid: int
    console_fd: int | None = None


def error_to_data(e: BaseException) -> dict[str, Any]:
    if isinstance(e, EngineError):
        return {"type": "error", "kind": type(e).__name__, "msg": e.msg, "errno": e.errno,
                "field": e.field}
    if isinstance(e, OSError):
        return {"type": "error", "kind": "HostError", "msg": str(e), "errno": e.errno or 0,
                "field": None}
    return {"type": "error", "kind": "EngineError", "msg": f"{type(e).__name__}: {e}",
            "errno": 0, "field": None}


def error_from_data(d: Mapping[str, Any]) -> EngineError:
    cls = getattr(errors, str(d.get("kind", "EngineError")), EngineError)
    if not (isinstance(cls, type) and issubclass(cls, EngineError)):
        cls = EngineError
    return cls(str(d.get("msg", "")), errno=int(d.get("errno") or 0), field=d.get("field"))


def send_msg(sock: socket.socket, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (SOCK_SEQPACKET keeps boundaries); None at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MSG_MAX, max(maxfds, 1))
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise HostError("malformed message from container process")
    return msg, fds


# ---------------------------------------------------------------- launcher side

def launch(req: LaunchRequest, fds: Sequence[int], syscalls: sc.Syscalls | None = None) \
        -> LaunchResult:
    """Start the container init (create) or a process in a running container (exec).

    Forks: the caller must be single-threaded. Returns once the process is ready (for
    create: blocked on the exec-wait socket until ``start``); the new process is our
    grandchild, reparented to the nearest subreaper once stage1 exits.
    """
    syscalls = syscalls or sc.Syscalls()
    spec = Spec.from_oci(req.spec)
    proc = Process.from_oci(req.process, "process")
    if len(fds) != req.fd_count(proc.terminal):
        raise EngineError(f"expected {req.fd_count(proc.terminal)} fds, got {len(fds)}")
    if req.kind == "create":
        plan = namespaces.NamespacePlan.for_create(spec.linux)
    else:
        plan = namespaces.NamespacePlan.for_exec(req.init_pid,
                                                  [n.type for n in spec.linux.namespaces])
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Keep the child's end above the fd numbers the workload's fds will take.
    child = _above(child, _first_free(req.preserve_fds))
    stage1 = os.fork()
    if stage1 == 0:  # ------------------------------------------------ stage1
        parent.close()
        code = 1
        try:
            _stage1(syscalls, req, spec, proc, plan, child, fds)
            code = 0
        except BaseException as e:
            _report(child, e)
        finally:
            os._exit(code)
    child.close()
    parent.settimeout(LAUNCH_STEP_TIMEOUT)
    init_pid = 0
    ready = False
    console: int | None = None
    try:
        for path in req.cgroup_procs:
            # Join the cgroup before anything is created, so every descendant is counted.
            with open(path, "w") as f:
                f.write(str(stage1))
        send_msg(parent, {"type": "go"})
        # stage1 ("pid") and init ("ready") write to the same socket: either may come first.
        while not (ready and init_pid):
            msg, got = recv_msg(parent, maxfds=1)
            if msg is None:
                raise HostError("container process exited before it was ready")
            t = msg.get("type")
            if t == "userns":
                namespaces.write_id_maps(stage1, spec.linux)
                send_msg(parent, {"type": "mapped"})
            elif t == "pid":
                init_pid = int(msg["pid"])
                _reap(stage1)
                stage1 = 0
            elif t == "console" and got:
                console = got[0]
            elif t == "ready":
                ready = True
            elif t == "error":
                raise error_from_data(msg)
            else:
                for fd in got:
                    os.close(fd)
                raise HostError(f"unexpected message {t!r} from container process")
    except TimeoutError as e:
        _kill_and_reap(init_pid, stage1, console)
        raise HostError(f"container process not ready after {LAUNCH_STEP_TIMEOUT:.0f}s") from e
    except BaseException:
        _kill_and_reap(init_pid, stage1, console)
        raise
    finally:
        parent.close()
    log.info("event=process_ready kind=%s container=%s pid=%d", req.kind, req.container_id,
             init_pid)
    return LaunchResult(pid=init_pid, console_fd=console)


def _kill_and_reap(init_pid: int, stage1: int, console: int | None) -> None:
    for pid in (init_pid, stage1):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
    if console is not None:
        os.close(console)


def _first_free(preserve_fds: int) -> int:
    """First fd number not taken by the workload's stdio and preserved fds."""
    return 3 + preserve_fds


def _above(sock: socket.socket, low: int) -> socket.socket:
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, low)
    sock.close()
    return socket.socket(fileno=fd)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _report(sock: socket.socket, e: BaseException) -> None:
    try:
        send_msg(sock, error_to_data(e))
    except OSError:
        # Past "ready" nobody listens any more: the workload's stderr is all we have.
        with contextlib.suppress(OSError):
            os.write(2, f"kata-oci: {e}\n".encode())


# ---------------------------------------------------------------- stage1

def _stage1(syscalls: sc.Syscalls, req: LaunchRequest, spec: Spec, proc: Process,
            plan: namespaces.NamespacePlan, sock: socket.socket, fds: Sequence[int]) -> None:
    msg, _ = recv_msg(sock)
    if msg is None or msg.get("type") != "go":
        raise HostError("launcher went away")
    if not plan.new_user and spec.linux.namespace("user") is None:
        # Nobody in the container may open our /proc/<pid>/{fd,exe,mem} before the exec.
        syscalls.prctl(sc.PR_SET_DUMPABLE, 0)
    namespaces.join(syscalls, namespaces.open_join_fds(plan))
    if plan.new_user:
        namespaces.unshare(syscalls, sc.CLONE_NEWUSER)
        send_msg(sock, {"type": "userns"})
        msg, _ = recv_msg(sock)
        if msg is None or msg.get("type") != "mapped":
            raise HostError("launcher did not map the user namespace")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    namespaces.unshare(syscalls, plan.new_flags)
    pid = os.fork()
    if pid == 0:  # ---------------------------------------------------- init
        code = 1
        try:
            _init(syscalls, req, spec, proc, plan, sock, fds)
        except BaseException as e:
            _report(sock, e)
        finally:
            os._exit(code)
    send_msg(sock, {"type": "pid", "pid": pid})


# ---------------------------------------------------------------- init

def _in_user_ns(spec: Spec) -> bool:
    return spec.linux.namespace("user") is not None


def _init(syscalls: sc.Syscalls, req: LaunchRequest, spec: Spec, proc: Process,
          plan: namespaces.NamespacePlan, sock: socket.socket, fds: Sequence[int]) -> NoReturn:
    os.setsid()
    stdio: Sequence[int] = () if proc.terminal else fds[:3]
    rest = fds[0 if proc.terminal else 3:]
    wait_fd = rest[0] if req.kind == "create" else -1
    if wait_fd >= 0:
        wait_fd = fcntl.fcntl(wait_fd, fcntl.F_DUPFD_CLOEXEC, _first_free(len(rest) - 1))
    preserved = rest[1:] if req.kind == "create" else rest
    console: tuple[int, int] | None = None
    # Our pid as the host sees it (the host's procfs is still mounted on /proc here).
    host_pid = int(os.readlink("/proc/self"))
    _set_oom_score_adj(syscalls, proc)
    # The host's procfs is still on /proc (create) or the container's is (exec).
    apply_lsm(syscalls, proc)
    if req.kind == "create":
        console = _setup_rootfs(syscalls, req, spec, proc, plan, host_pid)
    elif proc.terminal:
        console = open_pty("/", proc)
    if console is not None:
        master, slave = console
        send_msg(sock, {"type": "console"}, [master])
        os.close(master)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        stdio = (slave, slave, slave)
    _place_fds(syscalls, stdio, preserved, keep=[sock.fileno(), wait_fd])
    _chdir(proc)
    seccomp_prog = _compile_seccomp(spec)
    if seccomp_prog is not None and not proc.no_new_privileges:
        # Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, which the
        # credentials below may drop: load it now, as late as that allows.
        from kata_agent.engine import seccomp
        seccomp.load_filter(seccomp_prog)
        seccomp_prog = None
    _set_credentials(proc)
    if proc.no_new_privileges:
        syscalls.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    exe = find_executable(proc)
    _reset_signals()
    send_msg(sock, {"type": "ready"})
    sock.close()
    if wait_fd >= 0:
        _wait_for_start(wait_fd)
        _container_hooks(spec, req, "start_container", host_pid)
    if seccomp_prog is not None:
        from kata_agent.engine import seccomp
        seccomp.load_filter(seccomp_prog)  # last: nothing after it but the exec
    env = proc.env_map()
    try:
        os.execve(exe, list(proc.args), env)
    except OSError as e:
        os.write(2, f"kata-oci: exec {exe}: {e.strerror}\n".encode())
        os._exit(127 if e.errno == errno.ENOENT else 126)


def _container_hooks(spec: Spec, req: LaunchRequest, phase: str, host_pid: int) -> None:
    """createContainer (before the root switch) and startContainer (after ``start``, just
    before the exec) hooks run here, in the container's namespaces."""
    hooks_list = getattr(spec.hooks, phase, ()) if spec.hooks is not None else ()
    if not hooks_list:
        return
    from kata_agent.engine import hooks

    status = "created" if phase == "create_container" else "running"
    state = {"ociVersion": spec.oci_version or "1.0.2", "id": req.container_id,
             "status": status, "pid": host_pid, "bundle": req.bundle,
             "annotations": dict(spec.annotations)}
    hooks.run_hooks(hooks_list, state, phase=phase)


def _setup_rootfs(syscalls: sc.Syscalls, req: LaunchRequest, spec: Spec, proc: Process,
                  plan: namespaces.NamespacePlan, host_pid: int) -> tuple[int, int] | None:
    rootfs = req.rootfs
    user_ns = _in_user_ns(spec)
    mounts.prepare_root(syscalls, rootfs, spec.linux.rootfs_propagation)
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    console: tuple[int, int] | None = None
    try:
        mounts.mount_all(syscalls, root_fd, spec.mounts, cgroup_paths=req.cgroup_paths,
                         cgroup_version=req.cgroup_version, in_user_ns=user_ns)
        mounts.create_devices(syscalls, root_fd, spec.linux.devices,
                              defaults=mounts.needs_default_devices(spec.mounts),
                              in_user_ns=user_ns)
        if spec.hostname:
            syscalls.sethostname(spec.hostname)
        if spec.domainname:
            syscalls.setdomainname(spec.domainname)
        mounts.apply_sysctls(syscalls, root_fd, spec.linux.sysctl)
        if proc.terminal:
            console = open_pty(root_fd, proc)
        mounts.readonly_paths(syscalls, root_fd, spec.linux.readonly_paths)
        mounts.masked_paths(syscalls, root_fd, spec.linux.masked_paths)
        _container_hooks(spec, req, "create_container", host_pid)
        if spec.root.readonly:
            mounts.remount_root_readonly(syscalls, root_fd)
    finally:
        os.close(root_fd)
    mounts.switch_root(syscalls, rootfs, no_pivot=req.no_pivot)
    return console


def open_pty(root: int | str, proc: Process) -> tuple[int, int]:
    """A pty from the container's own devpts (through its /dev/ptmx), so the workload sees
    its terminal as /dev/pts/N of that instance. Returns (master, slave)."""
    master = safe_path.open_in_root(root, "/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        if proc.console_size is not None:
            h, w = proc.console_size
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", h, w, 0, 0))
        return master, int(slave)
    except BaseException:
        os.close(master)
        raise


def _set_oom_score_adj(syscalls: sc.Syscalls, proc: Process) -> None:
    if proc.oom_score_adj is None:
        return
    fd = mounts.open_verified_proc(syscalls, "/", "/proc/self/oom_score_adj", os.O_WRONLY)
    try:
        os.write(fd, str(proc.oom_score_adj).encode())
    finally:
        os.close(fd)


APPARMOR_ENABLED = "/sys/module/apparmor/parameters/enabled"
SELINUX_ENFORCE = "/sys/fs/selinux/enforce"


def lsm_supported(name: str) -> bool:
    if name == "apparmor":
        try:
            with open(APPARMOR_ENABLED) as f:
                return f.read().strip() == "Y"
        except OSError:
            return False
    return os.path.exists(SELINUX_ENFORCE)


def apply_lsm(syscalls: sc.Syscalls, proc: Process) -> None:
    """Label the coming exec with the AppArmor profile / SELinux label asked for; a clear
    error when the guest kernel lacks that security module (never silently unconfined)."""
    if proc.apparmor_profile:
        if not lsm_supported("apparmor"):
            raise SpecError("AppArmor is not enabled in this guest kernel",
                            field="process.apparmorProfile")
        _write_attr(syscalls, "/proc/self/attr/apparmor/exec",
                    f"exec {proc.apparmor_profile}", "process.apparmorProfile")
    if proc.selinux_label:
        if not lsm_supported("selinux"):
            raise SpecError("SELinux is not enabled in this guest kernel",
                            field="process.selinuxLabel")
        _write_attr(syscalls, "/proc/self/attr/exec", proc.selinux_label,
                    "process.selinuxLabel")


def _write_attr(syscalls: sc.Syscalls, path: str, value: str, field: str) -> None:
    try:
        fd = mounts.open_verified_proc(syscalls, "/", path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise SpecError(f"cannot set {value!r}: {e.strerror}", field=field,
                        errno=e.errno or 0) from e


def _place_fds(syscalls: sc.Syscalls, stdio: Sequence[int], preserved: Sequence[int],
               keep: Sequence[int]) -> None:
    """stdio to 0-2, preserved fds to 3..; every other fd is closed except ``keep`` (our
    sync sockets, close-on-exec), so the workload starts with exactly those and nothing
    of the host stays reachable through /proc/1/fd meanwhile."""
    wanted = [*stdio, *preserved]
    first = _first_free(len(preserved))
    # Move sources out of the way first: a source may sit on another's target number.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first) for fd in wanted]
    targets = ([0, 1, 2] if stdio else []) + list(range(3, first))
    for src, dst in zip(moved, targets, strict=True):
        os.dup2(src, dst, inheritable=True)
    for fd in moved:
        os.close(fd)
    lo = first
    for k in sorted(fd for fd in keep if fd >= first):
        if k > lo:
            _close_range(syscalls, lo, k - 1)
        lo = k + 1
    _close_range(syscalls, lo, 0x7FFFFFFF)


def _close_range(syscalls: sc.Syscalls, lo: int, hi: int) -> None:
    try:
        syscalls.close_range(lo, hi, 0)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        for name in os.listdir("/proc/self/fd"):
            if lo <= int(name) <= hi:
                with contextlib.suppress(OSError):
                    os.close(int(name))


def _chdir(proc: Process) -> None:
    # The cwd is resolved inside the container root: "..", or a symlink in the image,
    # must not leave a host directory as the workload's cwd.
    try:
        fd = safe_path.open_in_root("/", proc.cwd, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise SpecError(f"cannot use cwd {proc.cwd!r}: {e.strerror}", field="process.cwd",
                        errno=e.errno or 0) from e
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)


def _set_credentials(proc: Process) -> None:
    if proc.rlimits:
        from kata_agent.engine import rlimits
        rlimits.apply_rlimits(proc.rlimits)
    user = proc.user
    caps = proc.capabilities
    try:
        os.setgroups(list(user.additional_gids))
    except PermissionError:
        if user.additional_gids:
            raise
    if caps is not None:
        from kata_agent.engine import caps as capsmod
        capsmod.keep_caps_for_setuid()
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if caps is not None:
        capsmod.apply_capabilities(caps)
    os.umask(0o022 if user.umask is None else user.umask)


def find_executable(proc: Process) -> str:
    """Resolve args[0] like execvp would, with the container's PATH."""
    name = proc.args[0]
    if "/" in name:
        candidates = [name]
    else:
        path = proc.env_map().get("PATH", DEFAULT_PATH)
        candidates = [os.path.join(d or ".", name) for d in path.split(":")]
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if os.path.isdir(c) or not (st.st_mode & 0o111):
            continue
        if os.access(c, os.X_OK):
            return c
    raise SpecError(f"executable {name!r} not found in $PATH or not executable",
                    field="process.args[0]", errno=errno.ENOENT)


def _compile_seccomp(spec: Spec) -> bytes | None:
    if spec.linux.seccomp is None:
        return None
    from kata_agent.engine import seccomp
    prog: bytes = seccomp.compile_filter(spec.linux.seccomp)
    return prog


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals stay ignored across exec.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _wait_for_start(listen_fd: int) -> None:
    """Block until ``start`` connects to the exec-wait socket."""
    lsock = socket.socket(fileno=listen_fd)
    conn, _ = lsock.accept()
    try:
        conn.recv(1)
        conn.sendall(b"1")
    finally:
        conn.close()
        lsock.close()


def send_console(console_socket: str, master: int) -> None:
    """Hand the pty master to a ``--console-socket`` listener (what runc sends: the fd
    with its name as data)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(console_socket)
        s.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [master]).tobytes())])
    except OSError as e:
        raise HostError(f"console socket {console_socket!r}: {e.strerror}",
                        errno=e.errno or 0) from e
    finally:
        s.close()
