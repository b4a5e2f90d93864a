"""seccomp: the OCI ``linux.seccomp`` object compiled to a classic BPF program.

The program reads ``struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }``:

1. dispatch on ``arch`` to one section per supported ABI; other ABIs get the
   bad-architecture action (kill the process);
2. in a section, rules are tested in spec order, first match wins; a rule with argument
   conditions matches when all of them hold, except that conditions repeating the same
   argument index are alternatives (as runc);
3. nothing matched: a call numbered above every call the profile names gets ENOSYS
   (unless the default allows), as runc does; anything else gets the default action.

64-bit argument comparisons are done on the two 32-bit halves (little endian: low word
first). Syscall names unknown to an architecture are skipped and logged, as runc does.
"""

from __future__ import annotations

import errno
import logging
import platform
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import lowlevel, seccomp_tables
from .errors import HostError, SpecError

log = logging.getLogger(__name__)

# seccomp return values
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_DATA = 0x0000FFFF

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JA = 0x05
BPF_JEQ_K = 0x15
BPF_JGT_K = 0x25
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096

OFF_NR = 0
OFF_ARCH = 4
OFF_ARGS = 16

ACTIONS = frozenset({
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG",
})
OPERATORS = frozenset({
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
    "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ",
})
FLAGS: Mapping[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
# Architectures the OCI spec may name; only some have tables here (the others are logged).
KNOWN_ARCHES = frozenset({
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64", "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K", "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
})
_MACHINES = {
    "x86_64": "x86_64", "amd64": "x86_64", "SCMP_ARCH_X86_64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64", "SCMP_ARCH_AARCH64": "aarch64",
}

MAX_SYSCALL_RULES = 4096
MAX_NAMES_PER_RULE = 1024
MAX_ERRNO = 4095
UINT64_MAX = (1 << 64) - 1
_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


def _int(d: Mapping[str, Any], key: str, field: str, lo: int, hi: int,
         default: int | None = None) -> int | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"must be an integer in [{lo}, {hi}]", field=f"{field}.{key}")
    return v


def _action(v: Any, field: str) -> str:
    if v == "SCMP_ACT_NOTIFY":
        raise SpecError("SCMP_ACT_NOTIFY (seccomp user notification) is not supported",
                        field=field)
    if v not in ACTIONS:
        raise SpecError(f"unknown seccomp action {v!r}", field=field)
    return str(v)


@dataclass(frozen=True, slots=True)
class SeccompArg:
    index: int
    value: int
    value_two: int
    op: str

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> SeccompArg:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        op = d.get("op")
        if op not in OPERATORS:
            raise SpecError(f"unknown comparison {op!r}", field=f"{field}.op")
        index = _int(d, "index", field, 0, 5)
        if index is None:
            raise SpecError("is required", field=f"{field}.index")
        return cls(
            index=index,
            value=_int(d, "value", field, 0, UINT64_MAX, 0) or 0,
            value_two=_int(d, "valueTwo", field, 0, UINT64_MAX, 0) or 0,
            op=str(op),
        )


