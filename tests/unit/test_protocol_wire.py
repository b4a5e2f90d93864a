"""Golden wire bytes, worked out by hand from the protobuf encoding rules.

Each case lists the bytes a Kata 1.x peer puts on the wire for a message.
Encoding rules used: a tag is (field_number << 3) | wire_type with wire type 0
for varints and 2 for length-delimited data; negative int32/int64 values are
ten-byte varints; repeated numeric scalars are packed (one length-delimited
record); a map entry is a nested message with key = 1 and value = 2.
"""

from __future__ import annotations

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from kata_agent.protocol import agent_pb2, health_pb2, oci_pb2, types_pb2


def _process_with_empty_user() -> Message:
    # A Go peer always sends Process.User, even when every field is zero.
    process = oci_pb2.Process()
    process.User.SetInParent()
    return process


GOLDEN: list[tuple[str, Message, bytes]] = [
    # field 2, wire type 2: tag 0x12; length 2; "ab". There is no field 1.
    ("reseed", agent_pb2.ReseedRandomDevRequest(data=b"ab"), b"\x12\x02ab"),
    # field 8 bool: tag 0x40, value 1.
    (
        "create-agent-pidns",
        agent_pb2.CreateContainerRequest(container_id="c", agent_pidns=True),
        b"\x0a\x01c\x40\x01",
    ),
    # field 7 bool after field 6 (OCI, empty but present: tag 0x32, length 0).
    (
        "create-sandbox-pidns",
        agent_pb2.CreateContainerRequest(OCI=oci_pb2.Spec(), sandbox_pidns=True),
        b"\x32\x00\x38\x01",
    ),
    # packed uint64: tag 0x12, length 4, varints 01 02 ac02 (300).
    ("percpu-packed", agent_pb2.CpuUsage(percpu_usage=[1, 2, 300]), b"\x12\x04\x01\x02\xac\x02"),
    ("cpu-total-and-percpu", agent_pb2.CpuUsage(total_usage=1, percpu_usage=[5]),
     b"\x08\x01\x12\x01\x05"),
    # packed uint32: tag 0x1a, length 2, 0x0a 0x14.
    ("additional-gids", oci_pb2.User(AdditionalGids=[10, 20]), b"\x1a\x02\x0a\x14"),
    # 2**32 as varint: 80 80 80 80 10.
    (
        "hotplug-probe",
        agent_pb2.MemHotplugByProbeRequest(memHotplugProbeAddr=[1 << 32]),
        b"\x0a\x05\x80\x80\x80\x80\x10",
    ),
    # map<string,uint64> field 6: tag 0x32, entry {1: "rss", 2: 7}.
    ("memory-stats-map", agent_pb2.MemoryStats(stats={"rss": 7}), b"\x32\x07\x0a\x03rss\x10\x07"),
    # map<string,string> field 7 of Spec: tag 0x3a, entry {1: "a", 2: "b"}.
    ("annotations-map", oci_pb2.Spec(Annotations={"a": "b"}), b"\x3a\x06\x0a\x01a\x12\x01b"),
    # map<string,HugetlbStats> field 5: tag 0x2a, entry {1: "2MB", 2: {1: 1}}.
    (
        "hugetlb-map",
        agent_pb2.CgroupStats(hugetlb_stats={"2MB": agent_pb2.HugetlbStats(usage=1)}),
        b"\x2a\x09\x0a\x032MB\x12\x02\x08\x01",
    ),
    # 1.x seccomp: Syscalls is field 3 of LinuxSeccomp, Args is field 3 of LinuxSyscall.
    (
        "seccomp-1x",
        oci_pb2.LinuxSeccomp(
            Syscalls=[
                oci_pb2.LinuxSyscall(Names=["read"], Args=[oci_pb2.LinuxSeccompArg(Index=1)])
            ]
        ),
        b"\x1a\x0a\x0a\x04read\x1a\x02\x08\x01",
    ),
    ("ip-address", types_pb2.IPAddress(family=types_pb2.v6, address="::1", mask="128"),
     b"\x08\x01\x12\x03::1\x1a\x03128"),
    (
        "health-serving",
        health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING),
        b"\x08\x01",
    ),
    ("version", health_pb2.VersionCheckResponse(grpc_version="0.0.1"), b"\x0a\x050.0.1"),
    # int32 -1 is sign-extended to a ten-byte varint.
    ("wait-status-negative", agent_pb2.WaitProcessResponse(status=-1),
     b"\x08" + b"\xff" * 9 + b"\x01"),
    ("date-time", agent_pb2.SetGuestDateTimeRequest(Sec=1, Usec=2), b"\x08\x01\x10\x02"),
    ("empty-user", _process_with_empty_user(), b"\x1a\x00"),
    ("empty", empty_pb2.Empty(), b""),
    ("destroy-sandbox", agent_pb2.DestroySandboxRequest(), b""),
    # zero scalars are not sent at all (no presence in proto3).
    ("zero-is-absent", oci_pb2.LinuxDeviceCgroup(Allow=False, Major=0, Access=""), b""),
    # field 8 bytes of CopyFileRequest: tag 0x42.
    ("copy-file", agent_pb2.CopyFileRequest(path="/run/x", offset=3, data=b"z"),
     b"\x0a\x06/run/x\x38\x03\x42\x01z"),
    (
        "update-routes",
        agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="default", scope=253)])
        ),
        # routes{ Routes{ dest "default", scope 253 = fd 01 } }
        b"\x0a\x0e\x0a\x0c\x0a\x07default\x28\xfd\x01",
    ),
]


