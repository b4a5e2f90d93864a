"""The container's root filesystem: spec mounts, devices, masked and read-only paths,
sysctls, and the switch of root (pivot_root, or MS_MOVE + chroot on an initramfs).

Runs in the container init, inside its new mount namespace, before the root switch. Every
target inside the rootfs is opened with safe_path (the rootfs is container-controlled: a
symlink there must not lead a mount onto a host path) and mounted onto through the opened
fd's /proc/self/fd/N name, so the path cannot be swapped between the check and the mount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kata_agent import safe_path
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.spec import Device, Mount, sysctl_path

log = logging.getLogger(__name__)

PROC_SUPER_MAGIC = 0x9FA0

# Mount option words (mount(8) names) and the flags they set or clear; storage mounts
# parse their options with the same tables.
SET_FLAGS = {
    "ro": sc.MS_RDONLY, "nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC,
    "sync": sc.MS_SYNCHRONOUS, "dirsync": sc.MS_DIRSYNC, "mand": sc.MS_MANDLOCK,
    "noatime": sc.MS_NOATIME, "nodiratime": sc.MS_NODIRATIME, "relatime": sc.MS_RELATIME,
    "strictatime": sc.MS_STRICTATIME, "remount": sc.MS_REMOUNT, "bind": sc.MS_BIND,
    "rbind": sc.MS_BIND | sc.MS_REC, "nosymfollow": sc.MS_NOSYMFOLLOW, "lazytime": sc.MS_LAZYTIME,
}
CLEAR_FLAGS = {
    "rw": sc.MS_RDONLY, "suid": sc.MS_NOSUID, "dev": sc.MS_NODEV, "exec": sc.MS_NOEXEC,
    "async": sc.MS_SYNCHRONOUS, "nomand": sc.MS_MANDLOCK, "atime": sc.MS_NOATIME,
    "diratime": sc.MS_NODIRATIME, "norelatime": sc.MS_RELATIME,
    "nostrictatime": sc.MS_STRICTATIME, "defaults": 0,
}
PROPAGATION = {
    "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE, "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}
# Flags a bind remount must keep, or the kernel refuses it inside a user namespace.
_LOCKED = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
_ST_FLAGS = {os.ST_RDONLY: sc.MS_RDONLY, os.ST_NOSUID: sc.MS_NOSUID, os.ST_NODEV: sc.MS_NODEV,
             os.ST_NOEXEC: sc.MS_NOEXEC}

# Files under /proc a bind mount may cover (what lxcfs-style setups need); anything else
# over /proc could hide the masking of sensitive files or fake procfs for our own checks.
PROC_BIND_ALLOWED = frozenset({
    "/proc/cpuinfo", "/proc/diskstats", "/proc/meminfo", "/proc/stat", "/proc/swaps",
    "/proc/uptime", "/proc/loadavg", "/proc/slabinfo", "/proc/net/dev",
    "/proc/sys/kernel/ns_last_pid",
})

DEFAULT_DEVICES = (
    Device("/dev/null", "c", 1, 3), Device("/dev/zero", "c", 1, 5),
    Device("/dev/full", "c", 1, 7), Device("/dev/random", "c", 1, 8),
    Device("/dev/urandom", "c", 1, 9), Device("/dev/tty", "c", 5, 0),
)
DEV_SYMLINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
                ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))


@dataclass(frozen=True, slots=True)
class MountOptions:
    flags: int
    propagation: tuple[int, ...]
    data: str

    @classmethod
    def parse(cls, options: Sequence[str]) -> MountOptions:
        flags = 0
        prop: list[int] = []
        data: list[str] = []
        for o in options:
            if o in SET_FLAGS:
                flags |= SET_FLAGS[o]
            elif o in CLEAR_FLAGS:
                flags &= ~CLEAR_FLAGS[o]
            elif o in PROPAGATION:
                prop.append(PROPAGATION[o])
            else:
                data.append(o)
        return cls(flags=flags, propagation=tuple(prop), data=",".join(data))


def fd_target(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _host_err(what: str, e: OSError) -> HostError:
    return HostError(f"{what}: {e.strerror or e}", errno=e.errno or 0)


def prepare_root(syscalls: sc.Syscalls, rootfs: str, propagation: str) -> None:
    """Stop mount events of the container from reaching the host (rslave, or the spec's
    rootfsPropagation) and make the rootfs a mount point of its own for pivot_root."""
    flags = PROPAGATION.get(propagation, sc.MS_SLAVE | sc.MS_REC)
    try:
        syscalls.mount(None, "/", None, flags)
        # pivot_root refuses a new root whose parent mount is shared.
        if flags & sc.MS_SHARED:
            syscalls.mount(None, "/", None, sc.MS_SLAVE | sc.MS_REC)
        syscalls.mount(rootfs, rootfs, None, sc.MS_BIND | sc.MS_REC)
    except OSError as e:
        raise _host_err(f"preparing rootfs {rootfs!r}", e) from e


def _check_destination(m: Mount, field: str) -> None:
    dest = os.path.normpath(m.destination)
    if dest == "/proc" and m.type != "proc":
        # Only a real procfs may sit on /proc (masked paths and sysctls rely on it).
        raise SpecError("only a proc mount may cover /proc", field=f"{field}.destination")
    if dest.startswith("/proc/") and not (m.is_bind and dest in PROC_BIND_ALLOWED):
        raise SpecError(f"mounting over {dest!r} is not allowed", field=f"{field}.destination")


def mount_all(syscalls: sc.Syscalls, root_fd: int, mounts: Sequence[Mount], *,
              cgroup_paths: Mapping[str, str], cgroup_version: int,
              in_user_ns: bool) -> None:
    """Mount every spec mount in spec order, then apply each one's propagation."""
    parsed = []
    for i, m in enumerate(mounts):
        field = f"mounts[{i}]"
        _check_destination(m, field)
        opts = MountOptions.parse(m.options)
        _mount_one(syscalls, root_fd, m, opts, field, cgroup_paths, cgroup_version, in_user_ns)
        parsed.append((m, opts))
    for m, opts in parsed:
        if not opts.propagation:
            continue
        fd = reopen(root_fd, m.destination)
        try:
            for p in opts.propagation:
                syscalls.mount(None, fd_target(fd), None, p)
        except OSError as e:
            raise _host_err(f"setting propagation of {m.destination!r}", e) from e
        finally:
            os.close(fd)


