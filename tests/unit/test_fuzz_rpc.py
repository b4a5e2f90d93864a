"""Fuzzing every AgentService request: decoding, conversion, validation, and the services
that exist, through the server's error edge, against fake host state.

For each RPC, three kinds of input: random bytes, random messages built from the request's
descriptor (with values a runtime or an attacker would pick: paths with ``..``, the shared
directory, MACs, CIDRs, huge integers), and those messages' encodings mutated. Bytes the
request class cannot parse must fail with DecodeError only. Parsed requests go through
``server._edge`` into the real service objects (guest operations on a fake sysfs and a
temporary shared directory, network validation with netlink replaced by a recorder, the
storage manager with mount(2) recorded, and the CreateContainer/CreateSandbox converters);
the outcome must be a reply of the right type or a status from ``ALLOWED``. INTERNAL is a
finding: the test fails and prints the input.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kata_agent import server
from kata_agent.engine.errors import HostError
from kata_agent.guest import GuestOps
from kata_agent.network import (
    ARPNeighbor,
    Interface,
    Network,
    Route,
    validate_interface,
    validate_neighbor,
    validate_route,
)
from kata_agent.protocol import names
from kata_agent.service.containers import container_request_from_pb
from kata_agent.service.guest import GuestService
from kata_agent.service.health import HealthService
from kata_agent.service.network import NetworkService
from kata_agent.service.sandbox import sandbox_request_from_pb
from kata_agent.storage import StorageManager

ALLOWED = frozenset({
    server.StatusCode.INVALID_ARGUMENT, server.StatusCode.NOT_FOUND, server.StatusCode.OUT_OF_RANGE,
    server.StatusCode.FAILED_PRECONDITION, server.StatusCode.ALREADY_EXISTS,
    server.StatusCode.UNIMPLEMENTED, server.StatusCode.PERMISSION_DENIED,
    server.StatusCode.DEADLINE_EXCEEDED,
})

WORK = Path(tempfile.mkdtemp(prefix="kata-fuzz-rpc-"))
SHARED = WORK / "shared/containers"
STORAGE_ROOT = WORK / "run/kata-containers"


@pytest.fixture(scope="module", autouse=True)
def _cleanup_work() -> Iterator[None]:
    yield
    shutil.rmtree(WORK, ignore_errors=True)


# ------------------------------------------------------------------ fakes of host state


def make_sysfs(root: Path) -> Path:
    sysfs = root / "sys"
    for rel, text in [("devices/system/cpu/cpu0/online", "1"),
                      ("devices/system/cpu/cpu1/online", "0"),
                      ("devices/system/cpu/online", "0"),
                      ("devices/system/memory/memory0/online", "0"),
                      ("devices/system/memory/block_size_bytes", "8000000"),
                      ("devices/system/memory/probe", "")]:
        (sysfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (sysfs / rel).write_text(text)
    return sysfs


class ValidatingNetwork(Network):
    """Network with netlink replaced: every request runs the real validation, then the
    fake answers as a kernel that accepted it would."""

    def update_interface(self, request: Interface) -> Interface:
        return validate_interface(request)

    def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        for i, r in enumerate(routes):
            validate_route(r, f"routes[{i}]")
        return list(routes)

    def add_arp_neighbors(self, neighbors: Sequence[ARPNeighbor]) -> None:
        for i, n in enumerate(neighbors):
            validate_neighbor(n, f"neighbors[{i}]")

    def list_interfaces(self) -> list[Interface]:
        return []

    def list_routes(self) -> list[Route]:
        return []


class RecordingMounts:
    """mount(2)/umount2(2) recorded; nothing is mounted."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        self.calls.append(("mount", source, target, fstype, flags, data))

    def umount2(self, target: str, flags: int) -> None:
        self.calls.append(("umount2", target, flags))


