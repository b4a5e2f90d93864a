"""The Engine as the agent uses it: a threaded caller, containers forked by the zygote,
stdio through pipes the caller made."""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kata_agent.engine import Engine, Process, Spec, Stdio
from kata_agent.engine.spec import default_spec
from kata_agent.engine.state import RUNNING, STOPPED
from kata_agent.engine.zygote import ZygoteLauncher

from tests.agent_process import wait_for
from tests.privileged.test_oci_cli import cgroup_dirs, make_rootfs


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    z = ZygoteLauncher.start()
    eng = Engine(str(tmp_path / "state"), launcher=z)
    # The caller has a thread running, as the gRPC agent would.
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        yield eng
    finally:
        for st in eng.list():
            eng.delete(st.id, force=True)
        stop.set()
        z.close()


def _spec(tmp_path: Path, args: list[str]) -> Spec:
    rootfs = tmp_path / "rootfs"
    if not rootfs.exists():
        make_rootfs(rootfs)
    d = default_spec()
    d["process"]["terminal"] = False
    d["process"]["args"] = args
    d["root"]["path"] = str(rootfs)
    return Spec.from_oci(json.loads(json.dumps(d)))


def _read_until_eof(fd: int, timeout: float = 20) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"no EOF on container output; got {out!r}")


def test_create_start_with_pipes_through_zygote(engine: Engine, tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["sh", "-c", "read line; echo got:$line; echo err >&2"])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        st = engine.create("zy1", None, spec, stdio=Stdio(fds=(in_r, out_w, err_w)))
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        assert engine.state("zy1").status == "created"
        engine.start("zy1")
        os.write(in_w, b"ping\n")
        os.close(in_w)
        assert _read_until_eof(out_r) == b"got:ping\n"
        assert _read_until_eof(err_r) == b"err\n"
        wait_for(lambda: engine.state("zy1").status == STOPPED, what="exit")
        engine.delete("zy1")
    finally:
        os.close(out_r)
        os.close(err_r)
    assert engine.list() == []
    assert cgroup_dirs("zy1") == []
    assert st.pid > 0


def test_exec_through_zygote_joins_the_container(engine: Engine, tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["sleep", "1000"])
    null = os.open("/dev/null", os.O_RDWR)
    try:
        engine.create("zy2", None, spec, stdio=Stdio(fds=(null, null, null)))
        engine.start("zy2")
        assert engine.state("zy2").status == RUNNING
        out_r, out_w = os.pipe()
        proc = Process.from_oci({"args": ["sh", "-c", "echo $$; hostname; ls /proc/1/fd"],
                                 "env": ["PATH=/bin"], "cwd": "/"}, "process")
        pid = engine.exec_process("zy2", proc, stdio=Stdio(fds=(null, out_w, out_w)))
        os.close(out_w)
        out = _read_until_eof(out_r).decode().split()
        os.close(out_r)
        assert pid > 0
        assert out[0] != "1" and out[1] == "runc"  # own pid in the container; its hostname
        assert out[2:] == ["0", "1", "2"]
        assert sorted(engine.ps("zy2"))[0] == engine.state("zy2").pid
    finally:
        os.close(null)
    engine.kill("zy2", 9)
    wait_for(lambda: engine.state("zy2").status == STOPPED, what="kill")
    engine.delete("zy2")


def test_update_and_stats(engine: Engine, tmp_path: Path) -> None:
    from kata_agent.engine.resources import LinuxResources

    spec = _spec(tmp_path, ["sleep", "1000"])
    null = os.open("/dev/null", os.O_RDWR)
    try:
        engine.create("zy3", None, spec, stdio=Stdio(fds=(null, null, null)))
    finally:
        os.close(null)
    engine.start("zy3")
    engine.update("zy3", LinuxResources.from_oci({"pids": {"limit": 50}}))
    st = engine.state("zy3")
    pids_dir = st.cgroup_paths.get("pids") or st.cgroup_paths.get("")
    assert pids_dir is not None
    with open(os.path.join(pids_dir, "pids.max")) as f:
        assert f.read().strip() == "50"
    stats = engine.stats("zy3")
    assert stats.pids.current >= 1
    engine.delete("zy3", force=True)
    assert cgroup_dirs("zy3") == []