def reopen(root_fd: int, path: str) -> int:
    """An O_PATH fd of what is at ``path`` now. An fd opened before a mount still names
    the covered directory; operations on the new mount need a fresh lookup."""
    return safe_path.open_in_root(root_fd, path, os.O_PATH)


def _open_target(root_fd: int, m: Mount, source_is_dir: bool, field: str) -> int:
    try:
        if source_is_dir:
            fd = safe_path.mkdir_in_root(root_fd, m.destination)
        else:
            fd = safe_path.create_file_in_root(root_fd, m.destination)
    except OSError as e:
        raise SpecError(f"cannot create mount point {m.destination!r}: {e.strerror}",
                        field=f"{field}.destination", errno=e.errno or 0) from e
    # Check again where the destination really is: a symlink in the image (/myproc ->
    # /proc) must not let a mount cover procfs under another name.
    real = "/" + os.path.relpath(safe_path.fd_path(fd), safe_path.fd_path(root_fd))
    try:
        _check_destination(Mount(os.path.normpath(real), m.type, m.source, m.options), field)
    except SpecError:
        os.close(fd)
        raise
    return fd


def _mount_one(syscalls: sc.Syscalls, root_fd: int, m: Mount, opts: MountOptions, field: str,
               cgroup_paths: Mapping[str, str], cgroup_version: int, in_user_ns: bool) -> None:
    if m.is_bind:
        try:
            src_fd = os.open(m.source, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise SpecError(f"bind source {m.source!r}: {e.strerror}", field=f"{field}.source",
                            errno=e.errno or 0) from e
        try:
            is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
            tfd = _open_target(root_fd, m, is_dir, field)
            try:
                bind_flags = sc.MS_BIND | (opts.flags & sc.MS_REC)
                syscalls.mount(fd_target(src_fd), fd_target(tfd), None, bind_flags)
            except OSError as e:
                raise _host_err(f"bind mount {m.source!r} on {m.destination!r}", e) from e
            finally:
                os.close(tfd)
        finally:
            os.close(src_fd)
        extra = opts.flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT)
        if extra:
            nfd = reopen(root_fd, m.destination)
            try:
                syscalls.mount(None, fd_target(nfd), None,
                               sc.MS_BIND | sc.MS_REMOUNT | extra | _locked_flags(nfd))
            except OSError as e:
                raise _host_err(f"remounting {m.destination!r}", e) from e
            finally:
                os.close(nfd)
        return
    tfd = _open_target(root_fd, m, True, field)
    try:
        if m.type == "cgroup":
            _mount_cgroup(syscalls, root_fd, tfd, m.destination, opts, cgroup_paths,
                          cgroup_version)
        elif m.type == "sysfs" and in_user_ns:
            # A user namespace without its own network namespace may not mount sysfs.
            try:
                syscalls.mount(m.source or "sysfs", fd_target(tfd), "sysfs", opts.flags,
                               opts.data)
            except PermissionError:
                syscalls.mount("/sys", fd_target(tfd), None, sc.MS_BIND | sc.MS_REC)
        else:
            syscalls.mount(m.source or m.type, fd_target(tfd), m.type, opts.flags, opts.data)
    except OSError as e:
        raise _host_err(f"mount {m.type} on {m.destination!r}", e) from e
    finally:
        os.close(tfd)