class SilentUevents:
    """A uevent source on which no device ever appears."""

    def __init__(self) -> None:
        self._never = threading.Event()

    def receive(self, timeout: float) -> bytes | None:
        self._never.wait(max(timeout, 0.0))
        return None

    def close(self) -> None:
        pass


class ConverterService:
    """The container and sandbox request path up to the engine: the converters the
    container and sandbox services use, then real storage handling with mounts recorded."""

    def __init__(self, storage: StorageManager) -> None:
        self.storage = storage

    def _storages(self, specs: Sequence[Any]) -> None:
        handles = []
        try:
            for spec in specs:
                handles.append(self.storage.add(spec))
        finally:
            # As the sandbox does when a later step fails: nothing stays mounted.
            for h in reversed(handles):
                self.storage.remove(h)

    def CreateContainer(self, request: Any, context: Any) -> Any:
        req = container_request_from_pb(request)
        for dev in req.devices:
            self.storage.resolve_device(dev)
        self._storages(req.storages)
        return empty_pb2.Empty()

    def CreateSandbox(self, request: Any, context: Any) -> Any:
        self._storages(sandbox_request_from_pb(request).storages)
        return empty_pb2.Empty()


def build_services() -> list[object]:
    sysfs = make_sysfs(WORK)
    random_dev = WORK / "random"
    random_dev.write_bytes(b"")
    clock: list[int] = []
    ops = GuestOps(sysfs=sysfs, shared_dir=SHARED, random_device=random_dev,
                   set_clock_ns=clock.append, online_retry_interval=0.0005,
                   online_max_tries=2)
    STORAGE_ROOT.mkdir(parents=True, exist_ok=True)
    storage = StorageManager(RecordingMounts(), hotplug_timeout=0.005,  # type: ignore[arg-type]
                             allowed_roots=(str(STORAGE_ROOT),), sys_root=str(WORK / "sys"),
                             dev_root=str(WORK / "dev"), source_factory=SilentUevents,
                             arch="x86_64")
    return [HealthService(), GuestService(ops), NetworkService(ValidatingNetwork()),
            ConverterService(storage)]


SERVICES = build_services()


def implementation(method: str) -> Callable[[Any, Any], Any] | None:
    for s in SERVICES:
        fn = getattr(s, method, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


AGENT = names.SERVICES["grpc.AgentService"]
SERVED = sorted(m for m in AGENT if implementation(m) is not None)
NOT_SERVED = sorted(m for m in AGENT if implementation(m) is None)


# ------------------------------------------------------------------ the edge


class Aborted(Exception):
    def __init__(self, code: server.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class FakeContext:
    """The part of grpc.ServicerContext the edge and the services use."""

    def abort(self, code: server.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float:
        return 5.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


@dataclass
class Finding:
    method: str
    code: server.StatusCode
    details: str
    cause: BaseException | None


def call_through_edge(method: str, request: Message) -> Finding | None:
    """Run one request through the server's edge; a Finding when the outcome is not a
    reply of the right type or an allowed status."""
    impl = implementation(method)
    assert impl is not None
    raised: list[BaseException] = []

    def recorded(req: Any, ctx: Any) -> Any:
        try:
            return impl(req, ctx)
        except BaseException as err:
            raised.append(err)
            raise

    info = AGENT[method]
    try:
        reply = server._edge(info.path, recorded)(request, FakeContext())
    except Aborted as ab:
        cause = raised[0] if raised else None
        if ab.code in ALLOWED:
            return None
        return Finding(method, ab.code, ab.details, cause)
    # The reply must serialize as the declared response type.
    assert isinstance(reply, info.response), (method, type(reply))
    reply.SerializeToString()
    return None


# ------------------------------------------------------------------ message strategies

INTERESTING_TEXT = [
    "", ".", "..", "/", "//", "../../etc/passwd", "/etc/passwd", "a/../../b", "\x00",
    "a" * 300, "-x", "\n", "ünï", f"{SHARED}/sbx/file", f"{SHARED}/../escape",
    f"{SHARED}/sbx/../../x", f"{STORAGE_ROOT}/sandbox/shm", f"{STORAGE_ROOT}/../etc",
    f"{STORAGE_ROOT}/a/b", "/run/kata-containers/shared/containers/x", "tmpfs", "shm",
    "ephemeral", "local", "9p", "virtio-fs", "blk", "scsi", "nvdimm", "overlayfs", "mmioblk",
    "ext4", "xfs", "bind", "ro", "rw", "mode=0755", "size=1G", "uid=0", "gid=99999999999",
    "02/03", "00:01.0", "0:0", "0.0.0001", "/dev/vda", "/dev/../etc/shadow",
    "52:54:00:12:34:56", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff:ff", "eth0", "lo",
    "10.0.0.1", "10.0.0.0/8", "::1", "fe80::1/64", "default", "256.1.1.1", "1.2.3.4/33",
    "24", "-1", "129", "sandbox-1", "c" * 129, "a/b", "../x",
]

text = st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=24),
                 st.builds(lambda a, b: a + "/" + b, st.sampled_from(INTERESTING_TEXT),
                           st.sampled_from(INTERESTING_TEXT)))

_INT_RANGES = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (-(2**63), -(2**31), -1, 0, 1, 2, 255, 256, 65535, 65536,
                                2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1)
                    if lo <= v <= hi} | {lo, hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi),
                     st.integers(max(lo, -1000), min(hi, 1000)))


def scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return integers(*_INT_RANGES[t])
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pbd.FieldDescriptor.TYPE_STRING:
        return text
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    if t == pbd.FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-5, 100))
    raise AssertionError(f"unhandled field type {t}")


def _is_map(field: Any) -> bool:
    return bool(field.type == pbd.FieldDescriptor.TYPE_MESSAGE
                and field.message_type.GetOptions().map_entry)


@st.composite
def fill(draw: st.DrawFn, msg: Message, depth: int) -> Message:
    fields: list[Any] = list(msg.DESCRIPTOR.fields)
    for field in fields:
        if not draw(st.booleans()):
            continue
        is_repeated = field.is_repeated
        if _is_map(field):
            kf, vf = field.message_type.fields_by_name["key"], \
                field.message_type.fields_by_name["value"]
            target = getattr(msg, field.name)
            for _ in range(draw(st.integers(0, 3))):
                key = draw(scalar(kf))
                if vf.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                    if depth > 0:
                        draw(fill(target[key], depth - 1))
                    else:
                        target[key].SetInParent()
                else:
                    target[key] = draw(scalar(vf))
        elif field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                continue
            if is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    draw(fill(getattr(msg, field.name).add(), depth - 1))
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                draw(fill(sub, depth - 1))
        elif is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg


def messages(cls: type[Message], depth: int = 4) -> st.SearchStrategy[Message]:
    return st.deferred(lambda: fill(cls(), depth))


# Requests shaped like a runtime's, so the fuzzing also reaches past the first checks
# (file writes, storage plans, interface validation) before values go wrong.
name_part = st.one_of(st.sampled_from(["a", "sbx", "..", ".", "rootfs", "x" * 255, "x" * 256,
                                       ".copy-x.tmp", "-"]), st.text(min_size=1, max_size=8))


@st.composite
def copy_file_seed(draw: st.DrawFn) -> Message:
    parts = draw(st.lists(name_part, min_size=1, max_size=4))
    payload = draw(st.binary(max_size=64))
    extra = draw(st.sampled_from([0, 0, 0, 1, 10]))
    return AGENT["CopyFile"].request(
        path=f"{SHARED}/" + "/".join(parts), file_size=len(payload) + extra,
        file_mode=draw(st.sampled_from([0o644, 0o4755, 0o7777, 0xFFFFFFFF])),
        dir_mode=draw(st.sampled_from([0, 0o755, 0o7777])),
        uid=draw(st.sampled_from([-1, 0, 1000, -2])), gid=draw(st.sampled_from([-1, 0, 1000])),
        offset=draw(st.sampled_from([0, 0, 0, 1, -1])), data=payload)


