"""Per-container state on disk (``<root>/<id>/state.json``) and the live status.

The state survives the process that wrote it, so ``state``/``kill``/``delete`` work from a
new CLI process. The init's pid is stored with its start time (field 22 of
/proc/<pid>/stat): a pid whose start time differs is a recycled pid, not our container.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kata_agent.engine.errors import AlreadyExistsError, HostError, NotFoundError
from kata_agent.engine.ids import validate_id

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
EXEC_SOCKET = "exec.sock"

CREATED = "created"
RUNNING = "running"
STOPPED = "stopped"
PAUSED = "paused"
CREATING = "creating"


@dataclass(frozen=True, slots=True)
class ContainerState:
    id: str
    pid: int
    pid_start_time: int
    bundle: str
    rootfs: str
    status: str
    created: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    cgroup_paths: Mapping[str, str] = field(default_factory=dict)
    cgroups_path: str = ""
    owner: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ContainerState:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def oci_state(self, oci_version: str = "1.0.2") -> dict[str, Any]:
        """The runtime-spec ``state`` document (what ``runc state`` prints, plus its
        extra fields rootfs/created/owner)."""
        return {
            "ociVersion": oci_version,
            "id": self.id,
            "pid": self.pid if self.status in (CREATED, RUNNING, PAUSED) else 0,
            "status": self.status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
            "annotations": dict(self.annotations),
        }


def now_rfc3339() -> str:
    """UTC now with microseconds, e.g. 2024-05-01T10:00:00.123456Z (no datetime import)."""
    sec, ns = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


def pid_start_time(pid: int) -> int | None:
    """Start time in clock ticks, or None when the pid is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rfind(b")") + 2:].split()
    # rest[0] is field 3 (state); the start time is field 22.
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def pid_alive(pid: int, start_time: int) -> bool:
    return pid > 0 and pid_start_time(pid) == start_time


class StateStore:
    """Directory of container state dirs. One dir per container, named by its id."""

    def __init__(self, root: str) -> None:
        self.root = root

    def dir(self, container_id: str) -> str:
        validate_id(container_id)  # the id names a directory: nothing path-like gets in
        return os.path.join(self.root, container_id)

    def reserve(self, container_id: str) -> str:
        """Create the container's dir; fails if the id is taken."""
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        d = self.dir(container_id)
        try:
            os.mkdir(d, 0o711)
        except FileExistsError as e:
            raise AlreadyExistsError(f"container {container_id!r} already exists",
                                     field="id") from e
        return d

    def save(self, st: ContainerState) -> None:
        d = self.dir(st.id)
        tmp = os.path.join(d, f".state-{os.urandom(6).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(st.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(d, STATE_FILE))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def load(self, container_id: str) -> ContainerState:
        path = os.path.join(self.dir(container_id), STATE_FILE)
        try:
            with open(path) as f:
                return ContainerState.from_json(json.load(f))
        except FileNotFoundError as e:
            raise NotFoundError(f"container {container_id!r} does not exist",
                                field="id") from e
        except (ValueError, TypeError) as e:
            raise HostError(f"state of {container_id!r} is corrupt: {e}") from e

    def ids(self) -> Iterator[str]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        for n in names:
            if os.path.exists(os.path.join(self.root, n, STATE_FILE)):
                yield n

    def remove(self, container_id: str) -> None:
        """Remove the container's dir. It holds only files the engine wrote (state.json,
        exec.sock), so no recursive walk is needed: each entry is unlinked through the
        dir's fd (a symlink is removed, never followed; the dir itself must not be one)."""
        d = self.dir(container_id)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(dfd):
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    import shutil  # not something the engine made: remove it all the same

                    shutil.rmtree(os.path.join(d, name))
        finally:
            os.close(dfd)
        os.rmdir(d)

    def exec_socket(self, container_id: str) -> str:
        return os.path.join(self.dir(container_id), EXEC_SOCKET)


def live_status(store: StateStore, st: ContainerState, *, frozen: bool = False) -> str:
    """created (init blocked before exec), running, paused or stopped, from the facts."""
    if not pid_alive(st.pid, st.pid_start_time):
        return STOPPED
    if frozen:
        return PAUSED
    if os.path.exists(store.exec_socket(st.id)):
        return CREATED
    return RUNNING


def has_hooks(config: Mapping[str, Any], key: str) -> bool:
    """Whether the recorded config.json has hooks for the OCI phase ``key`` ("poststart",
    "poststop"): the verbs that run them parse the spec only then."""
    doc = config.get("hooks")
    return isinstance(doc, Mapping) and bool(doc.get(key))


def with_status(st: ContainerState, status: str) -> ContainerState:
    return replace(st, status=status)