def _mount_cgroup(syscalls: sc.Syscalls, root_fd: int, tfd: int, dest: str,
                  opts: MountOptions, cgroup_paths: Mapping[str, str],
                  cgroup_version: int) -> None:
    """cgroup v2: the cgroup2 filesystem (the cgroup namespace scopes it). v1: a tmpfs
    holding a bind of the container's own directory for each controller."""
    if cgroup_version == 2:
        syscalls.mount("cgroup2", fd_target(tfd), "cgroup2", opts.flags)
        return
    syscalls.mount("tmpfs", fd_target(tfd), "tmpfs", opts.flags & ~sc.MS_RDONLY, "mode=755")
    top = reopen(root_fd, dest)
    try:
        for controller, host_dir in sorted(cgroup_paths.items()):
            name = controller.replace("name=", "")
            if not name or "/" in name or name in (".", ".."):
                continue
            sub = safe_path.mkdir_in_root(top, name)
            try:
                syscalls.mount(host_dir, fd_target(sub), None, sc.MS_BIND)
            finally:
                os.close(sub)
            sub = reopen(top, name)
            try:
                syscalls.mount(None, fd_target(sub), None,
                               sc.MS_BIND | sc.MS_REMOUNT | (opts.flags & _LOCKED))
            finally:
                os.close(sub)
        if opts.flags & sc.MS_RDONLY:
            syscalls.mount(None, fd_target(top), None, sc.MS_REMOUNT | opts.flags, "mode=755")
    finally:
        os.close(top)


def _locked_flags(fd: int) -> int:
    st = os.statvfs(fd_target(fd))
    return sum(v for k, v in _ST_FLAGS.items() if st.f_flag & k) & ~sc.MS_RDONLY


def needs_default_devices(mounts: Sequence[Mount]) -> bool:
    """A bind of /dev brings its own nodes; otherwise we create the default set."""
    return not any(os.path.normpath(m.destination) == "/dev" and m.is_bind for m in mounts)


def create_devices(syscalls: sc.Syscalls, root_fd: int, devices: Sequence[Device], *,
                   defaults: bool, in_user_ns: bool, field: str = "linux.devices") -> None:
    old = os.umask(0)
    try:
        todo: list[tuple[Device, str]] = []
        if defaults:
            todo += [(d, "default device") for d in DEFAULT_DEVICES]
        todo += [(d, f"{field}[{i}]") for i, d in enumerate(devices)]
        for dev, where in todo:
            _create_device(syscalls, root_fd, dev, in_user_ns, where)
        if defaults:
            _dev_symlinks(root_fd)
    finally:
        os.umask(old)


def _create_device(syscalls: sc.Syscalls, root_fd: int, dev: Device, in_user_ns: bool,
                   field: str) -> None:
    parent, name = os.path.split(os.path.normpath(dev.path))
    try:
        pfd = safe_path.mkdir_in_root(root_fd, parent)
    except OSError as e:
        raise SpecError(f"cannot create {parent!r}: {e.strerror}", field=f"{field}.path") from e
    try:
        if in_user_ns:
            # mknod is not allowed in a user namespace: bind the host's node instead.
            tfd = safe_path.create_file_in_root(pfd, name)
            try:
                syscalls.mount(dev.path, fd_target(tfd), None, sc.MS_BIND)
            finally:
                os.close(tfd)
            return
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
        mode = kind[dev.type] | (dev.file_mode & 0o7777)
        try:
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError as e:
            raise SpecError(f"{dev.path!r} is a directory", field=f"{field}.path") from e
        os.mknod(name, mode, os.makedev(dev.major, dev.minor), dir_fd=pfd)
        os.chown(name, dev.uid, dev.gid, dir_fd=pfd, follow_symlinks=False)
    except OSError as e:
        raise _host_err(f"creating device {dev.path!r}", e) from e
    finally:
        os.close(pfd)