@pytest.mark.parametrize(("message", "wire"), [(m, w) for _, m, w in GOLDEN],
                         ids=[name for name, _, _ in GOLDEN])
def test_encoding_matches_the_hand_computed_bytes(message: Message, wire: bytes) -> None:
    assert message.SerializeToString(deterministic=True) == wire


@pytest.mark.parametrize(("message", "wire"), [(m, w) for _, m, w in GOLDEN],
                         ids=[name for name, _, _ in GOLDEN])
def test_decoding_the_hand_computed_bytes(message: Message, wire: bytes) -> None:
    decoded = type(message).FromString(wire)
    assert decoded == message


def test_decoded_empty_submessage_is_present() -> None:
    process = oci_pb2.Process.FromString(b"\x1a\x00")
    assert process.HasField("User")
    assert not oci_pb2.Process.FromString(b"").HasField("User")


# ---- packed and unpacked repeated scalars ----

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _unpacked(field: int, values: list[int]) -> bytes:
    return b"".join(_varint(field << 3) + _varint(v) for v in values)


def _packed(field: int, values: list[int]) -> bytes:
    body = b"".join(_varint(v) for v in values)
    return _varint((field << 3) | 2) + _varint(len(body)) + body


def test_unpacked_repeated_scalars_decode() -> None:
    # tag 0x10 = field 2, wire type 0, once per element.
    usage = agent_pb2.CpuUsage.FromString(b"\x10\x01\x10\x02\x10\xac\x02")
    assert list(usage.percpu_usage) == [1, 2, 300]
    user = oci_pb2.User.FromString(b"\x18\x0a\x18\x14")
    assert list(user.AdditionalGids) == [10, 20]
    probe = agent_pb2.MemHotplugByProbeRequest.FromString(b"\x08\x80\x80\x80\x80\x10")
    assert list(probe.memHotplugProbeAddr) == [1 << 32]


def test_packed_and_unpacked_records_of_one_field_concatenate() -> None:
    wire = b"\x12\x02\x01\x02" + b"\x10\x03" + b"\x12\x01\x04"
    assert list(agent_pb2.CpuUsage.FromString(wire).percpu_usage) == [1, 2, 3, 4]


uint64s = st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=20)
uint32s = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=20)


@settings(deadline=None)  # a shared, busy CI host must not turn slowness into failures
@given(uint64s)
def test_percpu_usage_both_encodings(values: list[int]) -> None:
    assert list(agent_pb2.CpuUsage.FromString(_unpacked(2, values)).percpu_usage) == values
    assert list(agent_pb2.CpuUsage.FromString(_packed(2, values)).percpu_usage) == values
    expected = _packed(2, values) if values else b""
    assert agent_pb2.CpuUsage(percpu_usage=values).SerializeToString() == expected


@settings(deadline=None)  # a shared, busy CI host must not turn slowness into failures
@given(uint32s)
def test_additional_gids_both_encodings(values: list[int]) -> None:
    assert list(oci_pb2.User.FromString(_unpacked(3, values)).AdditionalGids) == values
    assert list(oci_pb2.User.FromString(_packed(3, values)).AdditionalGids) == values
    expected = _packed(3, values) if values else b""
    assert oci_pb2.User(AdditionalGids=values).SerializeToString() == expected


@settings(deadline=None)  # a shared, busy CI host must not turn slowness into failures
@given(uint64s)
def test_probe_addresses_both_encodings(values: list[int]) -> None:
    request = agent_pb2.MemHotplugByProbeRequest
    assert list(request.FromString(_unpacked(1, values)).memHotplugProbeAddr) == values
    assert list(request.FromString(_packed(1, values)).memHotplugProbeAddr) == values


def test_varint_helper_against_known_encodings() -> None:
    assert _varint(0) == b"\x00"
    assert _varint(300) == b"\xac\x02"
    assert _varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
