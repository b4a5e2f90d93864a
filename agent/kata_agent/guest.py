"""Guest operations: CPU and memory hotplug, entropy, clock, guest details, CopyFile.

Requests arrive as typed dataclasses (converted at the RPC edge). Sysfs and the shared
directory are constructor arguments so tests run against fake trees.

CopyFile is the one operation that writes host-chosen paths: every lookup below the
shared-containers directory goes through ``safe_path`` (RESOLVE_IN_ROOT semantics, so
``..`` and symlinks, absolute or relative, never leave that directory), the data goes
through an fd into a temporary file of the target's directory, and only a complete file is
renamed over the target, relative to the directory fd.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kata_agent import __version__, safe_path
from kata_agent.engine.errors import (
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
    StateError,
)

log = logging.getLogger(__name__)

DEFAULT_SHARED_DIR = Path("/run/kata-containers/shared/containers")
MAX_NB_CPUS = 8192  # the kernel's largest NR_CPUS
MAX_PROBE_ADDRESSES = 1024
MAX_RANDOM_BYTES = 1024 * 1024
MAX_COPY_FILE_SIZE = 256 * 1024 * 1024
MAX_COPY_CHUNK = 4 * 1024 * 1024  # the gRPC message limit; the runtime sends 1 MiB
MAX_PATH = 4096
MAX_NAME = 255
# Seconds that fit a 64-bit nanosecond count (clock_settime_ns).
MAX_EPOCH_SECONDS = (2**63 - 1) // 1_000_000_000 - 1
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)

_CPU_DIR = re.compile(r"^cpu([0-9]+)$")
_MEMORY_DIR = re.compile(r"^memory([0-9]+)$")

CpuHook = Callable[[str], None]
ClockSetter = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class OnlineCPUMemRequest:
    wait: bool
    nb_cpus: int
    cpu_only: bool


@dataclass(frozen=True, slots=True)
class GuestDetailsRequest:
    mem_block_size: bool
    mem_hotplug_probe: bool


@dataclass(frozen=True, slots=True)
class AgentDetails:
    version: str
    init_daemon: bool
    device_handlers: tuple[str, ...]
    storage_handlers: tuple[str, ...]
    supports_seccomp: bool


@dataclass(frozen=True, slots=True)
class GuestDetails:
    mem_block_size_bytes: int
    support_mem_hotplug_probe: bool
    agent_details: AgentDetails


@dataclass(frozen=True, slots=True)
class CopyFileRequest:
    path: str
    file_size: int
    file_mode: int
    dir_mode: int
    uid: int
    gid: int
    offset: int
    data: bytes = field(repr=False)


def _set_realtime_ns(ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, ns)


def _os_error(err: OSError, what: str) -> EngineError:
    """An OSError of a host-driven path operation as the engine error of its kind."""
    code = err.errno or 0
    msg = f"{what}: {err.strerror or err}"
    if code == errno.ENOENT:
        return NotFoundError(msg, errno=code)
    # ENXIO: a FIFO or socket where a regular file should be.
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EXDEV,
                errno.EINVAL, errno.ENXIO):
        return SpecError(msg, errno=code, field="path")
    return HostError(msg, errno=code)


class GuestOps:
    """Guest-wide operations; one instance per agent."""

    def __init__(
        self,
        *,
        sysfs: Path = Path("/sys"),
        shared_dir: Path = DEFAULT_SHARED_DIR,
        random_device: Path = Path("/dev/random"),
        device_handlers: Sequence[str] = (),
        storage_handlers: Sequence[str] = (),
        supports_seccomp: bool = False,
        set_clock_ns: ClockSetter = _set_realtime_ns,
        online_retry_interval: float = 0.1,
        online_max_tries: int = 100,
    ) -> None:
        self.sysfs = sysfs
        self.shared_dir = shared_dir
        self.random_device = random_device
        self.device_handlers = tuple(sorted(device_handlers))
        self.storage_handlers = tuple(sorted(storage_handlers))
        self.supports_seccomp = supports_seccomp
        self._set_clock_ns = set_clock_ns
        self.online_retry_interval = online_retry_interval
        self.online_max_tries = online_max_tries
        # Called with the guest's online CPU list (e.g. "0-3") after CPUs were onlined, so
        # the container engine can widen cpusets of running containers.
        self.cpu_hooks: list[CpuHook] = []
        self._online_lock = threading.Lock()
        self._copy_lock = threading.Lock()
        self._stopping = threading.Event()
        self._background: list[threading.Thread] = []

    # ------------------------------------------------------------------ CPU / memory

    @property
    def _cpu_dir(self) -> Path:
        return self.sysfs / "devices/system/cpu"

    @property
    def _memory_dir(self) -> Path:
        return self.sysfs / "devices/system/memory"

    def online_cpu_mem(self, req: OnlineCPUMemRequest) -> None:
        """Online ``nb_cpus`` offline CPUs and, unless ``cpu_only``, every offline memory
        block. With ``wait`` false the work runs in the background and errors are logged."""
        if req.nb_cpus == 0 and req.cpu_only:
            raise SpecError("nb_cpus must be greater than 0 when cpu_only is set",
                            field="nb_cpus")
        if not 0 <= req.nb_cpus <= MAX_NB_CPUS:
            raise SpecError(f"nb_cpus {req.nb_cpus} out of range 0..{MAX_NB_CPUS}",
                            field="nb_cpus")
        if req.wait:
            self._online(req)
            return
        thread = threading.Thread(target=self._online_logged, args=(req,),
                                  name="online-cpu-mem", daemon=True)
        self._background = [t for t in self._background if t.is_alive()] + [thread]
        thread.start()

    def wait_background(self, timeout: float) -> bool:
        """Wait for background onlining to finish; True when none is left running."""
        deadline = time.monotonic() + timeout
        for thread in list(self._background):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._background)

    def close(self) -> None:
        """Stop retry loops of background onlining (agent shutdown)."""
        self._stopping.set()

    def _online_logged(self, req: OnlineCPUMemRequest) -> None:
        try:
            self._online(req)
        except EngineError as err:
            log.error("online cpu/mem failed nb_cpus=%d error=%s", req.nb_cpus, err)
        except OSError as err:
            log.error("online cpu/mem failed nb_cpus=%d errno=%s error=%s", req.nb_cpus,
                      err.errno, err)

    def _online(self, req: OnlineCPUMemRequest) -> None:
        with self._online_lock:
            if req.nb_cpus > 0:
                self._online_cpus(req.nb_cpus)
            if not req.cpu_only:
                count = self._online_blocks(self._memory_dir, _MEMORY_DIR, None)
                log.info("memory blocks onlined count=%d", count)
            if req.nb_cpus > 0:
                online = self.online_cpus()
                for hook in list(self.cpu_hooks):
                    hook(online)

    def _online_cpus(self, wanted: int) -> None:
        count = 0
        # Hotplugged vCPUs show up in sysfs a little after the host reports them, hence
        # the retries (the 1.x agent: 100 tries, 100 ms apart).
        for _ in range(self.online_max_tries):
            count += self._online_blocks(self._cpu_dir, _CPU_DIR, wanted - count)
            if count >= wanted:
                log.info("cpus onlined count=%d", count)
                return
            if self._stopping.wait(self.online_retry_interval):
                break
        raise HostError(f"only {count} of {wanted} CPUs could be onlined")

    def _online_blocks(self, base: Path, pattern: re.Pattern[str], limit: int | None) -> int:
        """Write 1 to the ``online`` file of offline entries of ``base``; returns how many."""
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            raise StateError(f"{base} does not exist: hotplug not supported") from None
        entries = sorted(
            (int(m.group(1)), name) for name in names if (m := pattern.match(name))
        )
        count = 0
        for _, name in entries:
            if limit is not None and count >= limit:
                break
            target = _offline_switch(base / name)
            if target is None:
                continue
            path, value = target
            try:
                _write_existing(path, value)
            except OSError as err:
                # The 1.x agent carries on with the other entries; so do we.
                log.warning("online failed path=%s errno=%s", path, err.errno)
                continue
            count += 1
        return count

    def online_cpus(self) -> str:
        """The kernel's online CPU list, e.g. ``0-3``."""
        return (self._cpu_dir / "online").read_text().strip()

    def mem_hotplug_by_probe(self, addresses: Sequence[int]) -> None:
        if len(addresses) > MAX_PROBE_ADDRESSES:
            raise SpecError(f"{len(addresses)} addresses, at most {MAX_PROBE_ADDRESSES}",
                            field="memHotplugProbeAddr")
        for i, addr in enumerate(addresses):
            if not 0 <= addr < 1 << 64:
                raise SpecError(f"address {addr} out of range",
                                field=f"memHotplugProbeAddr[{i}]")
        probe = self._memory_dir / "probe"
        if not probe.exists():
            raise StateError("memory hotplug by probe is not supported by this kernel")
        for addr in addresses:
            try:
                _write_existing(probe, f"0x{addr:x}".encode())
            except OSError as err:
                raise HostError(f"probe memory at 0x{addr:x}: {err.strerror}",
                                errno=err.errno or 0) from err
            log.info("memory probed addr=0x%x", addr)

    # ------------------------------------------------------------------ entropy, clock

    def reseed_random_dev(self, data: bytes) -> None:
        if not data:
            raise SpecError("no entropy data", field="data")
        if len(data) > MAX_RANDOM_BYTES:
            raise SpecError(f"{len(data)} bytes of entropy, at most {MAX_RANDOM_BYTES}",
                            field="data")
        try:
            fd = os.open(self.random_device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            raise HostError(f"open {self.random_device}: {err.strerror}",
                            errno=err.errno or 0) from err
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                # Makes the kernel's CRNG use the new input now rather than later.
                fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as err:
            raise HostError(f"reseed {self.random_device}: {err.strerror}",
                            errno=err.errno or 0) from err
        finally:
            os.close(fd)
        log.info("random device reseeded bytes=%d", len(data))

    def set_guest_datetime(self, sec: int, usec: int) -> None:
        if not 0 <= sec <= MAX_EPOCH_SECONDS:
            raise SpecError(f"seconds {sec} out of range", field="Sec")
        if not 0 <= usec < 1_000_000:
            raise SpecError(f"microseconds {usec} out of range 0..999999", field="Usec")
        try:
            self._set_clock_ns(sec * 1_000_000_000 + usec * 1_000)
        except OSError as err:
            raise HostError(f"set guest time: {err.strerror}", errno=err.errno or 0) from err
        log.info("guest time set sec=%d usec=%d", sec, usec)

    # ------------------------------------------------------------------ details

    def guest_details(self, req: GuestDetailsRequest) -> GuestDetails:
        block_size = 0
        if req.mem_block_size:
            path = self._memory_dir / "block_size_bytes"
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                log.info("no memory hotplug in this kernel path=%s", path)
            else:
                try:
                    block_size = int(text, 16)
                except ValueError:
                    raise HostError(f"{path}: not a hex number: {text[:32]!r}") from None
        probe = False
        if req.mem_hotplug_probe:
            # With ACPI memory hotplug the kernel onlines memory itself; probing would
            # announce the same memory twice.
            probe = (self._memory_dir / "probe").exists() and not self._acpi_memory_hotplug()
        return GuestDetails(
            mem_block_size_bytes=block_size,
            support_mem_hotplug_probe=probe,
            agent_details=AgentDetails(
                version=__version__,
                init_daemon=os.getpid() == 1,
                device_handlers=self.device_handlers,
                storage_handlers=self.storage_handlers,
                supports_seccomp=self.supports_seccomp,
            ),
        )

    def _acpi_memory_hotplug(self) -> bool:
        try:
            text = (self.sysfs / "firmware/acpi/hotplug/memory/enabled").read_text()
        except OSError:
            return False
        return text.strip() == "1"

    # ------------------------------------------------------------------ CopyFile

    def _relative_target(self, path: str) -> list[str]:
        """The components of ``path`` below the shared directory, lexically checked."""
        if not path.startswith("/"):
            raise SpecError(f"path {path!r} is not absolute", field="path")
        if len(path) > MAX_PATH or "\0" in path:
            raise SpecError("path too long or contains NUL", field="path")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            # Refused outright: a lexical climb is never what a runtime sends.
            raise SpecError(f"path {path!r} contains '..'", field="path")
        if any(len(p.encode()) > MAX_NAME for p in parts):
            raise SpecError("a path component is too long", field="path")
        root = [p for p in str(self.shared_dir).split("/") if p not in ("", ".")]
        if parts[: len(root)] != root or len(parts) <= len(root):
            raise SpecError(f"path {path!r} is not below {self.shared_dir}", field="path")
        return parts[len(root):]

    def copy_file(self, req: CopyFileRequest) -> None:
        """Write one chunk of a file copied from the host; the last chunk installs it."""
        rel = self._relative_target(req.path)
        if not 0 <= req.file_size <= MAX_COPY_FILE_SIZE:
            raise SpecError(f"file_size {req.file_size} out of range 0..{MAX_COPY_FILE_SIZE}",
                            field="file_size")
        if len(req.data) > MAX_COPY_CHUNK:
            raise SpecError(f"chunk of {len(req.data)} bytes, at most {MAX_COPY_CHUNK}",
                            field="data")
        if req.offset < 0 or req.offset + len(req.data) > req.file_size:
            raise SpecError(f"offset {req.offset} + {len(req.data)} bytes exceeds file_size "
                            f"{req.file_size}", field="offset")
        for name, value in (("uid", req.uid), ("gid", req.gid)):
            if not -1 <= value < 1 << 31:
                raise SpecError(f"{name} {value} out of range", field=name)
        # Only permission bits: no setuid, setgid or sticky from the host.
        file_mode = req.file_mode & 0o777
        dir_mode = (req.dir_mode & 0o777) or 0o755
        last = req.offset + len(req.data) == req.file_size
        with self._copy_lock:
            self._copy_chunk(rel, req, file_mode, dir_mode, last)

    def _copy_chunk(self, rel: list[str], req: CopyFileRequest, file_mode: int, dir_mode: int,
                    last: bool) -> None:
        name = rel[-1]
        tmp = temp_name(name)
        try:
            self.shared_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            root = os.open(self.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise HostError(f"open shared directory {self.shared_dir}: {err.strerror}",
                            errno=err.errno or 0) from err
        try:
            try:
                parent = safe_path.mkdir_in_root(root, "/".join(rel[:-1]), dir_mode)
            except OSError as err:
                raise _os_error(err, "create parent directories") from err
            try:
                fd = self._open_temp(parent, tmp, fresh=req.offset == 0)
                try:
                    view = memoryview(req.data)
                    pos = req.offset
                    try:
                        while view:
                            n = os.pwrite(fd, view, pos)
                            view, pos = view[n:], pos + n
                    except OSError as err:  # ENOSPC, EIO: not the caller's fault
                        raise HostError(f"write {req.path}: {err.strerror}",
                                        errno=err.errno or 0) from err
                    if last:
                        self._install(fd, parent, tmp, name, req, file_mode)
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
        finally:
            os.close(root)
        log.debug("copy chunk path=%s offset=%d len=%d size=%d done=%s", req.path, req.offset,
                  len(req.data), req.file_size, last)

    @staticmethod
    def _open_temp(parent: int, tmp: str, *, fresh: bool) -> int:
        # O_NONBLOCK: a FIFO swapped in for the temp file must fail the open (ENXIO)
        # instead of waiting for a reader while the copy lock is held.
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if fresh:
                # A stale or planted temp file (a hard link to a file elsewhere) must never
                # receive data: remove the name and create our own file exclusively.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=parent)
            else:
                fd = os.open(tmp, flags, dir_fd=parent)
        except FileNotFoundError:
            raise StateError("no copy in progress for this path: the first chunk must have "
                             "offset 0") from None
        except OSError as err:
            # ELOOP here is a symlink swapped in for the temp file.
            raise _os_error(err, "open temporary file") from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            # A hard link would let the writes land in a file outside the shared directory.
            raise SpecError("temporary file was replaced by a link", field="path")
        os.set_blocking(fd, True)
        return fd

    @staticmethod
    def _install(fd: int, parent: int, tmp: str, name: str, req: CopyFileRequest,
                 file_mode: int) -> None:
        try:
            if os.fstat(fd).st_size != req.file_size:
                raise StateError(f"temporary file has {os.fstat(fd).st_size} bytes, "
                                 f"expected {req.file_size}")
            if req.uid != -1 or req.gid != -1:
                os.fchown(fd, req.uid, req.gid)
            os.fchmod(fd, file_mode)  # after chown, which may clear mode bits
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as err:
            raise _os_error(err, f"install {req.path}") from err
        log.info("file copied path=%s size=%d mode=%o uid=%d gid=%d", req.path, req.file_size,
                 file_mode, req.uid, req.gid)


def _offline_switch(entry: Path) -> tuple[Path, bytes] | None:
    """For an offline CPU or memory block: the file to write and what onlines it.

    ``online`` holds 0/1; memory blocks of kernels without it have ``state``
    (offline/online). None when the entry is online or cannot be switched (cpu0 on x86).
    """
    try:
        return (entry / "online", b"1") if (entry / "online").read_text().strip() == "0" \
            else None
    except FileNotFoundError:
        pass
    try:
        status = (entry / "state").read_text().strip()
    except FileNotFoundError:
        return None
    return (entry / "state", b"online") if status == "offline" else None


def temp_name(name: str) -> str:
    """The temporary file a copy of ``name`` is assembled in (same directory, fixed length
    so a 255-byte target name still leaves room)."""
    import hashlib  # loaded with the first CopyFile, not at start-up

    return ".copy-" + hashlib.sha256(name.encode()).hexdigest()[:24] + ".tmp"


def _write_existing(path: Path, data: bytes) -> None:
    """Write ``data`` to an existing file (sysfs attributes are never created)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
