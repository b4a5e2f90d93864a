"""The agent as the guest's init (PID 1): early mounts, orphan reaping, power-off on fatal error.

When the kernel starts the agent directly (``init=/usr/bin/kata-agent`` or ``rdinit=``) nothing
has mounted /proc, /sys, /dev, /run or the cgroup hierarchies, nobody reaps orphaned
processes, and returning from main would make the kernel panic. This module does what a
minimal init does:

* ``setup_pid1(syscalls)`` mounts the API filesystems in a fixed order, lays out cgroups
  (hybrid v1 + ``unified`` like the engine expects, or pure v2 with
  ``agent.unified_cgroup_hierarchy``), adds the /dev/fd symlinks and starts the reaper.
* ``reaper`` collects every exited child. Code that wants a child's status registers the pid
  and asks the reaper instead of calling ``waitpid`` itself, so the reaper never steals it.
  The agent's own launcher does not start it (``start_reaper=False``): the agent service
  waits on pidfds and through ``subprocess``, which a ``waitpid(-1)`` loop would pre-empt,
  and its zygote must be forked while the process has a single thread.
* ``poweroff(reason)`` syncs and powers the VM off instead of leaving a kernel panic loop.

All system calls go through ``InitSyscalls`` (ctypes ``mount``/``reboot`` plus a few ``os``
calls) so unit tests inject a recording fake.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_RELATIME = 0x200000
RB_POWER_OFF = 0x4321FEDC
ST_RDONLY = 1

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = "/sys/fs/cgroup"
# Statuses of children nobody registered yet (a fast exit can beat the registration).
UNCLAIMED_LIMIT = 4096


_setup_done = False


class InitError(Exception):
    """An essential step of init setup failed; the guest cannot serve."""


class InitSyscalls(Protocol):
    """The system calls init setup needs; a fake records them in unit tests."""

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None: ...
    def mkdir(self, path: str, mode: int) -> None: ...
    def symlink(self, target: str, link: str) -> None: ...
    def read_text(self, path: str) -> str: ...
    def is_readonly(self, path: str) -> bool: ...
    def sync(self) -> None: ...
    def reboot(self, command: int) -> None: ...
    def waitpid_any(self) -> tuple[int, int]: ...
    def getpid(self) -> int: ...


class LibcSyscalls:
    """The real layer: ctypes for mount(2) and reboot(2), ``os`` for the rest; raises OSError."""

    def __init__(self) -> None:
        # The libc already loaded: find_library would run ldconfig on every call.
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                     ctypes.c_ulong, ctypes.c_char_p]
        self._libc.reboot.argtypes = [ctypes.c_int]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        rc = self._libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                              data.encode() if data else None)
        self._check(rc, f"mount {fstype} on {target}")

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(path, mode)

    def symlink(self, target: str, link: str) -> None:
        os.symlink(target, link)

    def read_text(self, path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def is_readonly(self, path: str) -> bool:
        return bool(os.statvfs(path).f_flag & ST_RDONLY)

    def sync(self) -> None:
        os.sync()

    def reboot(self, command: int) -> None:
        self._check(self._libc.reboot(command), "reboot")

    def waitpid_any(self) -> tuple[int, int]:
        return os.waitpid(-1, 0)

    def getpid(self) -> int:
        return os.getpid()


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    fstype: str
    flags: int
    data: str = ""
    essential: bool = True  # failure powers the guest off; otherwise a warning


def is_pid1(syscalls: InitSyscalls | None = None) -> bool:
    return (syscalls.getpid() if syscalls is not None else os.getpid()) == 1


def base_mounts() -> list[Mount]:
    """API filesystems, in mount order (each target's parent is mounted before it)."""
    nosuid_nodev_noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC
    return [
        Mount("proc", "/proc", "proc", nosuid_nodev_noexec | MS_RELATIME),
        Mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec | MS_RELATIME),
        Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_RELATIME, "mode=0755"),
        Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC | MS_RELATIME,
              "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        Mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=1777"),
        Mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=0755"),
    ]


