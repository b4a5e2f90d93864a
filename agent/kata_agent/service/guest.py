"""grpc.AgentService guest RPCs: OnlineCPUMem, MemHotplugByProbe, ReseedRandomDev,
GetGuestDetails, SetGuestDateTime, CopyFile, StartTracing, StopTracing.

The edge only converts: protobuf request -> dataclasses -> ``guest.GuestOps`` -> reply.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from kata_agent import guest
from kata_agent.guest import (
    CopyFileRequest,
    GuestDetails,
    GuestDetailsRequest,
    GuestOps,
    OnlineCPUMemRequest,
)
from kata_agent.protocol import agent_pb2
from kata_agent.server import RpcError, StatusCode

TRACING_MESSAGE = "tracing is not built into this agent"


def details_to_pb(details: GuestDetails) -> Any:
    agent = details.agent_details
    return agent_pb2.GuestDetailsResponse(
        mem_block_size_bytes=details.mem_block_size_bytes,
        support_mem_hotplug_probe=details.support_mem_hotplug_probe,
        agent_details=agent_pb2.AgentDetails(
            version=agent.version, init_daemon=agent.init_daemon,
            device_handlers=list(agent.device_handlers),
            storage_handlers=list(agent.storage_handlers),
            supports_seccomp=agent.supports_seccomp,
        ),
    )


def copy_request_from_pb(msg: Any) -> CopyFileRequest:
    return CopyFileRequest(path=msg.path, file_size=msg.file_size, file_mode=msg.file_mode,
                           dir_mode=msg.dir_mode, uid=msg.uid, gid=msg.gid, offset=msg.offset,
                           data=bytes(msg.data))


class GuestService:
    def __init__(self, ops: GuestOps) -> None:
        self.ops = ops

    def OnlineCPUMem(self, request: Any, context: Any) -> Any:
        self.ops.online_cpu_mem(OnlineCPUMemRequest(wait=request.wait, nb_cpus=request.nb_cpus,
                                                    cpu_only=request.cpu_only))
        return empty_pb2.Empty()

    def MemHotplugByProbe(self, request: Any, context: Any) -> Any:
        addrs = request.memHotplugProbeAddr
        if len(addrs) > guest.MAX_PROBE_ADDRESSES:
            raise RpcError(StatusCode.INVALID_ARGUMENT,
                           f"memHotplugProbeAddr: more than {guest.MAX_PROBE_ADDRESSES}")
        self.ops.mem_hotplug_by_probe(list(addrs))
        return empty_pb2.Empty()

    def ReseedRandomDev(self, request: Any, context: Any) -> Any:
        self.ops.reseed_random_dev(bytes(request.data))
        return empty_pb2.Empty()

    def GetGuestDetails(self, request: Any, context: Any) -> Any:
        return details_to_pb(self.ops.guest_details(GuestDetailsRequest(
            mem_block_size=request.mem_block_size,
            mem_hotplug_probe=request.mem_hotplug_probe)))

    def SetGuestDateTime(self, request: Any, context: Any) -> Any:
        self.ops.set_guest_datetime(request.Sec, request.Usec)
        return empty_pb2.Empty()

    def CopyFile(self, request: Any, context: Any) -> Any:
        self.ops.copy_file(copy_request_from_pb(request))
        return empty_pb2.Empty()

    def StartTracing(self, request: Any, context: Any) -> Any:
        raise RpcError(StatusCode.FAILED_PRECONDITION, TRACING_MESSAGE)

    def StopTracing(self, request: Any, context: Any) -> Any:
        raise RpcError(StatusCode.FAILED_PRECONDITION, TRACING_MESSAGE)
