"""seccomp filters compiled by the engine, loaded for real in a fresh single-threaded
child process."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kata_agent.engine.seccomp import host_machine

CHILD = r"""
import json, os, signal, sys
from kata_agent.engine import lowlevel, seccomp
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
s = seccomp.Seccomp.from_oci(json.loads(sys.argv[1]))
prog = seccomp.compile_filter(s)
lowlevel.prctl(lowlevel.PR_SET_NO_NEW_PRIVS, 1)
seccomp.load_filter(prog, s.filter_flags)
tmp = sys.argv[2]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
attempt("mkdir", lambda: os.mkdir(os.path.join(tmp, "d")))
attempt("getpid", os.getpid)
attempt("kill0", lambda: os.kill(os.getpid(), 0))
attempt("kill_usr2", lambda: os.kill(os.getpid(), signal.SIGUSR2))
attempt("creat", lambda: os.close(os.open(os.path.join(tmp, "f"), os.O_CREAT | os.O_WRONLY)))
attempt("open_ro", lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)))
out["pid_ok"] = os.getpid() > 0
print(json.dumps(out))
"""

pytestmark = pytest.mark.skipif(host_machine() not in ("x86_64", "aarch64"),
                                reason="host capability missing: x86_64 or aarch64 machine")


def run_child(doc: dict[str, Any], tmp: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), str(tmp)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_mkdir_fails_with_eperm_and_getpid_works(tmp_path: Path) -> None:
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32",
                             "SCMP_ARCH_AARCH64"],
           "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    out = run_child(doc, tmp_path)
    assert out["mkdir"] == errno.EPERM and not (tmp_path / "d").exists()
    assert out["getpid"] == 0 and out["pid_ok"] is True
    assert out["creat"] == 0


def test_argument_conditions(tmp_path: Path) -> None:
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [
               # kill(pid, SIGUSR2) refused, kill(pid, 0) allowed
               {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
                "args": [{"index": 1, "value": 12, "op": "SCMP_CMP_EQ"}]},
               # openat with O_CREAT in its flags refused with EROFS
               {"names": ["openat", "open"], "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EROFS,
                "args": [{"index": 2, "value": 0o100, "valueTwo": 0o100,
                          "op": "SCMP_CMP_MASKED_EQ"}]}]}
    out = run_child(doc, tmp_path)
    assert out["kill0"] == 0 and out["kill_usr2"] == errno.EACCES
    assert out["creat"] == errno.EROFS and out["open_ro"] == 0
    assert out["mkdir"] == 0


def test_default_errno_with_allow_list(tmp_path: Path) -> None:
    # Deny-by-default needs everything the interpreter uses up to the print: allow the
    # whole table except mkdir/mkdirat and let the default answer ENOSYS.
    from kata_agent.engine import seccomp_tables

    table = seccomp_tables.X86_64 if host_machine() == "x86_64" else seccomp_tables.AARCH64
    names = sorted(n for n in table if n not in ("mkdir", "mkdirat"))
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.ENOSYS,
           "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}
    out = run_child(doc, tmp_path)
    assert out["mkdir"] == errno.ENOSYS and out["getpid"] == 0


def test_kill_process_action(tmp_path: Path) -> None:
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -31  # SIGSYS
    assert not (tmp_path / "d").exists()
