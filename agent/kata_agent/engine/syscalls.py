"""Raw Linux system calls the engine needs and the Python standard library lacks.

One thin class, no logic: every method maps to one call and raises ``OSError`` on failure.
Everything else in the engine receives a ``Syscalls`` instance so unit tests can pass a
recording fake instead.
"""

from __future__ import annotations

import ctypes
import os
import struct

# clone(2) / unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# openat2(2) resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

CLOSE_RANGE_CLOEXEC = 1 << 2

# x86_64 / aarch64 (asm-generic) system call numbers
_NR = {
    "x86_64": {"pivot_root": 155, "openat2": 437, "close_range": 436, "setns": 308},
    "aarch64": {"pivot_root": 41, "openat2": 437, "close_range": 436, "setns": 268},
}


class Syscalls:
    """Thin wrappers; each raises ``OSError(errno, ...)`` when the call fails."""

    def __init__(self) -> None:
        # The libc already loaded: find_library would run ldconfig on every call.
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._nr = _NR.get(os.uname().machine, _NR["x86_64"])

    def _check(self, ret: int, what: str, *args: object) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}({', '.join(map(str, args))}): {os.strerror(err)}")
        return ret

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", fd)

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        ret = self._libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        )
        self._check(ret, "mount", source, target, fstype, hex(flags), data)

    def umount2(self, target: str, flags: int) -> None:
        self._check(self._libc.umount2(target.encode(), ctypes.c_int(flags)), "umount2", target)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        ret = self._libc.syscall(ctypes.c_long(self._nr["pivot_root"]),
                                 new_root.encode(), put_old.encode())
        self._check(ret, "pivot_root", new_root, put_old)

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", name)

    def setdomainname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.setdomainname(raw, ctypes.c_size_t(len(raw))),
                    "setdomainname", name)

    def close_range(self, first: int, last: int, flags: int = 0) -> None:
        ret = self._libc.syscall(ctypes.c_long(self._nr["close_range"]), ctypes.c_uint(first),
                                 ctypes.c_uint(last), ctypes.c_uint(flags))
        self._check(ret, "close_range", first, last, flags)

    def openat2(self, dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
        how = struct.pack("=QQQ", flags, mode, resolve)
        buf = ctypes.create_string_buffer(how, len(how))
        ret = self._libc.syscall(ctypes.c_long(self._nr["openat2"]), ctypes.c_int(dirfd),
                                 path.encode(), buf, ctypes.c_size_t(len(how)))
        return self._check(int(ret), "openat2", dirfd, path)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        ret = self._libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                               ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
        return self._check(int(ret), "prctl", option, arg2)

    def chroot(self, path: str) -> None:
        os.chroot(path)

    def mknod(self, path: str, mode: int, device: int) -> None:
        os.mknod(path, mode, device)

    def fstatfs_type(self, fd: int) -> int:
        """The f_type magic of the filesystem holding ``fd``."""
        buf = ctypes.create_string_buffer(256)
        self._check(self._libc.fstatfs(ctypes.c_int(fd), buf), "fstatfs", fd)
        return int(struct.unpack_from("=q", buf.raw, 0)[0])