def v1_controllers(proc_cgroups: str) -> list[str]:
    """Enabled controllers from /proc/cgroups ("name hierarchy num_cgroups enabled")."""
    names: list[str] = []
    for line in proc_cgroups.splitlines():
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) >= 4 and fields[3] == "1":
            names.append(fields[0])
    return names


def cgroup_mounts(unified: bool, controllers: list[str]) -> list[Mount]:
    """Pure v2 at /sys/fs/cgroup, or hybrid: one v1 hierarchy per controller plus ``unified``."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME
    if unified:
        return [Mount("cgroup2", CGROUP_ROOT, "cgroup2", flags, "nsdelegate")]
    mounts = [Mount("tmpfs", CGROUP_ROOT, "tmpfs", flags, "mode=0755")]
    for name in controllers:
        mounts.append(Mount("cgroup", f"{CGROUP_ROOT}/{name}", "cgroup", flags, name,
                            essential=False))
    mounts.append(Mount("cgroup2", f"{CGROUP_ROOT}/unified", "cgroup2", flags, "",
                        essential=False))
    return mounts


DEV_SYMLINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
)


def mounted_targets(mountinfo: str) -> set[str]:
    """Mount points listed in /proc/self/mountinfo (field 5)."""
    targets: set[str] = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            targets.add(fields[4].replace("\\040", " "))
    return targets


def _mkdir(syscalls: InitSyscalls, path: str) -> None:
    with contextlib.suppress(FileExistsError):
        syscalls.mkdir(path, 0o755)


def do_mount(syscalls: InitSyscalls, m: Mount, already: set[str]) -> None:
    if m.target in already:
        log.debug("init mount skipped target=%s reason=already-mounted", m.target)
        return
    _mkdir(syscalls, m.target)
    try:
        syscalls.mount(m.source, m.target, m.fstype, m.flags, m.data)
    except OSError as err:
        if m.essential:
            raise InitError(f"mount {m.fstype} on {m.target}: {err}") from err
        log.warning("init mount failed target=%s fstype=%s error=%s", m.target, m.fstype, err)
        return
    already.add(m.target)
    log.debug("init mounted target=%s fstype=%s", m.target, m.fstype)


def unified_from_cmdline(cmdline: str) -> bool:
    from kata_agent import config  # only the command line parser; no engine imports

    return bool(config.from_cmdline(cmdline).unified_cgroup_hierarchy)


def setup_pid1(syscalls: InitSyscalls | None = None, *, unified_cgroups: bool | None = None,
               start_reaper: bool = True) -> None:
    """Make a bare kernel environment usable; power off if that is impossible."""
    global _setup_done
    sc = syscalls if syscalls is not None else LibcSyscalls()
    if syscalls is None and _setup_done:
        return  # the launcher and the agent's main may both ask; mount once
    try:
        _setup(sc, unified_cgroups)
    except (InitError, OSError) as err:
        poweroff(f"init setup failed: {err}", sc)
    if syscalls is None:
        _setup_done = True
    if start_reaper:
        reaper.start(sc)


def _setup(sc: InitSyscalls, unified_cgroups: bool | None) -> None:
    os.environ.setdefault("PATH", DEFAULT_PATH)
    already: set[str] = set()
    for m in base_mounts():
        do_mount(sc, m, already)
        if m.target == "/proc":
            # The kernel may have mounted some already (devtmpfs on a disk root).
            already |= mounted_targets(sc.read_text("/proc/self/mountinfo")) - {"/"}
    if sc.is_readonly("/"):
        # A read-only (DAX) root still needs a writable /tmp.
        do_mount(sc, Mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"), already)
    if unified_cgroups is None:
        unified_cgroups = unified_from_cmdline(sc.read_text("/proc/cmdline"))
    controllers = [] if unified_cgroups else v1_controllers(sc.read_text("/proc/cgroups"))
    for m in cgroup_mounts(unified_cgroups, controllers):
        do_mount(sc, m, already)
    for target, link in DEV_SYMLINKS:
        with contextlib.suppress(FileExistsError):
            sc.symlink(target, link)
    log.info("init setup done cgroups=%s controllers=%d",
             "v2" if unified_cgroups else "hybrid", len(controllers))


def poweroff(reason: str, syscalls: InitSyscalls | None = None) -> NoReturn:
    """Sync and power off; as PID 1 this never returns (exiting would panic the kernel)."""
    sc = syscalls if syscalls is not None else LibcSyscalls()
    log.critical("powering off reason=%s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sc.sync()
    try:
        sc.reboot(RB_POWER_OFF)
    except OSError as err:
        log.critical("reboot(POWER_OFF) failed error=%s", err)
    raise SystemExit(1)


def run_as_init(main: Callable[[], int], syscalls: InitSyscalls | None = None) -> NoReturn:
    """Run the agent's main as PID 1: any return or exception ends in a power-off."""
    try:
        rc = main()
        reason = f"agent exited status={rc}"
    except BaseException as err:  # PID 1 must never unwind into the kernel
        log.exception("agent failed as init")
        reason = f"agent failed: {type(err).__name__}: {err}"
    poweroff(reason, syscalls)


