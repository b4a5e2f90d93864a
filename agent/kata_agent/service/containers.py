"""grpc.AgentService container RPCs: CreateContainer, StartContainer, RemoveContainer,
UpdateContainer, StatsContainer, PauseContainer, ResumeContainer, ListProcesses.

The edge only converts: protobuf -> typed values (``oci_convert``, storage converters) ->
``Sandbox`` -> protobuf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

from kata_agent import oci_convert
from kata_agent.engine.errors import SpecError
from kata_agent.protocol import agent_pb2
from kata_agent.sandbox import ContainerRequest, NetworkStats, RemoveTimeout, Sandbox
from kata_agent.server import RpcError, StatusCode
from kata_agent.service.storage import devices_from_pb, storages_from_pb

if TYPE_CHECKING:
    # Types only: the stats module loads with the first StatsContainer, not at start-up.
    from kata_agent.engine.cgroups.stats import BlkioStatEntry, CgroupStats


def container_request_from_pb(msg: Any) -> ContainerRequest:
    if not msg.HasField("OCI"):
        raise SpecError("is required", field="OCI")
    if msg.agent_pidns:
        # Joining the agent's own PID namespace would show the agent to the workload.
        raise SpecError("joining the agent's PID namespace is not supported",
                        field="agent_pidns")
    return ContainerRequest(
        container_id=msg.container_id, exec_id=msg.exec_id,
        oci=oci_convert.spec_to_oci(msg.OCI),
        storages=tuple(storages_from_pb(msg.storages)),
        devices=tuple(devices_from_pb(msg.devices)),
        sandbox_pidns=msg.sandbox_pidns,
    )


def _blkio(entries: tuple[BlkioStatEntry, ...]) -> list[Any]:
    return [agent_pb2.BlkioStatsEntry(major=e.major, minor=e.minor, op=e.op, value=e.value)
            for e in entries]


def cgroup_stats_to_pb(s: CgroupStats) -> Any:
    cpu, mem, blk = s.cpu, s.memory, s.blkio

    def memdata(m: Any) -> Any:
        return agent_pb2.MemoryData(usage=m.usage, max_usage=m.max_usage, failcnt=m.failcnt,
                                    limit=m.limit)

    return agent_pb2.CgroupStats(
        cpu_stats=agent_pb2.CpuStats(
            cpu_usage=agent_pb2.CpuUsage(
                total_usage=cpu.cpu_usage.total_usage,
                percpu_usage=list(cpu.cpu_usage.percpu_usage),
                usage_in_kernelmode=cpu.cpu_usage.usage_in_kernelmode,
                usage_in_usermode=cpu.cpu_usage.usage_in_usermode),
            throttling_data=agent_pb2.ThrottlingData(
                periods=cpu.throttling_data.periods,
                throttled_periods=cpu.throttling_data.throttled_periods,
                throttled_time=cpu.throttling_data.throttled_time)),
        memory_stats=agent_pb2.MemoryStats(
            cache=mem.cache, usage=memdata(mem.usage), swap_usage=memdata(mem.swap_usage),
            kernel_usage=memdata(mem.kernel_usage), use_hierarchy=mem.use_hierarchy,
            stats=dict(mem.stats)),
        pids_stats=agent_pb2.PidsStats(current=s.pids.current, limit=s.pids.limit),
        blkio_stats=agent_pb2.BlkioStats(
            io_service_bytes_recursive=_blkio(blk.io_service_bytes_recursive),
            io_serviced_recursive=_blkio(blk.io_serviced_recursive),
            io_queued_recursive=_blkio(blk.io_queued_recursive),
            io_service_time_recursive=_blkio(blk.io_service_time_recursive),
            io_wait_time_recursive=_blkio(blk.io_wait_time_recursive),
            io_merged_recursive=_blkio(blk.io_merged_recursive),
            io_time_recursive=_blkio(blk.io_time_recursive),
            sectors_recursive=_blkio(blk.sectors_recursive)),
        hugetlb_stats={k: agent_pb2.HugetlbStats(usage=v.usage, max_usage=v.max_usage,
                                                 failcnt=v.failcnt)
                       for k, v in s.hugetlb.items()},
    )


def network_stats_to_pb(n: NetworkStats) -> Any:
    return agent_pb2.NetworkStats(
        name=n.name, rx_bytes=n.rx_bytes, rx_packets=n.rx_packets, rx_errors=n.rx_errors,
        rx_dropped=n.rx_dropped, tx_bytes=n.tx_bytes, tx_packets=n.tx_packets,
        tx_errors=n.tx_errors, tx_dropped=n.tx_dropped)


class ContainerService:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def CreateContainer(self, request: Any, context: Any) -> Any:
        self.sandbox.create_container(container_request_from_pb(request))
        return empty_pb2.Empty()

    def StartContainer(self, request: Any, context: Any) -> Any:
        self.sandbox.start_container(request.container_id)
        return empty_pb2.Empty()

    def RemoveContainer(self, request: Any, context: Any) -> Any:
        try:
            self.sandbox.remove_container(request.container_id, timeout=request.timeout)
        except RemoveTimeout as e:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, str(e)) from e
        return empty_pb2.Empty()

    def UpdateContainer(self, request: Any, context: Any) -> Any:
        resources = (oci_convert.resources_to_oci(request.resources)
                     if request.HasField("resources") else {})
        self.sandbox.update_container(request.container_id, resources)
        return empty_pb2.Empty()

    def StatsContainer(self, request: Any, context: Any) -> Any:
        stats, net = self.sandbox.stats_container(request.container_id)
        return agent_pb2.StatsContainerResponse(
            cgroup_stats=cgroup_stats_to_pb(stats),
            network_stats=[network_stats_to_pb(n) for n in net])

    def PauseContainer(self, request: Any, context: Any) -> Any:
        self.sandbox.pause_container(request.container_id)
        return empty_pb2.Empty()

    def ResumeContainer(self, request: Any, context: Any) -> Any:
        self.sandbox.resume_container(request.container_id)
        return empty_pb2.Empty()

    def ListProcesses(self, request: Any, context: Any) -> Any:
        out = self.sandbox.list_processes(request.container_id, request.format,
                                          list(request.args))
        return agent_pb2.ListProcessesResponse(process_list=out)
