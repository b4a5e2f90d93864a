"""Device access control on cgroup v2: an eBPF program of type BPF_PROG_TYPE_CGROUP_DEVICE.

The program sees ``struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }``
where ``access_type = (access << 16) | type`` (type: 1 block, 2 char; access: 1 mknod,
2 read, 4 write) and returns 1 to allow, 0 to deny.

Rules are evaluated like the v1 list they come from: later rules override earlier ones, so
the program tests them from last to first and the first match decides. A rule matches
when type, major and minor match (``a`` and -1 are wildcards) and the requested access
is a subset of the rule's access.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence

from .. import lowlevel
from ..errors import HostError
from ..resources import DeviceRule

log = logging.getLogger(__name__)

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6

_DEV_TYPE = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}

# eBPF opcodes (class | op | source).
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_AND64_K = 0x57
_RSH64_K = 0x77
_JNE_K = 0x55
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _access_mask(access: str) -> int:
    m = 0
    for c in access:
        m |= _ACCESS[c]
    return m


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """Instructions testing one rule; a failed test jumps past the block."""
    tests: list[tuple[int, int, int]] = []  # (code, reg, imm) jumping out when unequal
    pre: list[list[bytes]] = []
    if rule.type != "a":
        tests.append((_JNE_K, 3, _DEV_TYPE[rule.type]))
        pre.append([])
        if rule.major >= 0:
            tests.append((_JNE_K, 5, rule.major))
            pre.append([])
        if rule.minor >= 0:
            tests.append((_JNE_K, 6, rule.minor))
            pre.append([])
    allowed = _access_mask(rule.access)
    if allowed != 7:
        # r7 = requested & ~allowed; any bit left means the rule does not cover the request.
        pre.append([_insn(_MOV64_X, dst=7, src=4), _insn(_AND64_K, dst=7, imm=~allowed & 7)])
        tests.append((_JNE_K, 7, 0))
    tail = [_insn(_MOV64_K, dst=0, imm=1 if rule.allow else 0), _insn(_EXIT)]
    # Lay out, then fill each jump's offset to the first instruction after the block.
    layout: list[bytes | tuple[int, int, int]] = []
    for p, t in zip(pre, tests, strict=True):
        layout.extend(p)
        layout.append(t)
    layout.extend(tail)
    out: list[bytes] = []
    n = len(layout)
    for i, item in enumerate(layout):
        if isinstance(item, tuple):
            code, reg, imm = item
            out.append(_insn(code, dst=reg, off=n - (i + 1), imm=imm))
        else:
            out.append(item)
    return out


def build_program(rules: Sequence[DeviceRule]) -> bytes:
    """The eBPF program for ``rules`` in v1 order (deny-all is implicit at the start)."""
    insns = [
        _insn(_LDX_W, dst=2, src=1, off=0),  # r2 = access_type
        _insn(_MOV64_X, dst=3, src=2),
        _insn(_AND64_K, dst=3, imm=0xFFFF),  # r3 = device type
        _insn(_MOV64_X, dst=4, src=2),
        _insn(_RSH64_K, dst=4, imm=16),  # r4 = requested access
        _insn(_LDX_W, dst=5, src=1, off=4),  # r5 = major
        _insn(_LDX_W, dst=6, src=1, off=8),  # r6 = minor
    ]
    for rule in reversed(rules):
        block = _rule_block(rule)
        insns.extend(block)
        if len(block) == 2:
            # An unconditional rule decides everything; the verifier rejects dead code.
            return b"".join(insns)
    insns.extend([_insn(_MOV64_K, dst=0, imm=0), _insn(_EXIT)])
    return b"".join(insns)


def attach(cgroup_dir: str, rules: Sequence[DeviceRule]) -> None:
    """Load the program and attach it to the cgroup, replacing the one attached before
    (single-program mode: a new attach with the same flags replaces the old program)."""
    prog = build_program(rules)
    try:
        prog_fd = lowlevel.bpf_prog_load(BPF_PROG_TYPE_CGROUP_DEVICE, prog, b"Apache-2.0")
    except OSError as e:
        raise HostError(f"load device program: {e.strerror}", errno=e.errno or 0) from e
    try:
        dir_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lowlevel.bpf_prog_attach(dir_fd, prog_fd, BPF_CGROUP_DEVICE, 0)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise HostError(f"attach device program to {cgroup_dir}: {e.strerror}",
                        errno=e.errno or 0) from e
    finally:
        os.close(prog_fd)
    log.info("device program attached cgroup=%s rules=%d insns=%d",
             cgroup_dir, len(rules), len(prog) // 8)
