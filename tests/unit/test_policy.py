"""The deny-by-default policy: loading and validation, RPC, container and exec checks, and
the intended wiring in front of real services on a real gRPC server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kata_agent import policy as pol
from kata_agent import server
from kata_agent.guest import GuestOps
from kata_agent.policy import Policy, PolicyError
from kata_agent.protocol import agent_pb2, health_pb2, names
from kata_agent.server import RpcError
from kata_agent.service.guest import GuestService
from kata_agent.service.health import HealthService

SHARED = "/run/kata-containers/shared/containers"

EXAMPLE: dict[str, Any] = {
    "version": 1,
    "allow_rpcs": ["CreateContainer", "StartContainer", "ExecProcess", "CopyFile"],
    "containers": {
        "allowed_commands": [["/bin/sh", "-c", "*"], ["/usr/bin/app", "**"], ["/pause"]],
        "allowed_images": [f"{SHARED}/*/rootfs", "/run/images/**"],
    },
    "exec": {"allowed_commands": [["/bin/ps"], ["/bin/cat", "/proc/*/status"]]},
}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def example(tmp_path: Path) -> Policy:
    return Policy.load(write(tmp_path, EXAMPLE))


def denied(fn: Any, *args: Any) -> str:
    with pytest.raises(RpcError) as info:
        fn(*args)
    assert info.value.code is server.StatusCode.PERMISSION_DENIED
    return info.value.msg


# ---------------------------------------------------------------------- RPCs


def test_listed_rpcs_allowed_everything_else_denied(example: Policy) -> None:
    for name in ("CreateContainer", "StartContainer", "ExecProcess", "CopyFile"):
        example.check_rpc(name)
    unlisted = set(names.AGENT_METHODS) - set(EXAMPLE["allow_rpcs"])
    assert len(unlisted) > 20
    for name in sorted(unlisted):
        assert name in denied(example.check_rpc, name)


def test_health_is_always_allowed(tmp_path: Path) -> None:
    empty = Policy.load(write(tmp_path, {}))
    empty.check_rpc("Check")
    empty.check_rpc("/grpc.Health/Version")
    denied(empty.check_rpc, "CreateContainer")
    denied(empty.check_rpc, "ListInterfaces")


def test_qualified_and_path_forms(example: Policy) -> None:
    example.check_rpc("/grpc.AgentService/CreateContainer")
    example.check_rpc("grpc.AgentService/CopyFile")
    denied(example.check_rpc, "/grpc.AgentService/RemoveContainer")
    denied(example.check_rpc, "NoSuchMethod")
    denied(example.check_rpc, "")


def test_allow_all_allows_everything() -> None:
    p = Policy.allow_all()
    for name in [*names.AGENT_METHODS, *names.HEALTH_METHODS]:
        p.check_rpc(name)
    p.check_container(["/anything", "at", "all"], "relative/../path")
    p.check_exec([])


def test_load_optional() -> None:
    assert pol.load_optional(None).unrestricted
    assert pol.load_optional("").unrestricted


# ---------------------------------------------------------------------- containers / exec


@pytest.mark.parametrize("args", [
    ["/bin/sh", "-c", "echo hi"],
    ["/bin/sh", "-c", ""],
    ["/usr/bin/app"],
    ["/usr/bin/app", "--flag", "x", "y"],
    ["/pause"],
])
def test_allowed_container_commands(example: Policy, args: list[str]) -> None:
    example.check_container(args, f"{SHARED}/abc/rootfs")


@pytest.mark.parametrize("args", [
    [],
    ["/bin/sh"],                       # too short for the pattern
    ["/bin/sh", "-c", "x", "extra"],   # too long, no trailing **
    ["/bin/bash", "-c", "x"],
    ["/pause", "x"],
    ["/usr/bin/app2"],
    ["/bin/sh", "-e", "x"],
])
def test_denied_container_commands(example: Policy, args: list[str]) -> None:
    assert "container command" in denied(example.check_container, args,
                                         f"{SHARED}/abc/rootfs")


@pytest.mark.parametrize("root", [
    f"{SHARED}/abc/rootfs", f"{SHARED}/abc/rootfs/", "/run/images/a/b/c", "/run/images/x",
])
def test_allowed_images(example: Policy, root: str) -> None:
    example.check_container(["/pause"], root)


@pytest.mark.parametrize("root", [
    f"{SHARED}/a/b/rootfs",             # * stays inside one component
    f"{SHARED}/../../../etc/rootfs",    # lexical climb
    f"{SHARED}/abc/../../x/rootfs",
    f"{SHARED}/./abc/rootfs",
    f"{SHARED}//abc/rootfs",
    "//run/images/x",
    "run/images/x",                     # relative
    "/run/images",
    "/run/images/x\0y",
    "",
    "/",
])
def test_denied_images(example: Policy, root: str) -> None:
    assert "container root" in denied(example.check_container, ["/pause"], root)


def test_exec_commands(example: Policy) -> None:
    example.check_exec(["/bin/ps"])
    example.check_exec(["/bin/cat", "/proc/1/status"])
    denied(example.check_exec, ["/bin/ps", "aux"])
    denied(example.check_exec, ["/bin/cat", "/etc/shadow"])
    denied(example.check_exec, ["/bin/sh", "-c", "echo hi"])  # container rules do not apply


def test_missing_sections_allow_nothing(tmp_path: Path) -> None:
    p = Policy.load(write(tmp_path, {"allow_rpcs": ["CreateContainer"]}))
    denied(p.check_container, ["/pause"], f"{SHARED}/a/rootfs")
    denied(p.check_exec, ["/bin/ps"])


def test_command_without_image_rule_is_denied(tmp_path: Path) -> None:
    p = Policy.load(write(tmp_path, {"containers": {"allowed_commands": [["x"]]}}))
    assert "container root" in denied(p.check_container, ["x"], "/anything")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "rootfs", "*"]), max_size=8))
def test_no_root_outside_the_pattern_is_ever_allowed(parts: list[str]) -> None:
    """Whatever the components, an allowed root normalizes to a path the glob names."""
    p = Policy.from_document({"containers": {"allowed_commands": [["/pause"]],
                                             "allowed_images": [f"{SHARED}/*/rootfs"]}})
    root = SHARED + "/" + "/".join(parts)
    try:
        p.check_container(["/pause"], root)
    except RpcError as err:
        assert err.code is server.StatusCode.PERMISSION_DENIED
        return
    norm = os.path.normpath(root)
    assert norm.startswith(SHARED + "/")
    rel = norm[len(SHARED) + 1:].split("/")
    assert len(rel) == 2 and rel[1] == "rootfs" and rel[0] not in ("", ".", "..")


# ---------------------------------------------------------------------- bad files


BAD_DOCUMENTS: list[tuple[str, object, str]] = [
    ("not-object", ["CreateContainer"], "expected an object"),
    ("unknown-key", {"allow_rpc": ["Check"]}, "unknown key 'allow_rpc'"),
    ("unknown-rpc", {"allow_rpcs": ["CreateContainers"]}, "allow_rpcs[0]: unknown RPC"),
    ("rpcs-not-list", {"allow_rpcs": "CreateContainer"}, "allow_rpcs: expected a list"),
    ("rpc-not-string", {"allow_rpcs": [1]}, "allow_rpcs[0]: expected a string"),
    ("version", {"version": 2}, "version: unsupported"),
    ("version-type", {"version": True}, "version: unsupported"),
    ("containers-key", {"containers": {"commands": []}}, "containers: unknown key"),
    ("exec-type", {"exec": []}, "exec: expected an object"),
    ("command-not-list", {"exec": {"allowed_commands": ["/bin/ps"]}},
     "exec.allowed_commands[0]: expected a list"),
    ("empty-command", {"exec": {"allowed_commands": [[]]}}, "at least the program"),
    ("empty-program", {"exec": {"allowed_commands": [[""]]}}, "at least the program"),
    ("rest-first", {"exec": {"allowed_commands": [["**"]]}}, "at least the program"),
    ("rest-middle", {"exec": {"allowed_commands": [["/a", "**", "b"]]}},
     "exec.allowed_commands[0][1]"),
    ("relative-image", {"containers": {"allowed_images": ["rootfs/*"]}},
     "containers.allowed_images[0]: 'rootfs/*' is not an absolute"),
    ("nul", {"containers": {"allowed_images": ["/a\0b"]}}, "contains NUL"),
    ("too-many", {"allow_rpcs": ["Check"] * (pol.MAX_RULES + 1)}, "at most"),
]


@pytest.mark.parametrize(("name", "doc", "message"), BAD_DOCUMENTS,
                         ids=[d[0] for d in BAD_DOCUMENTS])
def test_bad_documents_refused_with_a_clear_message(tmp_path: Path, name: str, doc: object,
                                                    message: str) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert str(info.value).startswith(f"policy {path}: ")
    assert message in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_unparsable_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_missing_directory_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot open"):
        Policy.load(tmp_path / "absent.json")
    with pytest.raises(PolicyError, match="not a regular file"):
        Policy.load(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (pol.MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match="bytes, at most"):
        Policy.load(big)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Opening a FIFO for reading blocks until a writer appears: be that writer, so the
    # test ends whatever the loader does.
    w = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(PolicyError, match="not a regular file"):
            Policy.load(fifo)
    finally:
        os.close(w)


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["version", "allow_rpcs", "containers", "exec", "allowed_commands",
                         "allowed_images", "x"]), kids, max_size=4),
    max_leaves=20))
def test_any_document_loads_or_is_refused_cleanly(doc: object) -> None:
    try:
        p = Policy.from_document(doc)
    except PolicyError as err:
        assert str(err).startswith("policy <document>: ")
        return
    assert not p.unrestricted
    assert p.allowed_rpcs <= pol.KNOWN_RPCS
    assert p.allowed_rpcs >= pol.ALWAYS_ALLOWED_RPCS


# ---------------------------------------------------------------------- wiring


class PolicedGuestRpcs:
    """What the server edge will do: ask the policy before the RPC runs."""

    def __init__(self, inner: GuestService, policy: Policy) -> None:
        self.inner = inner
        self.policy = policy

    def CopyFile(self, request: Any, context: Any) -> Any:
        self.policy.check_rpc("CopyFile")
        return self.inner.CopyFile(request, context)

    def SetGuestDateTime(self, request: Any, context: Any) -> Any:
        self.policy.check_rpc("SetGuestDateTime")
        return self.inner.SetGuestDateTime(request, context)


@pytest.fixture
def served(tmp_path: Path, example: Policy) -> Iterator[tuple[grpc.Channel, Path, list[int]]]:
    shared = tmp_path / "shared"
    clock: list[int] = []
    ops = GuestOps(sysfs=tmp_path / "sys", shared_dir=shared, set_clock_ns=clock.append)
    services = [example.guard(HealthService()), PolicedGuestRpcs(GuestService(ops), example),
                example.guard(GuestService(ops))]
    srv = server.build_server(services, max_workers=4)
    sock = tmp_path / "agent.sock"
    assert srv.add_insecure_port(f"unix:{sock}") != 0
    srv.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield channel, shared, clock
    finally:
        channel.close()
        srv.stop(grace=None).wait()


def _call(channel: grpc.Channel, service: str, method: str, request: Any) -> Any:
    info = names.SERVICES[service][method]
    rpc = channel.unary_unary(f"/{service}/{method}",
                              request_serializer=info.request.SerializeToString,
                              response_deserializer=info.response.FromString)
    return rpc(request, timeout=30)


def _status(channel: grpc.Channel, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, "grpc.AgentService", method, request)
    err: Any = info.value
    return err.code(), err.details()


def test_policy_in_front_of_real_services(
        served: tuple[grpc.Channel, Path, list[int]]) -> None:
    channel, shared, clock = served
    reply = _call(channel, "grpc.Health", "Check", health_pb2.CheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _call(channel, "grpc.Health", "Version", health_pb2.CheckRequest()).agent_version
    target = shared / "sbx" / "hosts"
    _call(channel, "grpc.AgentService", "CopyFile", agent_pb2.CopyFileRequest(
        path=str(target), file_size=3, file_mode=0o644, uid=-1, gid=-1, offset=0,
        data=b"abc"))
    assert target.read_bytes() == b"abc"
    code, msg = _status(channel, "SetGuestDateTime",
                        agent_pb2.SetGuestDateTimeRequest(Sec=1000, Usec=0))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "SetGuestDateTime" in msg
    assert clock == []  # the denied RPC never reached the operation
    # GuestService methods reached through the generic guard are denied the same way.
    code, _ = _status(channel, "ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=b"x"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = _status(channel, "GetGuestDetails", agent_pb2.GuestDetailsRequest())
    assert code is grpc.StatusCode.PERMISSION_DENIED
    # RPCs nobody implements stay UNIMPLEMENTED (the policy cannot make them exist).
    code, _ = _status(channel, "ListRoutes", agent_pb2.ListRoutesRequest())
    assert code is grpc.StatusCode.UNIMPLEMENTED
