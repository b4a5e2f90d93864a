"""What the v1 and v2 cgroup backends share: the interface, path rules and file access."""

from __future__ import annotations

import abc
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..errors import HostError, SpecError
from ..ids import validate_id
from ..resources import LinuxResources

if TYPE_CHECKING:
    from .stats import CgroupStats

log = logging.getLogger(__name__)

_SYSTEMD_PART = re.compile(r"^[A-Za-z0-9_.@+-]*$")

FREEZE_TIMEOUT = 10.0
DESTROY_TIMEOUT = 5.0
POLL_INTERVAL = 0.01


def _systemd_to_path(cgroups_path: str) -> str:
    """"slice:prefix:name" (the systemd driver's notation) -> a cgroupfs path."""
    parts = cgroups_path.split(":")
    if len(parts) != 3 or not all(_SYSTEMD_PART.match(p) for p in parts):
        raise SpecError(f"invalid systemd cgroup path {cgroups_path!r}", field="linux.cgroupsPath")
    slice_, prefix, name = parts
    slice_ = slice_ or "system.slice"
    if not slice_.endswith(".slice") or not name:
        raise SpecError(f"invalid systemd cgroup path {cgroups_path!r}", field="linux.cgroupsPath")
    # "a-b-c.slice" lives in "a.slice/a-b.slice/a-b-c.slice".
    words = slice_[: -len(".slice")].split("-")
    dirs = ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return "/" + "/".join([*dirs, unit])


def container_path(cgroups_path: str, container_id: str) -> str:
    """The cgroup path of a container, relative to each hierarchy's root, as "/a/b"."""
    # The id becomes a directory name: it must be a single safe component.
    validate_id(container_id, "id")
    if "\0" in cgroups_path:
        raise SpecError("NUL byte in cgroups path", field="linux.cgroupsPath")
    if not cgroups_path:
        path = f"/kata/{container_id}"
    elif ":" in cgroups_path:
        path = _systemd_to_path(cgroups_path)
    elif not cgroups_path.startswith("/"):
        path = f"/kata/{cgroups_path}"
    else:
        path = cgroups_path
    parts = [p for p in path.split("/") if p]
    # No component may climb out of the hierarchy root.
    if not parts or any(p in (".", "..") or len(p) > 255 for p in parts):
        raise SpecError(f"cgroups path {cgroups_path!r} escapes the hierarchy",
                        field="linux.cgroupsPath")
    return "/" + "/".join(parts)


def write_file(directory: str, name: str, value: str) -> None:
    path = os.path.join(directory, name)
    try:
        # No O_CREAT: cgroup files exist or the controller lacks the knob.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise HostError(f"open {path}: {e.strerror}", errno=e.errno or 0) from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise HostError(f"write {path} = {value!r}: {e.strerror}", errno=e.errno or 0) from e
    finally:
        os.close(fd)
    log.debug("cgroup write path=%s value=%r", path, value)


def read_file(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise HostError(f"open {path}: {e.strerror}", errno=e.errno or 0) from e
    try:
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode(errors="replace")
    except OSError as e:
        raise HostError(f"read {path}: {e.strerror}", errno=e.errno or 0) from e
    finally:
        os.close(fd)


def read_optional(directory: str, name: str) -> str | None:
    """The file's text, or None when the kernel does not provide that file."""
    try:
        return read_file(directory, name)
    except HostError as e:
        if e.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV):
            return None
        raise


def read_pids(directory: str) -> list[int]:
    text = read_optional(directory, "cgroup.procs")
    if text is None:
        return []
    return sorted({int(x) for x in text.split()})


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               nudge: Callable[[], None] | None = None) -> None:
    """Poll ``cond`` until true; ``nudge`` is re-run every 100 ms (freezer retries)."""
    deadline = time.monotonic() + timeout
    last_nudge = time.monotonic()
    while not cond():
        now = time.monotonic()
        if now > deadline:
            raise HostError(f"timed out waiting for {what}", errno=errno.ETIMEDOUT)
        if nudge is not None and now - last_nudge > 0.1:
            nudge()
            last_nudge = now
        time.sleep(POLL_INTERVAL)


def remove_tree(directory: str, timeout: float = DESTROY_TIMEOUT) -> None:
    """rmdir a cgroup and its child cgroups, deepest first, retrying while tasks drain."""
    if not os.path.isdir(directory):
        return
    children = [
        os.path.join(root, d)
        for root, dirs, _ in os.walk(directory, topdown=False)
        for d in dirs
    ]
    for d in [*children, directory]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(f"rmdir {d}: {e.strerror}", errno=e.errno or 0) from e
                time.sleep(POLL_INTERVAL)


class Cgroup(abc.ABC):
    """One container's cgroup, on every hierarchy it lives in."""

    version: int

    @abc.abstractmethod
    def create(self) -> None:
        """Make the directories and install the default device policy."""

    @abc.abstractmethod
    def apply(self, res: LinuxResources) -> None:
        """Write the limits (at create time and on update)."""

    @abc.abstractmethod
    def add_process(self, pid: int) -> None: ...

    @abc.abstractmethod
    def procs(self) -> list[int]: ...

    @abc.abstractmethod
    def freeze(self) -> None: ...

    @abc.abstractmethod
    def thaw(self) -> None: ...

    @abc.abstractmethod
    def is_frozen(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def oom_kill_count(self) -> int: ...

    @abc.abstractmethod
    def kill_all(self, sig: int) -> None: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...

    @abc.abstractmethod
    def paths(self) -> Mapping[str, str]: ...

    def _signal_frozen(self, sig: int) -> None:
        """Freeze, signal every task, thaw: no task can fork away in between. A paused
        container stays paused, except for SIGKILL, which frozen tasks act on only once
        thawed."""
        was_frozen = self.is_frozen()
        self.freeze()
        try:
            for pid in self.procs():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
        finally:
            if not was_frozen or sig == signal.SIGKILL:
                self.thaw()


def sys_write_best_effort(directory: str, name: str, value: str, why: str) -> None:
    """For deprecated knobs the kernel may refuse (kmem limits, use_hierarchy)."""
    try:
        write_file(directory, name, value)
    except HostError as e:
        log.warning("cgroup knob ignored file=%s value=%s reason=%s error=%s",
                    name, value, why, e)
