"""A real agent process reached through each channel, as a host runtime reaches it.

The unix-serial channel runs exactly the serial code path (a yamux server on a byte
stream), so these tests drive the same code a VM runs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from kata_agent.bridge import YamuxBridge
from kata_agent.host.client import AgentClient
from kata_agent.host.proxy import Proxy
from kata_agent.protocol import health_pb2, health_pb2_grpc

from tests.agent_process import AgentProcess, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
HEADER = struct.Struct(">BBHII")
SYN, ACK, FIN, RST = 1, 2, 4, 8
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path, f"unix-serial:{tmp_path / 'serial.sock'}")
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log_text()
    # The private backend directory is removed on a clean stop.
    assert list((tmp_path / "run").iterdir()) == []


def serial_path(agent: AgentProcess) -> str:
    return agent.channel.partition(":")[2]


def check(client: AgentClient) -> int:
    return int(client.health.Check(health_pb2.CheckRequest(), timeout=20).status)


def test_health_check_through_yamux(agent: AgentProcess) -> None:
    with AgentClient(f"unix-serial:{serial_path(agent)}") as client:
        assert check(client) == SERVING
        version = client.health.Version(health_pb2.CheckRequest(), timeout=20)
        assert version.grpc_version == "0.0.1"
        assert version.agent_version
    assert "host connected" in agent.log_text()


def test_proxy_serves_twenty_concurrent_clients(agent: AgentProcess, tmp_path: Path) -> None:
    listen = str(tmp_path / "proxy.sock")
    proxy = Proxy(serial_path(agent), [listen])
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(proxy.run()), daemon=True)
    runner.start()
    try:

        def one_client(i: int) -> list[int]:
            # A private subchannel pool: one connection (one yamux stream) per client.
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"unix:{listen}", options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return [
                    int(
                        stub.Check(
                            health_pb2.CheckRequest(), timeout=30, wait_for_ready=True
                        ).status
                    )
                    for _ in range(5)
                ]

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(one_client, range(20)))
        assert answers == [[SERVING] * 5] * 20
        # All twenty clients shared the one serial connection: one session, many streams.
        assert proxy.bridge.stats["streams_total"] >= 20
        log = agent.log_text()
        assert "session=1" in log and "session=2" not in log
    finally:
        proxy.close()
        runner.join(timeout=10)
    assert result, "proxy did not stop"


def _read_frames(
    sock: socket.socket, timeout: float = 15.0
) -> list[tuple[int, int, int, int, bytes]]:
    """Read frames until the peer closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    frames = []
    while len(data) >= HEADER.size:
        version, kind, flags, stream, length = HEADER.unpack_from(data)
        body_len = length if kind == 0 else 0
        frames.append((version, kind, flags, stream, data[HEADER.size : HEADER.size + body_len]))
        data = data[HEADER.size + body_len :]
    return frames


def test_malformed_frame_closes_only_that_connection(agent: AgentProcess) -> None:
    path = serial_path(agent)
    with AgentClient(f"unix-serial:{path}") as good:
        assert check(good) == SERVING
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(path)
            bad.sendall(HEADER.pack(1, 0, 0, 1, 0))  # version 1 does not exist
            frames = _read_frames(bad)
        # The agent answered with GoAway(protocol error) and closed that connection.
        assert (0, 3, 0, 0, b"") in [(v, k, f, s, b) for v, k, f, s, b in frames]
        assert any(k == 3 for _, k, _, _, _ in frames)
        goaway = next(f for f in frames if f[1] == 3)
        assert goaway[3] == 0
        wait_for(lambda: "PROTOCOL_ERROR" in agent.log_text(), what="a log line for the bad frame")
        # The other connection keeps being served.
        assert check(good) == SERVING


def test_garbage_http2_preface_closes_that_stream(agent: AgentProcess) -> None:
    path = serial_path(agent)
    with AgentClient(f"unix-serial:{path}") as good:
        assert check(good) == SERVING
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            garbage = b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n"
            raw.sendall(
                HEADER.pack(0, 1, SYN, 1, 0) + HEADER.pack(0, 0, 0, 1, len(garbage)) + garbage
            )
            raw.settimeout(15)
            data = b""
            closed = False
            while not closed:
                chunk = raw.recv(65536)
                assert chunk, "agent closed the whole session for one bad stream"
                data += chunk
                offset = 0
                while len(data) - offset >= HEADER.size:
                    _, kind, flags, stream, length = HEADER.unpack_from(data, offset)
                    size = HEADER.size + (length if kind == 0 else 0)
                    if len(data) - offset < size:
                        break
                    if stream == 1 and flags & (FIN | RST):
                        closed = True
                    offset += size
        wait_for(
            lambda: "stream=1 reason=bad-preface" in agent.log_text(),
            what="a log line for the bad stream",
        )
        assert check(good) == SERVING


