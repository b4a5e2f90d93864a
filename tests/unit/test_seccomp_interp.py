"""A classic-BPF interpreter for seccomp programs (seccomp_data in, action out), used to
check compiled filters without loading them, plus tests of the interpreter itself."""

from __future__ import annotations

import struct

import pytest

_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = range(8)


class BpfFault(Exception):
    pass


def seccomp_data(nr: int, arch: int, args: tuple[int, ...] = (), ip: int = 0) -> bytes:
    a = list(args) + [0] * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, arch, ip, *a)


def run(prog: bytes, data: bytes, max_steps: int = 100_000) -> int:
    """Execute ``prog`` (packed sock_filter) over ``data``; returns the RET value."""
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    acc = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(max_steps):
        if not 0 <= pc < len(insns):
            raise BpfFault(f"pc {pc} out of program")
        code, jt, jf, k = insns[pc]
        cls = code & 0x07
        pc += 1
        if cls == _LD:
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x20 and size == 0x00:  # ABS, W
                if k % 4 or k + 4 > len(data):
                    raise BpfFault(f"bad load offset {k}")
                acc = struct.unpack_from("<I", data, k)[0]
            elif mode == 0x00:  # IMM
                acc = k
            elif mode == 0x60:  # MEM
                acc = mem[k]
            else:
                raise BpfFault(f"unsupported load {code:#x}")
        elif cls == _LDX:
            x = k if code & 0xE0 == 0x00 else mem[k]
        elif cls == _ST:
            mem[k] = acc
        elif cls == _STX:
            mem[k] = x
        elif cls == _ALU:
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                acc = (acc + src) & 0xFFFFFFFF
            elif op == 0x10:
                acc = (acc - src) & 0xFFFFFFFF
            elif op == 0x50:
                acc &= src
            elif op == 0x40:
                acc |= src
            elif op == 0x60:
                acc = (acc << src) & 0xFFFFFFFF
            elif op == 0x70:
                acc >>= src
            elif op == 0x80:
                acc = (-acc) & 0xFFFFFFFF
            else:
                raise BpfFault(f"unsupported alu {code:#x}")
        elif cls == _JMP:
            op = code & 0xF0
            if op == 0x00:  # JA
                pc += k
                continue
            src = x if code & 0x08 else k
            if op == 0x10:
                cond = acc == src
            elif op == 0x20:
                cond = acc > src
            elif op == 0x30:
                cond = acc >= src
            elif op == 0x40:
                cond = bool(acc & src)
            else:
                raise BpfFault(f"unsupported jump {code:#x}")
            pc += jt if cond else jf
        elif cls == _RET:
            return acc if code & 0x18 == 0x10 else k
        elif cls == _MISC:
            if code == 0x07:
                x = acc
            else:
                acc = x
    raise BpfFault("step limit reached")


def _p(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


def test_interpreter_loads_compares_and_returns() -> None:
    prog = _p(
        (0x20, 0, 0, 0),  # ld nr
        (0x15, 0, 1, 39),  # jeq 39
        (0x06, 0, 0, 1),  # ret 1
        (0x25, 0, 1, 100),  # jgt 100
        (0x06, 0, 0, 2),
        (0x06, 0, 0, 3),
    )
    assert run(prog, seccomp_data(39, 0)) == 1
    assert run(prog, seccomp_data(101, 0)) == 2
    assert run(prog, seccomp_data(7, 0)) == 3


def test_interpreter_reads_args_little_endian_and_and() -> None:
    prog = _p((0x20, 0, 0, 20), (0x54, 0, 0, 0xF0), (0x16, 0, 0, 0))  # ld hi(arg0); and; ret A
    assert run(prog, seccomp_data(0, 0, ((0xAB << 32) | 5,))) == 0xA0


def test_interpreter_rejects_running_off_the_end() -> None:
    with pytest.raises(BpfFault):
        run(_p((0x20, 0, 0, 0)), seccomp_data(0, 0))
