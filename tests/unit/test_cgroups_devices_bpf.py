"""The cgroup v2 device program, run in a small eBPF interpreter (the kernel runs it in
tests/privileged/test_cgroups_v2.py)."""

from __future__ import annotations

import struct

import pytest
from kata_agent.engine.cgroups.devices_bpf import build_program
from kata_agent.engine.resources import DEFAULT_ALLOWED_DEVICES, DeviceRule

BLOCK, CHAR = 1, 2
MKNOD, READ, WRITE = 1, 2, 4


def run_ebpf(prog: bytes, dev_type: int, access: int, major: int, minor: int) -> int:
    ctx = struct.pack("<III", (access << 16) | dev_type, major, minor)
    regs = [0] * 11
    pc = 0
    insns = [struct.unpack_from("<BBhi", prog, i) for i in range(0, len(prog), 8)]
    mask = (1 << 64) - 1
    for _ in range(10_000):
        code, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0x0F, regs_byte >> 4
        pc += 1
        if code == 0x61:  # ldx w [src+off]; r1 is the only pointer: the context
            assert src == 1
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0xBF:
            regs[dst] = regs[src]
        elif code == 0xB7:
            regs[dst] = imm & mask
        elif code == 0x57:
            regs[dst] &= imm & mask
        elif code == 0x77:
            regs[dst] >>= imm
        elif code == 0x55:
            if regs[dst] != imm & mask:
                pc += off
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert 0 <= pc < len(insns)
    raise AssertionError("no exit")


def policy(*rules: DeviceRule) -> bytes:
    return build_program((DeviceRule(allow=False), *rules, *DEFAULT_ALLOWED_DEVICES))


def test_default_policy() -> None:
    prog = policy()
    assert run_ebpf(prog, CHAR, READ | WRITE, 1, 3) == 1  # /dev/null
    assert run_ebpf(prog, CHAR, READ, 136, 7) == 1  # /dev/pts/7
    assert run_ebpf(prog, CHAR, READ, 1, 11) == 0  # /dev/kmsg
    assert run_ebpf(prog, BLOCK, READ, 8, 0) == 0  # /dev/sda
    assert run_ebpf(prog, BLOCK, MKNOD, 8, 0) == 1  # mknod is allowed for any node
    assert run_ebpf(prog, CHAR, MKNOD | READ, 1, 11) == 0


def test_spec_rules_and_access_subsets() -> None:
    prog = policy(DeviceRule(True, "c", 1, 11, "r"), DeviceRule(True, "b", 8, -1, "rw"))
    assert run_ebpf(prog, CHAR, READ, 1, 11) == 1
    assert run_ebpf(prog, CHAR, WRITE, 1, 11) == 0
    assert run_ebpf(prog, BLOCK, READ | WRITE, 8, 16) == 1
    assert run_ebpf(prog, BLOCK, READ, 9, 0) == 0


def test_later_deny_overrides_earlier_allow() -> None:
    prog = build_program((DeviceRule(allow=True), DeviceRule(False, "c", 1, 3, "w")))
    assert run_ebpf(prog, CHAR, READ, 1, 3) == 1
    assert run_ebpf(prog, CHAR, WRITE, 1, 3) == 0
    assert run_ebpf(prog, BLOCK, WRITE, 8, 0) == 1


@pytest.mark.parametrize("rules", [(), (DeviceRule(True, "c", 5, 1, "rw"),)])
def test_program_ends_with_an_exit_and_has_no_dead_code(rules: tuple[DeviceRule, ...]) -> None:
    prog = policy(*rules)
    # the first rule tested last is the unconditional deny: nothing may follow it
    assert prog[-8] == 0x95 and prog[-16] == 0xB7
    assert struct.unpack_from("<i", prog, len(prog) - 12)[0] == 0