class Reaper:
    """Collects every exited child; registered pids keep their status for their owner.

    A background thread blocks in ``waitpid(-1)``; it is woken by SIGCHLD (orphans handed
    to PID 1) or by ``register``. Owners call ``register(pid)`` right after fork and
    ``wait(pid)`` instead of ``os.waitpid``. A status that arrives before the registration
    is kept (bounded), so a very short-lived child is not lost.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._registered: set[int] = set()
        self._statuses: dict[int, int] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._thread: threading.Thread | None = None
        self._syscalls: InitSyscalls | None = None
        self.reaped_orphans = 0

    def start(self, syscalls: InitSyscalls | None = None) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._syscalls = syscalls if syscalls is not None else LibcSyscalls()
            self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, lambda _s, _f: self._wake.set())
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def register(self, pid: int) -> None:
        with self._cond:
            if pid in self._unclaimed:
                self._statuses[pid] = self._unclaimed.pop(pid)
                self._cond.notify_all()
            self._registered.add(pid)
        self._wake.set()

    def unregister(self, pid: int) -> None:
        with self._cond:
            self._registered.discard(pid)
            self._statuses.pop(pid, None)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """The raw wait status of a registered pid, or None on timeout."""
        with self._cond:
            if pid not in self._registered:
                raise ValueError(f"pid {pid} is not registered with the reaper")
            if not self._cond.wait_for(lambda: pid in self._statuses, timeout):
                return None
            self._registered.discard(pid)
            return self._statuses.pop(pid)

    def record(self, pid: int, status: int) -> None:
        """File one reaped child: for its owner, or as unclaimed/orphan."""
        with self._cond:
            if pid in self._registered:
                self._statuses[pid] = status
                self._cond.notify_all()
                return
            self._unclaimed[pid] = status
            while len(self._unclaimed) > UNCLAIMED_LIMIT:
                self._unclaimed.popitem(last=False)
            self.reaped_orphans += 1
        log.debug("reaped unregistered child pid=%d status=%d", pid, status)

    def reap_once(self) -> bool:
        """Block for one child; False when there are no children at all."""
        assert self._syscalls is not None
        try:
            pid, status = self._syscalls.waitpid_any()
        except ChildProcessError:
            return False
        except InterruptedError:
            return True
        self.record(pid, status)
        return True

    def _loop(self) -> None:
        while True:
            try:
                if not self.reap_once():
                    self._wake.wait()
                    self._wake.clear()
            except OSError as err:
                if err.errno != errno.EINTR:
                    log.error("reaper waitpid failed error=%s", err)
                    self._wake.wait(1.0)
                    self._wake.clear()


reaper = Reaper()
