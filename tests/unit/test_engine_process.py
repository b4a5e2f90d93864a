"""Launcher messages, errors as data, executable lookup and the sealed interpreter."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from kata_agent.engine import process as proc_mod
from kata_agent.engine.errors import AlreadyExistsError, EngineError, HostError, SpecError
from kata_agent.engine.process import LaunchRequest
from kata_agent.engine.spec import Process


def test_errors_cross_as_data_with_type_and_field() -> None:
    e = proc_mod.error_from_data(proc_mod.error_to_data(
        SpecError("bad", field="mounts[2].type", errno=22)))
    assert isinstance(e, SpecError) and e.field == "mounts[2].type" and e.errno == 22
    e2 = proc_mod.error_from_data(proc_mod.error_to_data(OSError(errno.EPERM, "nope")))
    assert isinstance(e2, HostError) and e2.errno == errno.EPERM
    e3 = proc_mod.error_from_data(proc_mod.error_to_data(AlreadyExistsError("x")))
    assert isinstance(e3, AlreadyExistsError)
    # A kind naming something that is not an engine error falls back to EngineError.
    e4 = proc_mod.error_from_data({"kind": "SystemExit", "msg": "m"})
    assert type(e4) is EngineError


def test_launch_request_round_trip() -> None:
    req = LaunchRequest(kind="create", container_id="c", spec={"a": 1}, process={"args": ["x"]},
                        rootfs="/r", cgroup_procs=("/sys/x/cgroup.procs",),
                        cgroup_paths={"cpu": "/sys/x"}, cgroup_version=1, preserve_fds=2)
    assert LaunchRequest.from_json(req.to_json()) == req
    assert req.fd_count(terminal=False) == 3 + 1 + 2
    assert req.fd_count(terminal=True) == 1 + 2


def test_messages_carry_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        proc_mod.send_msg(a, {"type": "console"}, [w])
        msg, fds = proc_mod.recv_msg(b, maxfds=1)
        assert msg == {"type": "console"} and len(fds) == 1
        os.write(fds[0], b"via-fd")
        assert os.read(r, 10) == b"via-fd"
        os.close(fds[0])
        a.close()
        assert proc_mod.recv_msg(b) == (None, [])
    finally:
        b.close()
        os.close(r)
        os.close(w)


def test_find_executable_uses_container_path(tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (d / "plain").write_text("")
    p = Process.from_oci({"args": ["tool"], "env": [f"PATH=/nonexistent:{d}"]}, "process")
    assert proc_mod.find_executable(p) == str(exe)
    with pytest.raises(SpecError) as ei:
        proc_mod.find_executable(Process.from_oci({"args": ["plain"],
                                                   "env": [f"PATH={d}"]}, "process"))
    assert ei.value.field == "process.args[0]"
    assert proc_mod.find_executable(Process.from_oci({"args": [str(exe)]}, "process")) == \
        str(exe)


def test_sealed_interpreter_copy_is_unwritable() -> None:
    fd = proc_mod.sealed_interpreter_fd()
    try:
        with open("/proc/self/exe", "rb") as f:
            original = hashlib.sha256(f.read()).hexdigest()
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == original
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        # Reopening for writing (what an attacker holding the path would do) gets a
        # writable-looking fd whose writes still fail.
        wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):
                os.write(wfd, b"x")
            with pytest.raises(PermissionError):
                os.ftruncate(wfd, 0)
        finally:
            os.close(wfd)
        assert not os.get_inheritable(fd)
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_reexec_sealed_replaces_exe_with_memfd() -> None:
    code = ("import os, sys\n"
            "from kata_agent.engine import process as p\n"
            "p.reexec_sealed(['-c', 'import os; print(os.readlink(\"/proc/self/exe\"))'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.startswith(f"/memfd:{proc_mod.SEALED_NAME}")


def test_in_process_launcher_refuses_threads() -> None:
    import threading

    from kata_agent.engine.container import InProcessLauncher

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        req = LaunchRequest(kind="create", container_id="c", spec={}, process={})
        with pytest.raises(HostError, match="multi-threaded"):
            InProcessLauncher().launch(req, [])
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize(("key", "field"), [("apparmorProfile", "process.apparmorProfile"),
                                            ("selinuxLabel", "process.selinuxLabel")])
def test_lsm_asked_but_missing_is_a_clear_error(key: str, field: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from kata_agent.engine import syscalls as sc

    monkeypatch.setattr(proc_mod, "APPARMOR_ENABLED", "/nonexistent/apparmor")
    monkeypatch.setattr(proc_mod, "SELINUX_ENFORCE", "/nonexistent/selinux")
    p = Process.from_oci({"args": ["x"], key: "some-profile"}, "process")
    with pytest.raises(SpecError) as ei:
        proc_mod.apply_lsm(sc.Syscalls(), p)
    assert ei.value.field == field
    # Not asked: nothing to do, no error.
    proc_mod.apply_lsm(sc.Syscalls(), Process.from_oci({"args": ["x"]}, "process"))