@st.composite
def storage_seed(draw: st.DrawFn, target: Any) -> None:
    target.driver = draw(st.sampled_from(["ephemeral", "local", "9p", "virtio-fs", "blk",
                                          "scsi", "nvdimm", "overlayfs", "mmioblk", "nope"]))
    target.source = draw(st.sampled_from(["tmpfs", "shm", "none", "kataShared", "02/03",
                                          "0:0", "/dev/pmem0", "/dev/vda", ""]))
    target.fstype = draw(st.sampled_from(["", "tmpfs", "ext4", "9p", "virtiofs", "bogus"]))
    target.options.extend(draw(st.lists(st.sampled_from(
        ["ro", "rw", "nosuid", "mode=0755", "mode=07777", "size=1M", "uid=0", "gid=x",
         "trans=virtio", "lowerdir=/etc", "upperdir=..", "bogus"]), max_size=4)))
    rel = draw(st.lists(name_part, min_size=1, max_size=3))
    target.mount_point = f"{STORAGE_ROOT}/" + "/".join(rel)


@st.composite
def create_sandbox_seed(draw: st.DrawFn) -> Any:
    req: Any = AGENT["CreateSandbox"].request(hostname=draw(text), sandbox_id=draw(text))
    for _ in range(draw(st.integers(0, 3))):
        draw(storage_seed(req.storages.add()))
    return req


@st.composite
def create_container_seed(draw: st.DrawFn) -> Any:
    req: Any = AGENT["CreateContainer"].request(container_id=draw(text), exec_id=draw(text))
    draw(fill(req.OCI, 3))
    req.OCI.SetInParent()
    for _ in range(draw(st.integers(0, 3))):
        draw(storage_seed(req.storages.add()))
    return req


@st.composite
def update_interface_seed(draw: st.DrawFn) -> Any:
    req: Any = AGENT["UpdateInterface"].request()
    iface = req.interface
    iface.hwAddr = draw(st.sampled_from(["52:54:00:12:34:56", "52-54-00-12-34-56", "0:0:0:0:0:0",
                                         "52:54:00:12:34", "zz:54:00:12:34:56"]))
    iface.name = draw(st.sampled_from(["eth0", "", "a" * 16, "a/b", "lo", ".."]))
    iface.mtu = draw(st.sampled_from([0, 67, 68, 1500, 65536, 65537, 2**64 - 1]))
    for _ in range(draw(st.integers(0, 3))):
        addr = iface.IPAddresses.add()
        addr.family = draw(st.sampled_from([0, 1, 2, 7]))
        addr.address = draw(st.sampled_from(["10.0.0.2", "fe80::2", "::", "1.2.3", "10.0.0.2"]))
        addr.mask = draw(st.sampled_from(["24", "64", "", "-1", "129", "255.255.255.0"]))
    return req


SEEDS: dict[str, st.SearchStrategy[Message]] = {
    "CopyFile": copy_file_seed(),
    "CreateSandbox": create_sandbox_seed(),
    "CreateContainer": create_container_seed(),
    "UpdateInterface": update_interface_seed(),
}


def requests(method: str) -> st.SearchStrategy[Message]:
    generic = messages(AGENT[method].request)
    seed = SEEDS.get(method)
    return generic if seed is None else st.one_of(seed, seed, generic)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("varint"), st.integers(0, 10**6),
              st.sampled_from([b"\xff" * 10 + b"\x01", b"\x80" * 9 + b"\x7f", b"\x00"])),
    st.tuples(st.just("dup"), st.integers(0, 10**6), st.integers(1, 64)),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        n = max(len(buf), 1)
        if op[0] == "flip" and buf:
            buf[op[1] % n] ^= 1 << op[2]
        elif op[0] == "truncate":
            del buf[op[1] % n:]
        elif op[0] in ("insert", "varint"):
            at = op[1] % (len(buf) + 1)
            buf[at:at] = op[2]
        elif op[0] == "dup":
            at = op[1] % n
            buf[at:at] = buf[at:at + op[2]]
    return bytes(buf)


