"""Container state on disk and the live status derived from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kata_agent.engine import state as st
from kata_agent.engine.errors import AlreadyExistsError, NotFoundError, SpecError


def _state(pid: int, start: int, cid: str = "c1") -> st.ContainerState:
    return st.ContainerState(id=cid, pid=pid, pid_start_time=start, bundle="/b",
                             rootfs="/b/rootfs", status=st.CREATED, created=st.now_rfc3339(),
                             annotations={"a": "b"}, cgroup_paths={"cpu": "/sys/x"},
                             cgroups_path="/kata/c1", config={"ociVersion": "1.0.2"})


def test_round_trip_from_a_new_store(tmp_path: Path) -> None:
    store = st.StateStore(str(tmp_path / "root"))
    store.reserve("c1")
    s = _state(123, 456)
    store.save(s)
    again = st.StateStore(str(tmp_path / "root")).load("c1")
    assert again == s
    assert again.config == {"ociVersion": "1.0.2"}
    assert list(store.ids()) == ["c1"]


def test_reserve_twice_fails(tmp_path: Path) -> None:
    store = st.StateStore(str(tmp_path))
    store.reserve("c1")
    with pytest.raises(AlreadyExistsError):
        store.reserve("c1")


def test_missing_and_bad_ids(tmp_path: Path) -> None:
    store = st.StateStore(str(tmp_path))
    with pytest.raises(NotFoundError):
        store.load("nope")
    with pytest.raises(SpecError):
        store.reserve("../escape")
    assert not (tmp_path.parent / "escape").exists()


def test_live_status_follows_the_process(tmp_path: Path) -> None:
    store = st.StateStore(str(tmp_path))
    store.reserve("c1")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        start = st.pid_start_time(child.pid)
        assert start is not None
        s = _state(child.pid, start)
        open(store.exec_socket("c1"), "w").close()
        assert st.live_status(store, s) == st.CREATED
        os.unlink(store.exec_socket("c1"))
        assert st.live_status(store, s) == st.RUNNING
        assert st.live_status(store, s, frozen=True) == st.PAUSED
        # Same pid, other start time: a recycled pid is not our container.
        assert st.live_status(store, _state(child.pid, start + 1)) == st.STOPPED
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert st.live_status(store, s) == st.STOPPED


def test_oci_state_document() -> None:
    doc = _state(5, 6).oci_state()
    assert doc["id"] == "c1" and doc["status"] == "created" and doc["pid"] == 5
    assert set(doc) >= {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created",
                        "owner", "annotations"}
    stopped = st.with_status(_state(5, 6), st.STOPPED).oci_state()
    assert stopped["pid"] == 0


def test_force_delete_clears_a_half_created_container(tmp_path: Path) -> None:
    from kata_agent.engine.container import Engine

    eng = Engine(str(tmp_path), use_cgroups=False)
    eng.store.reserve("half")  # a create that died before writing its state
    with pytest.raises(NotFoundError):
        eng.delete("half")
    eng.delete("half", force=True)
    assert not (tmp_path / "half").exists()
    with pytest.raises(NotFoundError):
        eng.delete("half", force=True)
