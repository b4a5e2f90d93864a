"""The seccomp compiler, checked by running its programs in tests' BPF interpreter."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kata_agent.engine import lowlevel, seccomp, seccomp_tables
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.seccomp import (
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    Seccomp,
    compile_filter,
)

from .test_seccomp_interp import run, seccomp_data

X64 = seccomp_tables.X86_64
A64 = seccomp_tables.AARCH64


def prog_for(doc: dict[str, Any], arch: str = "x86_64") -> bytes:
    return compile_filter(Seccomp.from_oci(doc), arch)


def call(prog: bytes, name: str, *args: int, arch: str = "x86_64") -> int:
    table, audit = (X64, AUDIT_ARCH_X86_64) if arch == "x86_64" else (A64, AUDIT_ARCH_AARCH64)
    return run(prog, seccomp_data(table[name], audit, args))


DENY_MKDIR = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
}


def test_errno_rule_and_default_allow_x86_64() -> None:
    prog = prog_for(DENY_MKDIR)
    assert call(prog, "mkdir") == RET_ERRNO | errno.EPERM
    assert call(prog, "mkdirat") == RET_ERRNO | errno.EPERM
    assert call(prog, "getpid") == RET_ALLOW


def test_aarch64_table_and_names_missing_there_are_skipped() -> None:
    prog = prog_for(DENY_MKDIR, "aarch64")  # aarch64 has no mkdir(2): skipped, not an error
    assert call(prog, "mkdirat", arch="aarch64") == RET_ERRNO | errno.EPERM
    assert call(prog, "getpid", arch="aarch64") == RET_ALLOW
    assert run(prog, seccomp_data(A64["mkdirat"], AUDIT_ARCH_X86_64)) == RET_KILL_PROCESS


def test_foreign_architecture_is_killed() -> None:
    prog = prog_for(DENY_MKDIR)
    assert run(prog, seccomp_data(39, AUDIT_ARCH_AARCH64)) == RET_KILL_PROCESS
    assert run(prog, seccomp_data(39, AUDIT_ARCH_I386)) == RET_KILL_PROCESS


def test_x32_rejected_unless_listed() -> None:
    x32_mkdir = seccomp_tables.X32["mkdir"]
    prog = prog_for(DENY_MKDIR)
    assert run(prog, seccomp_data(x32_mkdir, AUDIT_ARCH_X86_64)) == RET_KILL_PROCESS
    prog = prog_for({**DENY_MKDIR, "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]})
    assert run(prog, seccomp_data(x32_mkdir, AUDIT_ARCH_X86_64)) == RET_ERRNO | errno.EPERM
    assert run(prog, seccomp_data(X64["getpid"] | 0x40000000, AUDIT_ARCH_X86_64)) == RET_ALLOW


def test_i386_section_when_listed() -> None:
    prog = prog_for({**DENY_MKDIR, "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]})
    i386 = seccomp_tables.I386
    assert run(prog, seccomp_data(i386["mkdir"], AUDIT_ARCH_I386)) == RET_ERRNO | errno.EPERM
    assert run(prog, seccomp_data(i386["getpid"], AUDIT_ARCH_I386)) == RET_ALLOW


@pytest.mark.parametrize(
    ("action", "errno_ret", "expected"),
    [
        ("SCMP_ACT_KILL", None, 0),
        ("SCMP_ACT_KILL_THREAD", None, 0),
        ("SCMP_ACT_KILL_PROCESS", None, 0x80000000),
        ("SCMP_ACT_TRAP", None, 0x00030000),
        ("SCMP_ACT_ERRNO", 38, 0x00050000 | 38),
        ("SCMP_ACT_TRACE", 7, 0x7FF00000 | 7),
        ("SCMP_ACT_LOG", None, 0x7FFC0000),
        ("SCMP_ACT_ALLOW", None, 0x7FFF0000),
    ],
)
def test_actions(action: str, errno_ret: int | None, expected: int) -> None:
    rule: dict[str, Any] = {"names": ["getpid"], "action": action}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    prog = prog_for({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]})
    assert call(prog, "getpid") == expected


def test_default_errno_ret() -> None:
    prog = prog_for({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.ENOSYS,
                     "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]})
    assert call(prog, "read") == RET_ALLOW
    assert call(prog, "write") == RET_ERRNO | errno.ENOSYS


def _holds(op: str, x: int, v: int, v2: int) -> bool:
    return {
        "SCMP_CMP_EQ": x == v, "SCMP_CMP_NE": x != v, "SCMP_CMP_LT": x < v,
        "SCMP_CMP_LE": x <= v, "SCMP_CMP_GT": x > v, "SCMP_CMP_GE": x >= v,
        "SCMP_CMP_MASKED_EQ": (x & v) == v2,
    }[op]


u64 = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, (1 << 64) - 1, 5 << 32]),
)


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from(sorted(seccomp.OPERATORS)), x=u64, v=u64, v2=u64,
       index=st.integers(0, 5), near=st.booleans())
def test_argument_comparisons_match_64bit_semantics(
        op: str, x: int, v: int, v2: int, index: int, near: bool) -> None:
    if near:  # same high word, to exercise the low-word comparison
        x = (v & ~0xFFFFFFFF) | (x & 0xFFFFFFFF)
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{
        "names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
        "args": [{"index": index, "value": v, "valueTwo": v2, "op": op}]}]}
    args = [0] * 6
    args[index] = x
    got = call(prog_for(doc), "ioctl", *args)
    assert got == (RET_ERRNO | 1 if _holds(op, x, v, v2) else RET_ALLOW)


def test_conditions_on_different_args_are_all_required() -> None:
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{
        "names": ["kill"], "action": "SCMP_ACT_ERRNO",
        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                 {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]}]}
    prog = prog_for(doc)
    assert call(prog, "kill", 1, 9) == RET_ERRNO | errno.EPERM
    assert call(prog, "kill", 1, 15) == RET_ALLOW
    assert call(prog, "kill", 2, 9) == RET_ALLOW


def test_conditions_on_the_same_arg_are_alternatives() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{
        "names": ["personality"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                 {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}]}
    prog = prog_for(doc)
    assert call(prog, "personality", 0) == RET_ALLOW
    assert call(prog, "personality", 8) == RET_ALLOW
    assert call(prog, "personality", 4) == RET_ERRNO | errno.EPERM
    assert call(prog, "getpid") == RET_ERRNO | errno.EPERM


def test_first_matching_rule_wins_and_unknown_names_are_skipped() -> None:
    prog = prog_for({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["no_such_call", "read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5},
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 6}]})
    assert call(prog, "read") == RET_ERRNO | 5


def test_large_allow_list_fits() -> None:
    names = sorted(X64)
    prog = prog_for({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                     "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]})
    assert len(prog) // 8 < seccomp.BPF_MAXINSNS
    assert call(prog, names[0]) == RET_ALLOW and call(prog, names[-1]) == RET_ALLOW
    assert run(prog, seccomp_data(999, AUDIT_ARCH_X86_64)) == RET_ERRNO | errno.ENOSYS


def test_too_large_program_is_refused() -> None:
    args = [{"index": i, "value": 1, "op": "SCMP_CMP_LT"} for i in range(6)]
    rules = [{"names": sorted(X64), "action": "SCMP_ACT_LOG", "args": args}]
    with pytest.raises(SpecError):
        prog_for({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules})


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"defaultAction": "SCMP_ACT_NOPE"}, "linux.seccomp.defaultAction"),
        ({"defaultAction": "SCMP_ACT_NOTIFY"}, "linux.seccomp.defaultAction"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]},
         "linux.seccomp.architectures[0]"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]},
         "linux.seccomp.flags[0]"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"},
         "linux.seccomp.listenerPath"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 5000},
         "linux.seccomp.defaultErrnoRet"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action":
                                                           "SCMP_ACT_ALLOW"}]},
         "linux.seccomp.syscalls[0].names"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["Read;"],
                                                           "action": "SCMP_ACT_ALLOW"}]},
         "linux.seccomp.syscalls[0].names[0]"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]},
         "linux.seccomp.syscalls[0].args[0].index"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_XX"}]}]},
         "linux.seccomp.syscalls[0].args[0].op"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
         "linux.seccomp.syscalls[0].args[0].value"),
    ],
)
def test_invalid_profiles_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as ei:
        Seccomp.from_oci(doc)
    assert ei.value.field == field


def test_flags_and_unknown_host_arch() -> None:
    s = Seccomp.from_oci({"defaultAction": "SCMP_ACT_ALLOW",
                          "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"]})
    assert s.filter_flags == 3
    with pytest.raises(HostError):
        compile_filter(s, "riscv64")


def test_load_filter_maps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(prog: bytes, flags: int) -> int:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(lowlevel, "seccomp_set_mode_filter", fail)
    with pytest.raises(HostError) as ei:
        seccomp.load_filter(b"\0" * 8)
    assert ei.value.errno == errno.EACCES


def test_tables_match_known_numbers() -> None:
    assert X64["read"] == 0 and X64["getpid"] == 39 and X64["clone3"] == 435
    assert A64["openat"] == 56 and A64["getpid"] == 172 and "open" not in A64
    assert seccomp_tables.X32["read"] == 0x40000000
    assert seccomp_tables.I386["getpid"] == 20


def test_program_starts_with_the_arch_check() -> None:
    insns = seccomp.describe(prog_for(DENY_MKDIR))
    assert insns[0] == (seccomp.BPF_LD_W_ABS, 0, 0, seccomp.OFF_ARCH)
    assert insns[1][0] == seccomp.BPF_JEQ_K and insns[1][3] == AUDIT_ARCH_X86_64


def test_calls_newer_than_the_profile_get_enosys() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
           "syscalls": [{"names": ["read", "clone3"], "action": "SCMP_ACT_ALLOW"}]}
    prog = prog_for(doc)
    assert call(prog, "read") == RET_ALLOW
    assert call(prog, "write") == RET_ERRNO | errno.EPERM  # known but not allowed
    assert run(prog, seccomp_data(X64["clone3"] + 1, AUDIT_ARCH_X86_64)) == (
        RET_ERRNO | errno.ENOSYS)
    x32_write = seccomp_tables.X32["write"]
    assert run(prog, seccomp_data(x32_write, AUDIT_ARCH_X86_64)) == RET_ERRNO | errno.EPERM
    # with a permissive default nothing changes
    allow = prog_for({**doc, "defaultAction": "SCMP_ACT_ALLOW"})
    assert run(allow, seccomp_data(X64["clone3"] + 1, AUDIT_ARCH_X86_64)) == RET_ALLOW