def decode(method: str, data: bytes) -> Message | None:
    try:
        return AGENT[method].request.FromString(data)
    except DecodeError:
        return None  # refused before any of our code runs


def fail_on(finding: Finding | None, request: Message) -> None:
    if finding is not None:
        raise AssertionError(
            f"{finding.method} answered {finding.code.name}: {finding.details}\n"
            f"cause: {type(finding.cause).__name__}: {finding.cause}\n"
            f"request bytes: {request.SerializeToString()!r}\nrequest: {request}")


def acceptable_internal(finding: Finding | None) -> bool:
    """HostError is the engine's "the host system failed" and maps to INTERNAL by design;
    with fake host state it only arises where the fakes stand in for a kernel. Anything
    else answering INTERNAL is an unexpected exception type: a bug."""
    return finding is None or isinstance(finding.cause, HostError)


FUZZ = settings(max_examples=60, deadline=3000, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# ------------------------------------------------------------------ tests


def test_every_rpc_is_covered() -> None:
    """The fuzzed set is what this agent serves today; the rest only decode."""
    assert {"CopyFile", "UpdateInterface", "UpdateRoutes", "AddARPNeighbors",
            "OnlineCPUMem", "CreateContainer", "CreateSandbox"} <= set(SERVED)
    assert set(SERVED) | set(NOT_SERVED) == set(AGENT)


@pytest.mark.parametrize("method", sorted(AGENT))
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_decode_or_refuse(method: str, data: bytes) -> None:
    request = decode(method, data)
    if request is None or method not in SERVED:
        return
    finding = call_through_edge(method, request)
    if not acceptable_internal(finding):
        fail_on(finding, request)


@pytest.mark.parametrize("method", SERVED)
@FUZZ
@given(data=st.data())
def test_generated_requests(method: str, data: st.DataObject) -> None:
    request = data.draw(requests(method))
    finding = call_through_edge(method, request)
    if not acceptable_internal(finding):
        fail_on(finding, request)


@pytest.mark.parametrize("method", sorted(AGENT))
@FUZZ
@given(data=st.data(), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_encodings(method: str, data: st.DataObject, ops: list[tuple[Any, ...]]
                           ) -> None:
    valid = data.draw(requests(method)).SerializeToString()
    request = decode(method, mutate(valid, ops))
    if request is None or method not in SERVED:
        return
    finding = call_through_edge(method, request)
    if not acceptable_internal(finding):
        fail_on(finding, request)


def test_oversized_repeated_fields_refused_before_work() -> None:
    """Counts are bounded at the edge: a request with far more entries than any limit is
    INVALID_ARGUMENT, whatever the entries hold."""
    info = AGENT["UpdateRoutes"]
    req: Any = info.request()
    for _ in range(100_000):
        req.routes.Routes.add(dest="10.0.0.0/8", device="eth0")
    data = req.SerializeToString()
    assert len(data) < server.MAX_MESSAGE_BYTES
    finding = call_through_edge("UpdateRoutes", info.request.FromString(data))
    assert finding is None
    with pytest.raises(Aborted) as err:
        server._edge(info.path, implementation("UpdateRoutes"))(  # type: ignore[arg-type]
            info.request.FromString(data), FakeContext())
    assert err.value.code is server.StatusCode.INVALID_ARGUMENT


def test_truncated_varint_is_a_decode_error() -> None:
    """The cheapest malformed input: a tag and a varint that never ends."""
    for method in AGENT:
        data = struct.pack("B", (1 << 3) | 0) + b"\xff" * 11
        assert decode(method, data) is None