def test_ctl_commands_and_exit_codes(agent: AgentProcess, tmp_path: Path) -> None:
    addr = f"unix-serial:{serial_path(agent)}"

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kata_agent.host.ctl", "--timeout", "20", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = ctl("--addr", addr, "check")
    assert ok.returncode == 0, ok.stderr
    assert '"status": "SERVING"' in ok.stdout
    version = ctl("--addr", addr, "version")
    assert version.returncode == 0 and '"grpc_version": "0.0.1"' in version.stdout
    generic = ctl("--addr", addr, "call", "grpc.Health/Check", "--json", '{"service": ""}')
    assert generic.returncode == 0 and "SERVING" in generic.stdout
    not_found = ctl("--addr", addr, "call", "StartContainer", "--json", '{"container_id": "nope"}')
    assert not_found.returncode == grpc.StatusCode.NOT_FOUND.value[0]
    assert "NOT_FOUND" in not_found.stderr
    bad_json = ctl("--addr", addr, "call", "StartContainer", "--json", '{"container_id": 5, ')
    assert bad_json.returncode == 2 and "bad JSON" in bad_json.stderr
    unknown_field = ctl("--addr", addr, "call", "StartContainer", "--json", '{"nope": 1}')
    assert unknown_field.returncode == 2
    unknown = ctl("--addr", addr, "call", "NoSuchMethod")
    assert unknown.returncode == 2 and "unknown method" in unknown.stderr
    missing = ctl("--addr", f"unix-serial:{tmp_path / 'absent.sock'}", "check")
    assert missing.returncode == grpc.StatusCode.UNAVAILABLE.value[0]
    methods = ctl("methods")
    assert methods.returncode == 0
    assert len(methods.stdout.splitlines()) == 34


def test_plain_unix_channel(tmp_path: Path) -> None:
    path = tmp_path / "plain.sock"
    agent = AgentProcess(tmp_path, f"unix:{path}")
    try:
        agent.wait_ready()
        with AgentClient(f"unix:{path}") as client:
            assert check(client) == SERVING
    finally:
        assert agent.stop() == 0


def test_vsock_channel_listens(tmp_path: Path) -> None:
    port = 20000 + os.getpid() % 20000
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.bind((socket.VMADDR_CID_ANY, port))
        probe.close()
    except OSError as err:
        pytest.skip(f"host capability missing: AF_VSOCK bind ({err})")
    agent = AgentProcess(tmp_path, f"vsock:{port}")
    try:
        agent.wait_ready()
        assert f"listening on vsock port={port}" in agent.log_text()
        # The agent holds the port: a second bind fails.
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as other:
            with pytest.raises(OSError) as caught:
                other.bind((socket.VMADDR_CID_ANY, port))
            assert caught.value.errno == errno.EADDRINUSE
    finally:
        assert agent.stop() == 0


def test_serial_channel_on_a_pty(tmp_path: Path) -> None:
    """A pty stands in for the virtio-serial port (as for the 1.x agent's benchmarks)."""
    master, slave = os.openpty()
    tty.setraw(master)
    slave_path = os.ttyname(slave)
    agent = AgentProcess(tmp_path, f"serial:{slave_path}")
    os.close(slave)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local = str(tmp_path / "local.sock")
    listener.bind(local)
    listener.listen(8)
    os.set_blocking(master, False)
    bridge = YamuxBridge(master, "client", ping_interval=1.0)
    bridge.add_listener(listener)
    runner = threading.Thread(target=bridge.run, daemon=True)
    try:
        agent.wait_ready()
        runner.start()
        with grpc.insecure_channel(f"unix:{local}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.CheckRequest(), timeout=30, wait_for_ready=True
            )
        assert reply.status == SERVING
        assert f"serial port opened path={slave_path}" in agent.log_text()
    finally:
        bridge.close()
        runner.join(timeout=10)
        listener.close()
        os.close(master)
        assert agent.stop() == 0
