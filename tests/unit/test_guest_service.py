"""Guest RPCs through the real gRPC server on a unix socket, against fake sysfs trees."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kata_agent import __version__, server
from kata_agent.guest import GuestOps
from kata_agent.protocol import agent_pb2, names
from kata_agent.service.guest import TRACING_MESSAGE, GuestService


@dataclass
class Served:
    channel: grpc.Channel
    ops: GuestOps
    sysfs: Path
    shared: Path
    clock: list[int]

    def call(self, method: str, request: Any) -> Any:
        info = names.SERVICES["grpc.AgentService"][method]
        rpc = self.channel.unary_unary(
            f"/grpc.AgentService/{method}",
            request_serializer=info.request.SerializeToString,
            response_deserializer=info.response.FromString,
        )
        return rpc(request, timeout=30)

    def status(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.call(method, request)
        err: Any = info.value
        return err.code(), err.details()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    sysfs = tmp_path / "sys"
    for rel, text in [("devices/system/cpu/cpu1/online", "0"),
                      ("devices/system/cpu/online", "0-1"),
                      ("devices/system/memory/memory3/online", "0"),
                      ("devices/system/memory/block_size_bytes", "10000000"),
                      ("devices/system/memory/probe", "")]:
        (sysfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (sysfs / rel).write_text(text)
    shared = tmp_path / "shared"
    clock: list[int] = []
    ops = GuestOps(sysfs=sysfs, shared_dir=shared, storage_handlers=["virtio-fs", "9p"],
                   set_clock_ns=clock.append, online_retry_interval=0.001, online_max_tries=3)
    srv = server.build_server([GuestService(ops)], max_workers=4)
    sock = tmp_path / "agent.sock"
    assert srv.add_insecure_port(f"unix:{sock}") != 0
    srv.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield Served(channel, ops, sysfs, shared, clock)
    finally:
        channel.close()
        srv.stop(grace=None).wait()


def test_copy_file_chunks_through_grpc(served: Served) -> None:
    target = served.shared / "sbx/hostname"
    payload = b"guest-host\n" * 1000
    half = len(payload) // 2
    for off, chunk in ((0, payload[:half]), (half, payload[half:])):
        served.call("CopyFile", agent_pb2.CopyFileRequest(
            path=str(target), file_size=len(payload), file_mode=0o644, dir_mode=0o755,
            uid=-1, gid=-1, offset=off, data=chunk))
    assert target.read_bytes() == payload


@pytest.mark.parametrize("path,code", [
    ("{shared}/../escape", grpc.StatusCode.INVALID_ARGUMENT),
    ("/etc/hostname", grpc.StatusCode.INVALID_ARGUMENT),
    ("relative", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_copy_file_bad_paths(served: Served, path: str, code: grpc.StatusCode) -> None:
    got, _ = served.status("CopyFile", agent_pb2.CopyFileRequest(
        path=path.format(shared=served.shared), file_size=1, data=b"x", uid=-1, gid=-1))
    assert got == code
    assert not (served.shared.parent / "escape").exists()


def test_copy_file_statuses_for_offsets_and_order(served: Served) -> None:
    target = str(served.shared / "f")
    code, _ = served.status("CopyFile", agent_pb2.CopyFileRequest(
        path=target, file_size=4, offset=2, data=b"abcd", uid=-1, gid=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = served.status("CopyFile", agent_pb2.CopyFileRequest(
        path=target, file_size=8, offset=4, data=b"abcd", uid=-1, gid=-1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_copy_file_through_symlink_stays_inside(served: Served, tmp_path: Path) -> None:
    served.shared.mkdir(parents=True, exist_ok=True)
    (served.shared / "link").symlink_to(tmp_path)
    request = agent_pb2.CopyFileRequest(path=f"{served.shared}/link/owned", file_size=1,
                                        data=b"x", uid=-1, gid=-1)
    try:
        served.call("CopyFile", request)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
    else:
        assert (served.shared / str(tmp_path).lstrip("/") / "owned").read_bytes() == b"x"
    assert not (tmp_path / "owned").exists()


def test_tracing_is_refused_clearly(served: Served) -> None:
    for method, req in (("StartTracing", agent_pb2.StartTracingRequest()),
                        ("StopTracing", agent_pb2.StopTracingRequest())):
        code, msg = served.status(method, req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert msg == TRACING_MESSAGE


def test_guest_details(served: Served) -> None:
    reply = served.call("GetGuestDetails", agent_pb2.GuestDetailsRequest(
        mem_block_size=True, mem_hotplug_probe=True))
    assert reply.mem_block_size_bytes == 0x10000000
    assert reply.support_mem_hotplug_probe is True
    assert reply.agent_details.version == __version__
    assert list(reply.agent_details.storage_handlers) == ["9p", "virtio-fs"]


def test_online_cpu_mem_and_probe(served: Served) -> None:
    served.call("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=1))
    mem = served.sysfs / "devices/system/memory"
    assert (served.sysfs / "devices/system/cpu/cpu1/online").read_text() == "1"
    assert (mem / "memory3/online").read_text() == "1"
    code, _ = served.status("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(cpu_only=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    served.call("MemHotplugByProbe",
                agent_pb2.MemHotplugByProbeRequest(memHotplugProbeAddr=[0x240000000]))
    assert (mem / "probe").read_text() == "0x240000000"
    code, _ = served.status("MemHotplugByProbe", agent_pb2.MemHotplugByProbeRequest(
        memHotplugProbeAddr=list(range(2000))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_set_guest_date_time(served: Served) -> None:
    served.call("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(Sec=1_600_000_000, Usec=7))
    assert served.clock == [1_600_000_000_000_007_000]
    code, _ = served.status("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(Sec=-5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_reseed_statuses(served: Served) -> None:
    code, _ = served.status("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=b""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
