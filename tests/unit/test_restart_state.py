"""The pieces an agent restart relies on: the notification protocol (against a real
datagram socket standing in for the service manager), the journal, and pipe ends taken
back as process streams."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from kata_agent import sdnotify
from kata_agent.iostreams import ProcessIO, StreamEOF
from kata_agent.persist import Keeper


@pytest.fixture
def manager(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(5)
    return s


def test_notifier_stores_removes_and_reports_ready(tmp_path: Path,
                                                   manager: socket.socket) -> None:
    n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert n.enabled
    r, w = os.pipe()
    try:
        assert n.store("p1.stdout", [r])
        msg, fds, _, _ = socket.recv_fds(manager, 1024, 4)
        assert msg == b"FDSTORE=1\nFDNAME=p1.stdout" and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # a duplicate of the very pipe
        os.close(fds[0])
        assert n.remove("p1.stdout")
        assert manager.recv(1024) == b"FDSTOREREMOVE=1\nFDNAME=p1.stdout"
        assert n.ready("serving")
        assert manager.recv(1024) == b"READY=1\nSTATUS=serving"
    finally:
        os.close(r)
        os.close(w)
        n.close()


def test_notifier_refuses_bad_names_and_is_off_without_a_manager(tmp_path: Path) -> None:
    assert not sdnotify.valid_name("a:b")
    assert not sdnotify.valid_name("x" * 256)
    assert not sdnotify.valid_name("")
    assert sdnotify.valid_name("p12.stdin")
    off = sdnotify.Notifier.from_env({})
    assert not off.enabled and not off.ready() and not off.store("p1.stdin", [0])
    relative = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": "relative/path"})
    assert not relative.enabled


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"kata-agent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.ready()
        assert s.recv(64) == b"READY=1"
    finally:
        n.close()
        s.close()


def test_listen_fds_only_for_our_pid_and_by_name() -> None:
    a, b = os.pipe()
    try:
        first = 3
        env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
        assert sdnotify.listen_fds(env) == {}
        assert "LISTEN_FDS" not in env  # removed: children must not take them
        # fds 3.. exist in any test process (pytest holds files open); names map in order.
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2",
               "LISTEN_FDNAMES": "p1.stdout:"}
        got = sdnotify.listen_fds(env, unset=False)
        assert got == {"p1.stdout": [first], "unknown": [first + 1]}
        assert "LISTEN_FDS" in env
        assert sdnotify.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == {}
    finally:
        os.close(a)
        os.close(b)


def test_journal_round_trip_and_refusals(tmp_path: Path) -> None:
    k = Keeper(str(tmp_path / "sandbox.json"), sdnotify.Notifier(None))
    assert k.load() is None
    assert (k.new_key(), k.new_key()) == ("p1", "p2")
    k.save({"sandbox": {"id": "sb"}, "containers": []})
    again = Keeper(str(tmp_path / "sandbox.json"), sdnotify.Notifier(None))
    doc = again.load()
    assert doc is not None and doc["sandbox"] == {"id": "sb"}
    assert again.new_key() == "p3"  # keys are never reused across agents
    (tmp_path / "sandbox.json").write_text(json.dumps({"version": 99}))
    assert again.load() is None
    (tmp_path / "sandbox.json").write_text("{not json")
    assert again.load() is None
    again.clear()
    assert not (tmp_path / "sandbox.json").exists()
    assert os.listdir(tmp_path) == []


def test_process_io_from_kept_pipe_ends() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    io = ProcessIO.from_fds(in_w, out_r, -1)
    try:
        assert set(io.host_fds()) == {"stdin", "stdout", "stderr"}
        io.stdin.write(b"to-process")
        assert os.read(in_r, 64) == b"to-process"
        os.write(out_w, b"from-process")
        os.close(out_w)
        assert io.stdout.read(64) == b"from-process"
        assert io.stderr is not None
        with pytest.raises(StreamEOF):
            io.stderr.read(64)  # closed before the restart: reads as finished
    finally:
        io.close()
        os.close(in_r)
    closed_stdin = ProcessIO.from_fds(-1, -1, -1)
    with pytest.raises(StreamEOF):
        closed_stdin.stdin.write(b"x")
    assert "stdin" not in closed_stdin.host_fds()
    closed_stdin.close()
