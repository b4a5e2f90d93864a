"""Raw system calls used by the capability, seccomp and cgroup-v2 device code.

A thin ctypes layer with no policy: each function issues one call and raises ``OSError``
with the kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

# (seccomp, bpf, capget, capset) per machine.
_NR: dict[str, tuple[int, int, int, int]] = {
    "x86_64": (317, 321, 125, 126),
    "aarch64": (277, 280, 90, 91),
}

SECCOMP_SET_MODE_FILTER = 1

PR_SET_KEEPCAPS = 8
PR_GET_KEEPCAPS = 7
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9


def _nr(index: int) -> int:
    machine = os.uname().machine
    try:
        return _NR[machine][index]
    except KeyError:
        raise OSError(38, f"no system call table for machine {machine}") from None


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_mode_filter(prog: bytes, flags: int = 0) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, &sock_fprog); ``prog`` is packed sock_filter."""
    if len(prog) % 8:
        raise OSError(22, "seccomp program length is not a multiple of 8")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return _check(
        _libc.syscall(
            ctypes.c_long(_nr(0)),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(flags),
            ctypes.byref(fprog),
        )
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capget(pid: int = 0) -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(_nr(2)), ctypes.byref(hdr), ctypes.byref(data)))
    eff = data[0].effective | (data[1].effective << 32)
    perm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, perm, inh


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.syscall(ctypes.c_long(_nr(3)), ctypes.byref(hdr), ctypes.byref(data)))


def bpf(cmd: int, attr: bytes) -> int:
    """bpf(cmd, attr, len(attr)); ``attr`` is the packed union bpf_attr prefix."""
    buf = ctypes.create_string_buffer(attr, len(attr))
    return _check(
        _libc.syscall(
            ctypes.c_long(_nr(1)), ctypes.c_long(cmd), buf, ctypes.c_long(len(attr))
        )
    )


def bpf_prog_load(prog_type: int, insns: bytes, license_: bytes, log_size: int = 65536) -> int:
    """BPF_PROG_LOAD; returns the program fd. The verifier log is attached to the error."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic_buf = ctypes.create_string_buffer(license_)
    log_buf = ctypes.create_string_buffer(log_size)
    attr = bytearray(128)
    ctypes_addr = ctypes.addressof
    fields = (
        prog_type.to_bytes(4, "little")
        + (len(insns) // 8).to_bytes(4, "little")
        + ctypes_addr(insn_buf).to_bytes(8, "little")
        + ctypes_addr(lic_buf).to_bytes(8, "little")
        + (1).to_bytes(4, "little")  # log_level
        + log_size.to_bytes(4, "little")
        + ctypes_addr(log_buf).to_bytes(8, "little")
    )
    attr[: len(fields)] = fields
    try:
        return bpf(BPF_PROG_LOAD, bytes(attr))
    except OSError as e:
        log = log_buf.value.decode(errors="replace")[-2000:]
        raise OSError(e.errno, f"{e.strerror}; verifier: {log}") from None


def bpf_prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    attr = (
        target_fd.to_bytes(4, "little")
        + prog_fd.to_bytes(4, "little")
        + attach_type.to_bytes(4, "little")
        + flags.to_bytes(4, "little")
        + bytes(4)
    )
    bpf(BPF_PROG_ATTACH, attr)


def bpf_prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = (
        target_fd.to_bytes(4, "little")
        + prog_fd.to_bytes(4, "little")
        + attach_type.to_bytes(4, "little")
        + bytes(8)
    )
    bpf(BPF_PROG_DETACH, attr)