def _dev_symlinks(root_fd: int) -> None:
    for d in ("/dev/pts", "/dev/shm"):
        os.close(safe_path.mkdir_in_root(root_fd, d))
    dev = safe_path.mkdir_in_root(root_fd, "/dev")
    try:
        for target, link in DEV_SYMLINKS:
            with contextlib.suppress(FileExistsError):
                os.symlink(target, os.path.basename(link), dir_fd=dev)
        # /dev/ptmx must be the container's own devpts instance's ptmx.
        with contextlib.suppress(FileNotFoundError):
            os.unlink("ptmx", dir_fd=dev)
        os.symlink("pts/ptmx", "ptmx", dir_fd=dev)
    finally:
        os.close(dev)


def open_verified_proc(syscalls: sc.Syscalls, root_fd: int | str, path: str, flags: int) -> int:
    fd = safe_path.open_in_root(root_fd, path, flags)
    # Writes meant for the kernel must reach procfs, not a file the image put there.
    if syscalls.fstatfs_type(fd) != PROC_SUPER_MAGIC:
        os.close(fd)
        raise HostError(f"{path!r} is not on procfs (is /proc mounted?)", errno=errno.EXDEV)
    return fd


def apply_sysctls(syscalls: sc.Syscalls, root_fd: int, sysctl: Mapping[str, str]) -> None:
    for key, value in sysctl.items():
        rel = "/proc/sys/" + sysctl_path(key)
        try:
            fd = open_verified_proc(syscalls, root_fd, rel, os.O_WRONLY)
        except OSError as e:
            raise SpecError(f"cannot open {rel!r}: {e.strerror}", field=f"linux.sysctl.{key}",
                            errno=e.errno or 0) from e
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise SpecError(f"writing {value!r}: {e.strerror}", field=f"linux.sysctl.{key}",
                            errno=e.errno or 0) from e
        finally:
            os.close(fd)


def readonly_paths(syscalls: sc.Syscalls, root_fd: int, paths: Sequence[str]) -> None:
    for p in paths:
        try:
            fd = safe_path.open_in_root(root_fd, p, os.O_PATH)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise _host_err(f"readonly path {p!r}", e) from e
        try:
            syscalls.mount(fd_target(fd), fd_target(fd), None, sc.MS_BIND | sc.MS_REC)
        except OSError as e:
            raise _host_err(f"readonly path {p!r}", e) from e
        finally:
            os.close(fd)
        fd = reopen(root_fd, p)
        try:
            syscalls.mount(None, fd_target(fd), None,
                           sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC
                           | _locked_flags(fd))
        except OSError as e:
            raise _host_err(f"readonly path {p!r}", e) from e
        finally:
            os.close(fd)


def masked_paths(syscalls: sc.Syscalls, root_fd: int, paths: Sequence[str]) -> None:
    null = safe_path.open_in_root(root_fd, "/dev/null", os.O_PATH)
    try:
        st = os.fstat(null)
        # Masking a file binds /dev/null over it: it must be the real null device, not a
        # file or another device the image planted there.
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
            raise HostError("/dev/null in the container is not the null device",
                            errno=errno.EINVAL)
        for p in paths:
            try:
                fd = safe_path.open_in_root(root_fd, p, os.O_PATH)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    syscalls.mount("tmpfs", fd_target(fd), "tmpfs", sc.MS_RDONLY, "size=0k")
                else:
                    syscalls.mount(fd_target(null), fd_target(fd), None, sc.MS_BIND)
            except OSError as e:
                raise _host_err(f"masking {p!r}", e) from e
            finally:
                os.close(fd)
    finally:
        os.close(null)


def remount_root_readonly(syscalls: sc.Syscalls, root_fd: int) -> None:
    try:
        syscalls.mount(None, fd_target(root_fd), None,
                       sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _locked_flags(root_fd))
    except OSError as e:
        raise _host_err("remounting root read-only", e) from e


def switch_root(syscalls: sc.Syscalls, rootfs: str, *, no_pivot: bool) -> None:
    """pivot_root into ``rootfs`` and detach the old root; on an initramfs (where
    pivot_root fails with EINVAL) or when asked, move the rootfs over / and chroot."""
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        if not no_pivot:
            try:
                # pivot_root(".", ".") stacks the old root under the new one; detaching it
                # leaves no path back to the host's filesystem.
                syscalls.pivot_root(".", ".")
                os.fchdir(old)
                syscalls.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)
                syscalls.umount2(".", sc.MNT_DETACH)
                os.chdir("/")
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise _host_err("pivot_root", e) from e
                log.info("event=pivot_root_unsupported fallback=move_chroot")
                os.fchdir(new)
        syscalls.mount(".", "/", None, sc.MS_MOVE)
        syscalls.chroot(".")
        os.chdir("/")
    except OSError as e:
        raise _host_err("switching root", e) from e
    finally:
        os.close(new)
        os.close(old)