@dataclass(frozen=True, slots=True)
class SyscallRule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[SeccompArg, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> SyscallRule:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        names = d.get("names")
        if not isinstance(names, list) or not names or len(names) > MAX_NAMES_PER_RULE:
            raise SpecError("must be a non-empty array of syscall names",
                            field=f"{field}.names")
        for i, n in enumerate(names):
            if not isinstance(n, str) or not _NAME.match(n):
                raise SpecError(f"invalid syscall name {n!r}", field=f"{field}.names[{i}]")
        args = d.get("args") or []
        if not isinstance(args, list) or len(args) > 6:
            raise SpecError("must be an array of at most 6 conditions", field=f"{field}.args")
        return cls(
            names=tuple(names),
            action=_action(d.get("action"), f"{field}.action"),
            errno_ret=_int(d, "errnoRet", field, 0, MAX_ERRNO),
            args=tuple(SeccompArg.from_oci(a, f"{field}.args[{i}]") for i, a in enumerate(args)),
        )


@dataclass(frozen=True, slots=True)
class Seccomp:
    default_action: str
    default_errno_ret: int | None = None
    architectures: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    syscalls: tuple[SyscallRule, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str = "linux.seccomp") -> Seccomp:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        arches = d.get("architectures") or []
        if not isinstance(arches, list) or len(arches) > len(KNOWN_ARCHES):
            raise SpecError("must be an array of architectures", field=f"{field}.architectures")
        for i, a in enumerate(arches):
            if a not in KNOWN_ARCHES:
                raise SpecError(f"unknown architecture {a!r}",
                                field=f"{field}.architectures[{i}]")
        flags = d.get("flags") or []
        if not isinstance(flags, list) or len(flags) > len(FLAGS):
            raise SpecError("must be an array of flags", field=f"{field}.flags")
        for i, f in enumerate(flags):
            if f not in FLAGS:
                raise SpecError(f"unsupported seccomp flag {f!r}", field=f"{field}.flags[{i}]")
        if d.get("listenerPath"):
            raise SpecError("seccomp user notification is not supported",
                            field=f"{field}.listenerPath")
        rules = d.get("syscalls") or []
        if not isinstance(rules, list) or len(rules) > MAX_SYSCALL_RULES:
            raise SpecError(f"must be an array of at most {MAX_SYSCALL_RULES} rules",
                            field=f"{field}.syscalls")
        return cls(
            default_action=_action(d.get("defaultAction"), f"{field}.defaultAction"),
            default_errno_ret=_int(d, "defaultErrnoRet", field, 0, MAX_ERRNO),
            architectures=tuple(arches),
            flags=tuple(flags),
            syscalls=tuple(SyscallRule.from_oci(r, f"{field}.syscalls[{i}]")
                           for i, r in enumerate(rules)),
        )

    @property
    def filter_flags(self) -> int:
        """The seccomp(2) flags to pass to ``load_filter``."""
        out = 0
        for f in self.flags:
            out |= FLAGS[f]
        return out


def action_value(action: str, errno_ret: int | None) -> int:
    if action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return RET_KILL_THREAD
    if action == "SCMP_ACT_KILL_PROCESS":
        return RET_KILL_PROCESS
    if action == "SCMP_ACT_TRAP":
        return RET_TRAP
    if action == "SCMP_ACT_ERRNO":
        return RET_ERRNO | ((errno.EPERM if errno_ret is None else errno_ret) & RET_DATA)
    if action == "SCMP_ACT_TRACE":
        return RET_TRACE | ((errno.EPERM if errno_ret is None else errno_ret) & RET_DATA)
    if action == "SCMP_ACT_LOG":
        return RET_LOG
    if action == "SCMP_ACT_ALLOW":
        return RET_ALLOW
    raise SpecError(f"unknown seccomp action {action!r}", field="linux.seccomp")


class _Asm:
    """Classic BPF with symbolic jump targets; conditional jumps must stay within 255."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, str | None, str | None]] = []
        self._labels: dict[str, int] = {}
        self._n = 0

    def new_label(self) -> str:
        self._n += 1
        return f"L{self._n}"

    def label(self, name: str) -> None:
        self._labels[name] = len(self._items)

    def stmt(self, code: int, k: int) -> None:
        self._items.append((code, k & 0xFFFFFFFF, None, None))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        """Conditional jump; None means fall through to the next instruction."""
        self._items.append((code, k & 0xFFFFFFFF, jt, jf))

    def ja(self, target: str) -> None:
        self._items.append((BPF_JA, 0, target, None))

    def assemble(self) -> bytes:
        out = []
        for i, (code, k, jt, jf) in enumerate(self._items):
            def off(label: str | None, i: int = i) -> int:
                if label is None:
                    return 0
                d = self._labels[label] - (i + 1)
                if d < 0:
                    raise HostError("seccomp compiler produced a backward jump")
                return d
            if code == BPF_JA:
                out.append(struct.pack("<HBBI", code, 0, 0, off(jt)))
                continue
            jt_off, jf_off = off(jt), off(jf)
            if jt_off > 255 or jf_off > 255:
                raise SpecError("seccomp rule too large (jump beyond 255 instructions)",
                                field="linux.seccomp")
            out.append(struct.pack("<HBBI", code, jt_off, jf_off, k))
        if len(out) > BPF_MAXINSNS:
            raise SpecError(f"seccomp program has {len(out)} instructions, over "
                            f"{BPF_MAXINSNS}", field="linux.seccomp")
        return b"".join(out)


def _emit_arg(a: _Asm, arg: SeccompArg, fail: str) -> None:
    """Fall through when the condition holds, jump to ``fail`` otherwise."""
    lo_off = OFF_ARGS + 8 * arg.index
    hi_off = lo_off + 4
    ok = a.new_label()
    if arg.op == "SCMP_CMP_MASKED_EQ":
        mask, datum = arg.value, arg.value_two
        a.stmt(BPF_LD_W_ABS, hi_off)
        a.stmt(BPF_ALU_AND_K, mask >> 32)
        a.jump(BPF_JEQ_K, datum >> 32, None, fail)
        a.stmt(BPF_LD_W_ABS, lo_off)
        a.stmt(BPF_ALU_AND_K, mask & 0xFFFFFFFF)
        a.jump(BPF_JEQ_K, datum & 0xFFFFFFFF, None, fail)
        a.label(ok)
        return
    vhi, vlo = arg.value >> 32, arg.value & 0xFFFFFFFF
    a.stmt(BPF_LD_W_ABS, hi_off)
    if arg.op == "SCMP_CMP_EQ":
        a.jump(BPF_JEQ_K, vhi, None, fail)
        a.stmt(BPF_LD_W_ABS, lo_off)
        a.jump(BPF_JEQ_K, vlo, None, fail)
    elif arg.op == "SCMP_CMP_NE":
        a.jump(BPF_JEQ_K, vhi, None, ok)
        a.stmt(BPF_LD_W_ABS, lo_off)
        a.jump(BPF_JEQ_K, vlo, fail, None)
    elif arg.op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        a.jump(BPF_JGT_K, vhi, ok, None)
        a.jump(BPF_JEQ_K, vhi, None, fail)
        a.stmt(BPF_LD_W_ABS, lo_off)
        a.jump(BPF_JGT_K if arg.op == "SCMP_CMP_GT" else BPF_JGE_K, vlo, None, fail)
    elif arg.op in ("SCMP_CMP_LT", "SCMP_CMP_LE"):
        # x < v  <=>  not (x >= v);  x <= v  <=>  not (x > v)
        a.jump(BPF_JGT_K, vhi, fail, None)
        a.jump(BPF_JEQ_K, vhi, None, ok)
        a.stmt(BPF_LD_W_ABS, lo_off)
        a.jump(BPF_JGE_K if arg.op == "SCMP_CMP_LT" else BPF_JGT_K, vlo, fail, None)
    else:
        raise SpecError(f"unknown comparison {arg.op!r}", field="linux.seccomp")
    a.label(ok)


def _condition_sets(args: tuple[SeccompArg, ...]) -> list[tuple[SeccompArg, ...]]:
    """All conditions together, or one alternative per condition when an index repeats."""
    if len({x.index for x in args}) == len(args):
        return [args]
    return [(x,) for x in args]


@dataclass(frozen=True, slots=True)
class _Section:
    audit_arch: int
    tables: tuple[Mapping[str, int], ...]
    reject_x32: bool


def _sections(s: Seccomp, machine: str) -> list[_Section]:
    listed = set(s.architectures)
    if machine == "x86_64":
        x32 = "SCMP_ARCH_X32" in listed
        tables: tuple[Mapping[str, int], ...] = (seccomp_tables.X86_64,)
        if x32:
            tables = (seccomp_tables.X86_64, seccomp_tables.X32)
        out = [_Section(AUDIT_ARCH_X86_64, tables, reject_x32=not x32)]
        if "SCMP_ARCH_X86" in listed:
            out.append(_Section(AUDIT_ARCH_I386, (seccomp_tables.I386,), reject_x32=False))
        unsupported = listed - {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"}
    else:
        out = [_Section(AUDIT_ARCH_AARCH64, (seccomp_tables.AARCH64,), reject_x32=False)]
        unsupported = listed - {"SCMP_ARCH_AARCH64"}
    if unsupported:
        log.info("seccomp architectures without a table, their calls get the bad-arch "
                 "action arches=%s", ",".join(sorted(unsupported)))
    return out


def host_machine() -> str:
    return _MACHINES.get(platform.machine(), platform.machine())


def compile_filter(s: Seccomp, arch: str | None = None) -> bytes:
    """The packed ``struct sock_filter`` array for ``s`` on ``arch`` (None: this host)."""
    machine = _MACHINES.get(arch or host_machine())
    if machine is None:
        raise HostError(f"no seccomp support for architecture {arch or platform.machine()}",
                        errno=errno.ENOTSUP)
    default = action_value(s.default_action, s.default_errno_ret)
    a = _Asm()
    sections = _sections(s, machine)
    labels = [a.new_label() for _ in sections]
    a.stmt(BPF_LD_W_ABS, OFF_ARCH)
    for sec, lab in zip(sections, labels, strict=True):
        nxt = a.new_label()
        a.jump(BPF_JEQ_K, sec.audit_arch, None, nxt)
        a.ja(lab)
        a.label(nxt)
    a.stmt(BPF_RET_K, RET_KILL_PROCESS)
    unknown: set[str] = set()
    for sec, lab in zip(sections, labels, strict=True):
        a.label(lab)
        a.stmt(BPF_LD_W_ABS, OFF_NR)
        if sec.reject_x32:
            a.jump(BPF_JGE_K, X32_SYSCALL_BIT, None, "x32_ok_" + lab)
            a.stmt(BPF_RET_K, RET_KILL_PROCESS)
            a.label("x32_ok_" + lab)
        highest = -1
        for rule in s.syscalls:
            ret = action_value(rule.action, rule.errno_ret)
            for name in rule.names:
                nrs = [t[name] for t in sec.tables if name in t]
                if not nrs:
                    unknown.add(name)
                    continue
                for nr in nrs:
                    _emit_rule(a, nr, ret, rule.args)
                    if not nr & X32_SYSCALL_BIT:
                        highest = max(highest, nr)
        if default not in (RET_ALLOW, RET_LOG) and highest >= 0:
            # As runc: a call newer than every call the profile names gets ENOSYS, so
            # libc falls back to an older call instead of failing with the default errno.
            done = a.new_label()
            if not sec.reject_x32 and len(sec.tables) > 1:
                a.jump(BPF_JGE_K, X32_SYSCALL_BIT, done, None)
            a.jump(BPF_JGT_K, highest, None, done)
            a.stmt(BPF_RET_K, RET_ERRNO | errno.ENOSYS)
            a.label(done)
        a.stmt(BPF_RET_K, default)
    if unknown:
        log.info("seccomp syscalls unknown on this architecture skipped machine=%s names=%s",
                 machine, ",".join(sorted(unknown)))
    return a.assemble()


def _emit_rule(a: _Asm, nr: int, ret: int, args: tuple[SeccompArg, ...]) -> None:
    """A holds the syscall number on entry and on exit."""
    if not args:
        nxt = a.new_label()
        a.jump(BPF_JEQ_K, nr, None, nxt)
        a.stmt(BPF_RET_K, ret)
        a.label(nxt)
        return
    for conds in _condition_sets(args):
        reload, nxt = a.new_label(), a.new_label()
        a.jump(BPF_JEQ_K, nr, None, nxt)
        for arg in conds:
            _emit_arg(a, arg, reload)
        a.stmt(BPF_RET_K, ret)
        a.label(reload)
        a.stmt(BPF_LD_W_ABS, OFF_NR)
        a.label(nxt)


def load_filter(prog: bytes, flags: int = 0) -> None:
    """Install ``prog`` for the calling thread (and its future children). The caller has
    set no_new_privs or holds CAP_SYS_ADMIN."""
    try:
        lowlevel.seccomp_set_mode_filter(prog, flags)
    except OSError as e:
        raise HostError(f"seccomp(SECCOMP_SET_MODE_FILTER): {e.strerror}",
                        errno=e.errno or 0) from e
    log.debug("seccomp filter loaded insns=%d flags=%d", len(prog) // 8, flags)


def describe(prog: bytes) -> Sequence[tuple[int, int, int, int]]:
    """The program as (code, jt, jf, k) tuples, for logs and tests."""
    return [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
