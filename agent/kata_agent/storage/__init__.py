"""Storage for sandboxes and containers: the driver registry and reference-counted mounts.

Each ``Storage`` request names a driver; the driver turns it into a ``MountPlan`` (finding
and waiting for the device when there is one), and the manager mounts it once per mount
point, however many containers use it, unmounting when the last one lets go.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from dataclasses import dataclass, replace

from kata_agent import safe_path
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
)
from kata_agent.storage import (
    blk,
    blkccw,
    ephemeral,
    local,
    mmioblk,
    ninep,
    nvdimm,
    overlay,
    scsi,
    uevent,
    virtiofs,
)
from kata_agent.storage.base import Driver, DriverContext
from kata_agent.storage.devices import resolve_device, update_spec_devices
from kata_agent.storage.discovery import DeviceFinder
from kata_agent.storage.options import check_list, check_text, normalize_mount_point, root_of
from kata_agent.storage.spec import (
    DeviceSpec,
    MountHandle,
    MountPlan,
    ResolvedDevice,
    StorageSpec,
)

__all__ = [
    "DRIVERS",
    "DeviceSpec",
    "MountHandle",
    "ResolvedDevice",
    "StorageManager",
    "StorageSpec",
    "update_spec_devices",
]

log = logging.getLogger(__name__)

DEFAULT_ALLOWED_ROOTS = ("/run/kata-containers",)
MAX_MOUNTS = 1024

DRIVERS: dict[str, Driver] = {
    name: module.plan
    for module in (ninep, virtiofs, blk, blkccw, mmioblk, scsi, nvdimm, ephemeral, local,
                   overlay)
    for name in module.NAMES
}


@dataclass(slots=True)
class _Entry:
    driver: str
    source: str
    path: str  # resolved path of the mount point (for logs)
    mounted: bool
    created: bool
    # Teardown goes through the parent directory held open since the mount, never through
    # a path the host could have redirected with a symlink in the meantime.
    parent_fd: int = -1
    name: str = ""
    mnt_id: int = -1  # the mount made there, checked before unmounting
    users: int = 1


class StorageManager:
    """Mounts host-requested storage under the allowed roots, one mount per mount point."""

    def __init__(self, syscalls: sc.Syscalls, *, hotplug_timeout: float,
                 sys_root: str = "/sys", dev_root: str = "/dev",
                 allowed_roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS,
                 source_factory: uevent.SourceFactory = uevent.NetlinkUeventSource,
                 arch: str | None = None) -> None:
        if not allowed_roots or any(not r.startswith("/") for r in allowed_roots):
            raise ValueError("allowed_roots must be absolute paths")
        self._sys = syscalls
        self.finder = DeviceFinder(sys_root=sys_root, dev_root=dev_root,
                                   hotplug_timeout=hotplug_timeout,
                                   source_factory=source_factory, arch=arch)
        self.allowed_roots = tuple(os.path.normpath(r) for r in allowed_roots)
        self._ctx = DriverContext(finder=self.finder, allowed_roots=self.allowed_roots)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def handlers(self) -> list[str]:
        """Driver names this guest can serve (GetGuestDetails' storage_handlers)."""
        return sorted(n for n in DRIVERS if n != "blk-ccw" or self.finder.arch == "s390x")

    def users(self, mount_point: str) -> int:
        with self._lock:
            entry = self._entries.get(mount_point)
            return entry.users if entry else 0

    # -- add -----------------------------------------------------------------------------

    def add(self, spec: StorageSpec) -> MountHandle:
        driver = DRIVERS.get(spec.driver)
        if driver is None:
            raise SpecError(f"unknown storage driver {spec.driver!r}", field="driver")
        check_text(spec.source, "source")
        check_text(spec.fstype, "fstype")
        check_list(spec.options, "options")
        check_list(spec.driver_options, "driver_options")
        mount_point = normalize_mount_point(spec.mount_point)
        root, rel = root_of(mount_point, self.allowed_roots, "mount_point")
        if mount_point != spec.mount_point:
            spec = replace(spec, mount_point=mount_point)
        handle = MountHandle(mount_point=mount_point, driver=spec.driver, source=spec.source)
        if self._join(spec):
            return handle
        plan = driver(spec, self._ctx)
        try:
            with self._lock:
                if self._join_locked(spec):
                    return handle
                if len(self._entries) >= MAX_MOUNTS:
                    raise HostError(f"more than {MAX_MOUNTS} storage mounts", errno=errno.ENOSPC)
                self._entries[spec.mount_point] = self._apply(plan, root, rel, spec)
        finally:
            for fd in plan.hold_fds:
                os.close(fd)
        log.info("event=storage_added driver=%s source=%s mount_point=%s", spec.driver,
                 spec.source, spec.mount_point)
        return handle

    def _join(self, spec: StorageSpec) -> bool:
        with self._lock:
            return self._join_locked(spec)

    def _join_locked(self, spec: StorageSpec) -> bool:
        entry = self._entries.get(spec.mount_point)
        if entry is None:
            return False
        if (entry.driver, entry.source) != (spec.driver, spec.source):
            raise AlreadyExistsError(
                f"{spec.mount_point} already holds {entry.driver}:{entry.source}",
                errno=errno.EBUSY, field="mount_point")
        entry.users += 1
        log.debug("event=storage_shared mount_point=%s users=%d", spec.mount_point, entry.users)
        return True

    def _apply(self, plan: MountPlan, root: str, rel: str, spec: StorageSpec) -> _Entry:
        try:
            # The allowed roots are the agent's own configuration, not host input.
            os.makedirs(root, 0o755, exist_ok=True)
            created = not _exists_in_root(root, rel)
            fd = safe_path.mkdir_in_root(root, rel, 0o755)
        except OSError as e:
            raise HostError(f"cannot create mount point: {e.strerror}", errno=e.errno or 0,
                            field="mount_point") from e
        path = ""
        try:
            path = safe_path.fd_path(fd)
            proc = f"/proc/self/fd/{fd}"
            if not plan.mount:
                os.chmod(proc, plan.dir_mode)
                if plan.uid is not None or plan.gid is not None:
                    os.chown(proc, -1 if plan.uid is None else plan.uid,
                             -1 if plan.gid is None else plan.gid)
                    os.chmod(proc, plan.dir_mode)  # chown clears set-group-id
                return _held(_Entry(spec.driver, spec.source, path, mounted=False,
                                    created=created), fd)
            # Mount on the opened directory, not on a path a symlink could redirect.
            self._sys.mount(plan.source, proc, plan.fstype, plan.flags, plan.data or None)
            try:
                if plan.propagation:
                    self._sys.mount(None, path, None, plan.propagation)
                return _held(_Entry(spec.driver, spec.source, path, mounted=True,
                                    created=created), fd)
            except OSError:
                self._sys.umount2(path, sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)
                raise
        except OSError as e:
            if created:
                _remove_dir(path, tree=not plan.mount)
            raise HostError(f"cannot mount {spec.driver} {plan.source} on {spec.mount_point}: "
                            f"{e.strerror}", errno=e.errno or 0, field="mount_point") from e
        finally:
            os.close(fd)

    # -- remove --------------------------------------------------------------------------

    def remove(self, handle: MountHandle) -> None:
        with self._lock:
            entry = self._entries.get(handle.mount_point)
            if entry is None:
                raise NotFoundError(f"no storage at {handle.mount_point}", errno=errno.ENOENT,
                                    field="mount_point")
            if entry.users > 1:
                entry.users -= 1
                return
            # Forgotten even when the teardown fails: its fds are closed either way.
            del self._entries[handle.mount_point]
            self._teardown(entry)
        log.info("event=storage_removed driver=%s mount_point=%s", entry.driver,
                 handle.mount_point)

    def _teardown(self, entry: _Entry) -> None:
        try:
            if entry.mounted:
                self._unmount(entry)
            if entry.created:
                _remove_dir_at(entry.parent_fd, entry.name, tree=not entry.mounted)
        finally:
            os.close(entry.parent_fd)

    def _unmount(self, entry: _Entry) -> None:
        try:
            current = _mount_id(entry.parent_fd, entry.name)
        except OSError:
            current = -1
        if current != entry.mnt_id:
            # The mount point was moved or replaced (a symlink, another mount): unmounting
            # whatever is there now could take down a mount that is not ours.
            raise HostError(f"mount point {entry.path} was moved or replaced; not unmounting",
                            errno=errno.ESTALE, field="mount_point")
        target = f"/proc/self/fd/{entry.parent_fd}/{entry.name}"
        try:
            self._sys.umount2(target, sc.UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.EBUSY:
                log.warning("event=umount_busy path=%s action=detach", entry.path)
                self._sys.umount2(target, sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)
            elif e.errno != errno.EINVAL:
                raise HostError(f"cannot unmount {entry.path}: {e.strerror}",
                                errno=e.errno or 0) from e
            else:
                log.warning("event=umount_not_mounted path=%s", entry.path)

    def remove_all(self) -> None:
        """Unmount everything (sandbox teardown), whatever the user counts."""
        failed: list[EngineError] = []
        with self._lock:
            # Reverse order: a mount nested in another one goes first.
            for mount_point in sorted(self._entries, reverse=True):
                try:
                    self._teardown(self._entries.pop(mount_point))
                except EngineError as e:
                    log.error("event=storage_teardown_failed mount_point=%s error=%s",
                              mount_point, e)
                    failed.append(e)
        if failed:
            raise failed[0]

    # -- restart -------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """The mounts and their user counts, for the journal of an agent restart."""
        with self._lock:
            return [{"mount_point": mp, "driver": e.driver, "source": e.source,
                     "path": e.path, "mounted": e.mounted, "created": e.created,
                     "mnt_id": e.mnt_id, "users": e.users}
                    for mp, e in self._entries.items()]

    def adopt(self, saved: list[dict[str, object]]) -> None:
        """Take back the mounts a previous agent made (``snapshot``). Each mount point's
        parent is opened inside its allowed root again; one whose mount changed since is
        kept, and its teardown refuses to unmount what is there now."""
        for item in saved:
            try:
                mount_point = str(item["mount_point"])
                path = str(item["path"])
                root, rel = root_of(path, self.allowed_roots, "path")
                parent = safe_path.open_in_root(root, os.path.dirname(rel),
                                                os.O_PATH | os.O_DIRECTORY)
                entry = _Entry(str(item["driver"]), str(item["source"]), path,
                               mounted=bool(item["mounted"]), created=bool(item["created"]),
                               parent_fd=parent, name=os.path.basename(path),
                               mnt_id=int(str(item["mnt_id"])),
                               users=max(1, int(str(item["users"]))))
            except (KeyError, ValueError, OSError, EngineError) as e:
                log.error("event=storage_adopt_failed item=%s error=%s", item, e)
                continue
            if entry.mounted:
                try:
                    current = _mount_id(entry.parent_fd, entry.name)
                except OSError:
                    current = -1
                if current != entry.mnt_id:
                    log.warning("event=storage_mount_changed mount_point=%s", mount_point)
            with self._lock:
                old = self._entries.pop(mount_point, None)
                if old is not None:
                    os.close(old.parent_fd)
                self._entries[mount_point] = entry
            log.info("event=storage_adopted mount_point=%s users=%d", mount_point, entry.users)

    # -- devices -------------------------------------------------------------------------

    def resolve_device(self, spec: DeviceSpec) -> ResolvedDevice:
        return resolve_device(self.finder, spec)


def _exists_in_root(root: str, rel: str) -> bool:
    try:
        os.close(safe_path.open_in_root(root, rel, os.O_PATH))
    except FileNotFoundError:
        return False
    return True


def _held(entry: _Entry, fd: int) -> _Entry:
    """Hold the parent of the mount point directory `fd` (the real one, whatever symlinks
    led to it) and note the mount made there."""
    entry.parent_fd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    entry.name = os.path.basename(entry.path)
    try:
        if entry.mounted:
            entry.mnt_id = _mount_id(entry.parent_fd, entry.name)
    except OSError:
        os.close(entry.parent_fd)
        raise
    return entry


def _mount_id(parent_fd: int, name: str) -> int:
    """The id of the mount whose root (or inside which) `name` in `parent_fd` is."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


def _remove_dir_at(parent_fd: int, name: str, *, tree: bool) -> None:
    """Best effort: a directory we created goes away with the storage."""
    try:
        if tree:
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.rmdir(name, dir_fd=parent_fd)
    except OSError as e:
        log.warning("event=rmdir_failed name=%s error=%s", name, e)


def _remove_dir(path: str, *, tree: bool) -> None:
    """Best effort: a directory we created goes away with the storage."""
    if not path:
        return
    try:
        if tree:
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    except OSError as e:
        log.warning("event=rmdir_failed path=%s error=%s", path, e)
