"""Services, messages, field numbers and types of the 1.x agent protocol.

The expected tables below restate the wire contract of the Kata 1.x agent
(service and method names, message full names, field numbers, scalar types,
repeated-ness and map entry types). The tests walk the descriptors of the
generated modules and compare them with these tables in both directions, so a
renumbered, retyped, added or removed field fails here.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from kata_agent.protocol import agent_pb2, health_pb2, oci_pb2, types_pb2

EMPTY = "google.protobuf.Empty"

AGENT_METHODS: dict[str, tuple[str, str]] = {
    "CreateContainer": ("grpc.CreateContainerRequest", EMPTY),
    "StartContainer": ("grpc.StartContainerRequest", EMPTY),
    "RemoveContainer": ("grpc.RemoveContainerRequest", EMPTY),
    "ExecProcess": ("grpc.ExecProcessRequest", EMPTY),
    "SignalProcess": ("grpc.SignalProcessRequest", EMPTY),
    "WaitProcess": ("grpc.WaitProcessRequest", "grpc.WaitProcessResponse"),
    "ListProcesses": ("grpc.ListProcessesRequest", "grpc.ListProcessesResponse"),
    "UpdateContainer": ("grpc.UpdateContainerRequest", EMPTY),
    "StatsContainer": ("grpc.StatsContainerRequest", "grpc.StatsContainerResponse"),
    "PauseContainer": ("grpc.PauseContainerRequest", EMPTY),
    "ResumeContainer": ("grpc.ResumeContainerRequest", EMPTY),
    "WriteStdin": ("grpc.WriteStreamRequest", "grpc.WriteStreamResponse"),
    "ReadStdout": ("grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    "ReadStderr": ("grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    "CloseStdin": ("grpc.CloseStdinRequest", EMPTY),
    "TtyWinResize": ("grpc.TtyWinResizeRequest", EMPTY),
    "UpdateInterface": ("grpc.UpdateInterfaceRequest", "types.Interface"),
    "UpdateRoutes": ("grpc.UpdateRoutesRequest", "grpc.Routes"),
    "ListInterfaces": ("grpc.ListInterfacesRequest", "grpc.Interfaces"),
    "ListRoutes": ("grpc.ListRoutesRequest", "grpc.Routes"),
    "AddARPNeighbors": ("grpc.AddARPNeighborsRequest", EMPTY),
    "StartTracing": ("grpc.StartTracingRequest", EMPTY),
    "StopTracing": ("grpc.StopTracingRequest", EMPTY),
    "CreateSandbox": ("grpc.CreateSandboxRequest", EMPTY),
    "DestroySandbox": ("grpc.DestroySandboxRequest", EMPTY),
    "OnlineCPUMem": ("grpc.OnlineCPUMemRequest", EMPTY),
    "ReseedRandomDev": ("grpc.ReseedRandomDevRequest", EMPTY),
    "GetGuestDetails": ("grpc.GuestDetailsRequest", "grpc.GuestDetailsResponse"),
    "MemHotplugByProbe": ("grpc.MemHotplugByProbeRequest", EMPTY),
    "SetGuestDateTime": ("grpc.SetGuestDateTimeRequest", EMPTY),
    "CopyFile": ("grpc.CopyFileRequest", EMPTY),
    "GetOOMEvent": ("grpc.GetOOMEventRequest", "grpc.OOMEvent"),
}

HEALTH_METHODS: dict[str, tuple[str, str]] = {
    "Check": ("grpc.CheckRequest", "grpc.HealthCheckResponse"),
    "Version": ("grpc.CheckRequest", "grpc.VersionCheckResponse"),
}

# Field spec: (number, type, label). type is a scalar name, a message or enum
# full name, or "map<key,value>"; label is "one" or "rep".
Field = tuple[int, str, str]
S, B, BY = "string", "bool", "bytes"
U32, U64, I32, I64 = "uint32", "uint64", "int32", "int64"


def one(number: int, type_: str) -> Field:
    return (number, type_, "one")


def rep(number: int, type_: str) -> Field:
    return (number, type_, "rep")


CID = {"container_id": one(1, S)}
CID_EID = {"container_id": one(1, S), "exec_id": one(2, S)}
_BLKIO_LISTS = (
    "io_service_bytes_recursive", "io_serviced_recursive", "io_queued_recursive",
    "io_service_time_recursive", "io_wait_time_recursive", "io_merged_recursive",
    "io_time_recursive", "sectors_recursive",
)
_NET_COUNTERS = (
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped",
    "tx_bytes", "tx_packets", "tx_errors", "tx_dropped",
)

MESSAGES: dict[str, dict[str, Field]] = {
    # ---- agent.proto: container lifecycle
    "grpc.CreateContainerRequest": {
        **CID_EID,
        "string_user": one(3, "grpc.StringUser"),
        "devices": rep(4, "grpc.Device"),
        "storages": rep(5, "grpc.Storage"),
        "OCI": one(6, "grpc.Spec"),
        "sandbox_pidns": one(7, B),
        "agent_pidns": one(8, B),
    },
    "grpc.StartContainerRequest": CID,
    "grpc.RemoveContainerRequest": {**CID, "timeout": one(2, U32)},
    "grpc.ExecProcessRequest": {
        **CID_EID, "string_user": one(3, "grpc.StringUser"), "process": one(4, "grpc.Process"),
    },
    "grpc.SignalProcessRequest": {**CID_EID, "signal": one(3, U32)},
    "grpc.WaitProcessRequest": CID_EID,
    "grpc.WaitProcessResponse": {"status": one(1, I32)},
    "grpc.ListProcessesRequest": {**CID, "format": one(2, S), "args": rep(3, S)},
    "grpc.ListProcessesResponse": {"process_list": one(1, BY)},
    "grpc.UpdateContainerRequest": {**CID, "resources": one(2, "grpc.LinuxResources")},
    "grpc.StatsContainerRequest": CID,
    "grpc.PauseContainerRequest": CID,
    "grpc.ResumeContainerRequest": CID,
    # ---- agent.proto: statistics
    "grpc.CpuUsage": {
        "total_usage": one(1, U64), "percpu_usage": rep(2, U64),
        "usage_in_kernelmode": one(3, U64), "usage_in_usermode": one(4, U64),
    },
    "grpc.ThrottlingData": {
        "periods": one(1, U64), "throttled_periods": one(2, U64),
        "throttled_time": one(3, U64),
    },
    "grpc.CpuStats": {
        "cpu_usage": one(1, "grpc.CpuUsage"), "throttling_data": one(2, "grpc.ThrottlingData"),
    },
    "grpc.PidsStats": {"current": one(1, U64), "limit": one(2, U64)},
    "grpc.MemoryData": {
        "usage": one(1, U64), "max_usage": one(2, U64),
        "failcnt": one(3, U64), "limit": one(4, U64),
    },
    "grpc.MemoryStats": {
        "cache": one(1, U64),
        "usage": one(2, "grpc.MemoryData"),
        "swap_usage": one(3, "grpc.MemoryData"),
        "kernel_usage": one(4, "grpc.MemoryData"),
        "use_hierarchy": one(5, B),
        "stats": rep(6, "map<string,uint64>"),
    },
    "grpc.BlkioStatsEntry": {
        "major": one(1, U64), "minor": one(2, U64), "op": one(3, S), "value": one(4, U64),
    },
    "grpc.BlkioStats": {
        name: rep(i, "grpc.BlkioStatsEntry") for i, name in enumerate(_BLKIO_LISTS, start=1)
    },
    "grpc.HugetlbStats": {
        "usage": one(1, U64), "max_usage": one(2, U64), "failcnt": one(3, U64),
    },
    "grpc.CgroupStats": {
        "cpu_stats": one(1, "grpc.CpuStats"),
        "memory_stats": one(2, "grpc.MemoryStats"),
        "pids_stats": one(3, "grpc.PidsStats"),
        "blkio_stats": one(4, "grpc.BlkioStats"),
        "hugetlb_stats": rep(5, "map<string,grpc.HugetlbStats>"),
    },
    "grpc.NetworkStats": {
        "name": one(1, S),
        **{name: one(i, U64) for i, name in enumerate(_NET_COUNTERS, start=2)},
    },
    "grpc.StatsContainerResponse": {
        "cgroup_stats": one(1, "grpc.CgroupStats"),
        "network_stats": rep(2, "grpc.NetworkStats"),
    },
    # ---- agent.proto: standard I/O
    "grpc.WriteStreamRequest": {**CID_EID, "data": one(3, BY)},
    "grpc.WriteStreamResponse": {"len": one(1, U32)},
    "grpc.ReadStreamRequest": {**CID_EID, "len": one(3, U32)},
    "grpc.ReadStreamResponse": {"data": one(1, BY)},
    "grpc.CloseStdinRequest": CID_EID,
    "grpc.TtyWinResizeRequest": {**CID_EID, "row": one(3, U32), "column": one(4, U32)},
    # ---- agent.proto: sandbox
    "grpc.KernelModule": {"name": one(1, S), "parameters": rep(2, S)},
    "grpc.CreateSandboxRequest": {
        "hostname": one(1, S),
        "dns": rep(2, S),
        "storages": rep(3, "grpc.Storage"),
        "sandbox_pidns": one(4, B),
        "sandbox_id": one(5, S),
        "guest_hook_path": one(6, S),
        "kernel_modules": rep(7, "grpc.KernelModule"),
    },
    "grpc.DestroySandboxRequest": {},
    # ---- agent.proto: network wrappers
    "grpc.Interfaces": {"Interfaces": rep(1, "types.Interface")},
    "grpc.Routes": {"Routes": rep(1, "types.Route")},
    "grpc.UpdateInterfaceRequest": {"interface": one(1, "types.Interface")},
    "grpc.UpdateRoutesRequest": {"routes": one(1, "grpc.Routes")},
    "grpc.ListInterfacesRequest": {},
    "grpc.ListRoutesRequest": {},
    "grpc.ARPNeighbors": {"ARPNeighbors": rep(1, "types.ARPNeighbor")},
    "grpc.AddARPNeighborsRequest": {"neighbors": one(1, "grpc.ARPNeighbors")},
    # ---- agent.proto: guest management
    "grpc.OnlineCPUMemRequest": {
        "wait": one(1, B), "nb_cpus": one(2, U32), "cpu_only": one(3, B),
    },
    "grpc.ReseedRandomDevRequest": {"data": one(2, BY)},
    "grpc.AgentDetails": {
        "version": one(1, S),
        "init_daemon": one(2, B),
        "device_handlers": rep(3, S),
        "storage_handlers": rep(4, S),
        "supports_seccomp": one(5, B),
    },
    "grpc.GuestDetailsRequest": {"mem_block_size": one(1, B), "mem_hotplug_probe": one(2, B)},
    "grpc.GuestDetailsResponse": {
        "mem_block_size_bytes": one(1, U64),
        "agent_details": one(2, "grpc.AgentDetails"),
        "support_mem_hotplug_probe": one(3, B),
    },
    "grpc.MemHotplugByProbeRequest": {"memHotplugProbeAddr": rep(1, U64)},
    "grpc.SetGuestDateTimeRequest": {"Sec": one(1, I64), "Usec": one(2, I64)},
    # ---- agent.proto: storage, devices, users
    "grpc.Storage": {
        "driver": one(1, S),
        "driver_options": rep(2, S),
        "source": one(3, S),
        "fstype": one(4, S),
        "options": rep(5, S),
        "mount_point": one(6, S),
    },
    "grpc.Device": {
        "id": one(1, S),
        "type": one(2, S),
        "vm_path": one(3, S),
        "container_path": one(4, S),
        "options": rep(5, S),
    },
    "grpc.StringUser": {"uid": one(1, S), "gid": one(2, S), "additionalGids": rep(3, S)},
    "grpc.CopyFileRequest": {
        "path": one(1, S),
        "file_size": one(2, I64),
        "file_mode": one(3, U32),
        "dir_mode": one(4, U32),
        "uid": one(5, I32),
        "gid": one(6, I32),
        "offset": one(7, I64),
        "data": one(8, BY),
    },
    # ---- agent.proto: tracing and OOM
    "grpc.StartTracingRequest": {},
    "grpc.StopTracingRequest": {},
    "grpc.GetOOMEventRequest": {},
    "grpc.OOMEvent": CID,
    # ---- types.proto
    "types.IPAddress": {
        "family": one(1, "types.IPFamily"), "address": one(2, S), "mask": one(3, S),
    },
    "types.Interface": {
        "device": one(1, S),
        "name": one(2, S),
        "IPAddresses": rep(3, "types.IPAddress"),
        "mtu": one(4, U64),
        "hwAddr": one(5, S),
        "pciPath": one(6, S),
        "type": one(7, S),
        "raw_flags": one(8, U32),
    },
    "types.Route": {
        "dest": one(1, S),
        "gateway": one(2, S),
        "device": one(3, S),
        "source": one(4, S),
        "scope": one(5, U32),
    },
    "types.ARPNeighbor": {
        "toIPAddress": one(1, "types.IPAddress"),
        "device": one(2, S),
        "lladdr": one(3, S),
        "state": one(4, I32),
        "flags": one(5, I32),
    },
    # ---- oci.proto
    "grpc.Spec": {
        "Version": one(1, S),
        "Process": one(2, "grpc.Process"),
        "Root": one(3, "grpc.Root"),
        "Hostname": one(4, S),
        "Mounts": rep(5, "grpc.Mount"),
        "Hooks": one(6, "grpc.Hooks"),
        "Annotations": rep(7, "map<string,string>"),
        "Linux": one(8, "grpc.Linux"),
        "Solaris": one(9, "grpc.Solaris"),
        "Windows": one(10, "grpc.Windows"),
    },
    "grpc.Process": {
        "Terminal": one(1, B),
        "ConsoleSize": one(2, "grpc.Box"),
        "User": one(3, "grpc.User"),
        "Args": rep(4, S),
        "Env": rep(5, S),
        "Cwd": one(6, S),
        "Capabilities": one(7, "grpc.LinuxCapabilities"),
        "Rlimits": rep(8, "grpc.POSIXRlimit"),
        "NoNewPrivileges": one(9, B),
        "ApparmorProfile": one(10, S),
        "OOMScoreAdj": one(11, I64),
        "SelinuxLabel": one(12, S),
    },
    "grpc.Box": {"Height": one(1, U32), "Width": one(2, U32)},
    "grpc.User": {
        "UID": one(1, U32), "GID": one(2, U32),
        "AdditionalGids": rep(3, U32), "Username": one(4, S),
    },
    "grpc.LinuxCapabilities": {
        "Bounding": rep(1, S), "Effective": rep(2, S), "Inheritable": rep(3, S),
        "Permitted": rep(4, S), "Ambient": rep(5, S),
    },
    "grpc.POSIXRlimit": {"Type": one(1, S), "Hard": one(2, U64), "Soft": one(3, U64)},
    "grpc.Mount": {
        "destination": one(1, S), "source": one(2, S), "type": one(3, S), "options": rep(4, S),
    },
    "grpc.Root": {"Path": one(1, S), "Readonly": one(2, B)},
    "grpc.Hooks": {
        "Prestart": rep(1, "grpc.Hook"),
        "Poststart": rep(2, "grpc.Hook"),
        "Poststop": rep(3, "grpc.Hook"),
    },
    "grpc.Hook": {
        "Path": one(1, S), "Args": rep(2, S), "Env": rep(3, S), "Timeout": one(4, I64),
    },
    "grpc.Linux": {
        "UIDMappings": rep(1, "grpc.LinuxIDMapping"),
        "GIDMappings": rep(2, "grpc.LinuxIDMapping"),
        "Sysctl": rep(3, "map<string,string>"),
        "Resources": one(4, "grpc.LinuxResources"),
        "CgroupsPath": one(5, S),
        "Namespaces": rep(6, "grpc.LinuxNamespace"),
        "Devices": rep(7, "grpc.LinuxDevice"),
        "Seccomp": one(8, "grpc.LinuxSeccomp"),
        "RootfsPropagation": one(9, S),
        "MaskedPaths": rep(10, S),
        "ReadonlyPaths": rep(11, S),
        "MountLabel": one(12, S),
        "IntelRdt": one(13, "grpc.LinuxIntelRdt"),
    },
    "grpc.Windows": {"dummy": one(1, S)},
    "grpc.Solaris": {"dummy": one(1, S)},
    "grpc.LinuxIDMapping": {"HostID": one(1, U32), "ContainerID": one(2, U32), "Size": one(3, U32)},
    "grpc.LinuxNamespace": {"Type": one(1, S), "Path": one(2, S)},
    "grpc.LinuxDevice": {
        "Path": one(1, S),
        "Type": one(2, S),
        "Major": one(3, I64),
        "Minor": one(4, I64),
        "FileMode": one(5, U32),
        "UID": one(6, U32),
        "GID": one(7, U32),
    },
    "grpc.LinuxResources": {
        "Devices": rep(1, "grpc.LinuxDeviceCgroup"),
        "Memory": one(2, "grpc.LinuxMemory"),
        "CPU": one(3, "grpc.LinuxCPU"),
        "Pids": one(4, "grpc.LinuxPids"),
        "BlockIO": one(5, "grpc.LinuxBlockIO"),
        "HugepageLimits": rep(6, "grpc.LinuxHugepageLimit"),
        "Network": one(7, "grpc.LinuxNetwork"),
    },
    "grpc.LinuxMemory": {
        "Limit": one(1, I64),
        "Reservation": one(2, I64),
        "Swap": one(3, I64),
        "Kernel": one(4, I64),
        "KernelTCP": one(5, I64),
        "Swappiness": one(6, U64),
        "DisableOOMKiller": one(7, B),
    },
    "grpc.LinuxCPU": {
        "Shares": one(1, U64),
        "Quota": one(2, I64),
        "Period": one(3, U64),
        "RealtimeRuntime": one(4, I64),
        "RealtimePeriod": one(5, U64),
        "Cpus": one(6, S),
        "Mems": one(7, S),
    },
    "grpc.LinuxWeightDevice": {
        "Major": one(1, I64), "Minor": one(2, I64),
        "Weight": one(3, U32), "LeafWeight": one(4, U32),
    },
    "grpc.LinuxThrottleDevice": {"Major": one(1, I64), "Minor": one(2, I64), "Rate": one(3, U64)},
    "grpc.LinuxBlockIO": {
        "Weight": one(1, U32),
        "LeafWeight": one(2, U32),
        "WeightDevice": rep(3, "grpc.LinuxWeightDevice"),
        "ThrottleReadBpsDevice": rep(4, "grpc.LinuxThrottleDevice"),
        "ThrottleWriteBpsDevice": rep(5, "grpc.LinuxThrottleDevice"),
        "ThrottleReadIOPSDevice": rep(6, "grpc.LinuxThrottleDevice"),
        "ThrottleWriteIOPSDevice": rep(7, "grpc.LinuxThrottleDevice"),
    },
    "grpc.LinuxPids": {"Limit": one(1, I64)},
    "grpc.LinuxDeviceCgroup": {
        "Allow": one(1, B),
        "Type": one(2, S),
        "Major": one(3, I64),
        "Minor": one(4, I64),
        "Access": one(5, S),
    },
    "grpc.LinuxNetwork": {
        "ClassID": one(1, U32), "Priorities": rep(2, "grpc.LinuxInterfacePriority"),
    },
    "grpc.LinuxHugepageLimit": {"Pagesize": one(1, S), "Limit": one(2, U64)},
    "grpc.LinuxInterfacePriority": {"Name": one(1, S), "Priority": one(2, U32)},
    # 1.x numbering (the Rust agent moved Syscalls and Args to 4).
    "grpc.LinuxSeccomp": {
        "DefaultAction": one(1, S),
        "Architectures": rep(2, S),
        "Syscalls": rep(3, "grpc.LinuxSyscall"),
    },
    "grpc.LinuxSeccompArg": {
        "Index": one(1, U64), "Value": one(2, U64), "ValueTwo": one(3, U64), "Op": one(4, S),
    },
    "grpc.LinuxSyscall": {
        "Names": rep(1, S), "Action": one(2, S), "Args": rep(3, "grpc.LinuxSeccompArg"),
    },
    "grpc.LinuxIntelRdt": {"L3CacheSchema": one(1, S)},
    # ---- health.proto
    "grpc.CheckRequest": {"service": one(1, S)},
    "grpc.HealthCheckResponse": {"status": one(1, "grpc.HealthCheckResponse.ServingStatus")},
    "grpc.VersionCheckResponse": {"grpc_version": one(1, S), "agent_version": one(2, S)},
}

ENUMS: dict[str, dict[str, int]] = {
    "types.IPFamily": {"v4": 0, "v6": 1},
    "grpc.HealthCheckResponse.ServingStatus": {"UNKNOWN": 0, "SERVING": 1, "NOT_SERVING": 2},
}

FILES: dict[str, FileDescriptor] = {
    "agent": agent_pb2.DESCRIPTOR,
    "oci": oci_pb2.DESCRIPTOR,
    "health": health_pb2.DESCRIPTOR,
    "types": types_pb2.DESCRIPTOR,
}

_SCALAR_NAMES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
}


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        assert entry is not None
        if entry.GetOptions().map_entry:
            key = entry.fields_by_name["key"]
            value = entry.fields_by_name["value"]
            # Map entries are key = 1, value = 2 on the wire.
            assert (key.number, value.number) == (1, 2)
            return f"map<{_type_name(key)},{_type_name(value)}>"
        return entry.full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return field.enum_type.full_name
    return _SCALAR_NAMES.get(field.type, f"unexpected type {field.type}")


def _describe(message: Descriptor) -> dict[str, Field]:
    return {
        f.name: (f.number, _type_name(f), "rep" if f.is_repeated else "one")
        for f in message.fields
    }


def _all_messages() -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}

    def walk(message: Descriptor) -> None:
        if message.GetOptions().map_entry:
            return
        found[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)

    for file in FILES.values():
        for message in file.message_types_by_name.values():
            walk(message)
    return found


def test_packages_and_syntax() -> None:
    assert {name: f.package for name, f in FILES.items()} == {
        "agent": "grpc", "oci": "grpc", "health": "grpc", "types": "types",
    }
    assert agent_pb2.DESCRIPTOR.name == "kata_agent/protocol/agent.proto"
    assert [d.name for d in agent_pb2.DESCRIPTOR.dependencies] == [
        "google/protobuf/empty.proto",
        "kata_agent/protocol/oci.proto",
        "kata_agent/protocol/types.proto",
    ]


def test_agent_service_methods() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert service.full_name == "grpc.AgentService"
    actual = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert actual == AGENT_METHODS
    assert len(service.methods) == 32
    assert all(not m.client_streaming and not m.server_streaming for m in service.methods)


def test_health_service_methods() -> None:
    assert list(health_pb2.DESCRIPTOR.services_by_name) == ["Health"]
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert service.full_name == "grpc.Health"
    actual = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert actual == HEALTH_METHODS


def test_no_other_services() -> None:
    services = {s.full_name for f in FILES.values() for s in f.services_by_name.values()}
    assert services == {"grpc.AgentService", "grpc.Health"}


def test_every_message_is_in_the_table_and_nothing_else() -> None:
    assert sorted(_all_messages()) == sorted(MESSAGES)


def test_field_numbers_types_and_labels() -> None:
    messages = _all_messages()
    mismatches = {
        name: {"expected": expected, "actual": _describe(messages[name])}
        for name, expected in MESSAGES.items()
        if _describe(messages[name]) != expected
    }
    assert mismatches == {}


def test_repeated_numeric_scalars_are_packed() -> None:
    packed = {
        f"{name}.{f.name}"
        for name, message in _all_messages().items()
        for f in message.fields
        if f.is_repeated and f.is_packed
    }
    assert packed == {
        "grpc.CpuUsage.percpu_usage",
        "grpc.User.AdditionalGids",
        "grpc.MemHotplugByProbeRequest.memHotplugProbeAddr",
    }


def test_enums() -> None:
    pool_enums = {
        "types.IPFamily": types_pb2.DESCRIPTOR.enum_types_by_name["IPFamily"],
        "grpc.HealthCheckResponse.ServingStatus": health_pb2.HealthCheckResponse.DESCRIPTOR
        .enum_types_by_name["ServingStatus"],
    }
    actual = {
        name: {v.name: v.number for v in enum.values} for name, enum in pool_enums.items()
    }
    assert actual == ENUMS
    assert list(types_pb2.DESCRIPTOR.enum_types_by_name) == ["IPFamily"]
    for file in (agent_pb2.DESCRIPTOR, oci_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        assert list(file.enum_types_by_name) == []


def test_the_1x_numbering_where_the_rust_agent_differs() -> None:
    create = agent_pb2.CreateContainerRequest.DESCRIPTOR.fields_by_number[8]
    assert (create.name, create.type) == ("agent_pidns", FieldDescriptor.TYPE_BOOL)
    seccomp = oci_pb2.LinuxSeccomp.DESCRIPTOR.fields_by_number[3]
    assert seccomp.message_type is not None
    assert (seccomp.name, seccomp.message_type.full_name) == ("Syscalls", "grpc.LinuxSyscall")
    syscall = oci_pb2.LinuxSyscall.DESCRIPTOR.fields_by_number[3]
    assert syscall.message_type is not None
    assert (syscall.name, syscall.message_type.full_name) == ("Args", "grpc.LinuxSeccompArg")
    assert 1 not in agent_pb2.ReseedRandomDevRequest.DESCRIPTOR.fields_by_number
