"""`kata-agent-ctl`: call any agent RPC from a shell.

    kata-agent-ctl --addr unix-serial:/run/vc/vm/ID/kata.sock check
    kata-agent-ctl --addr vsock:3:1024 version
    kata-agent-ctl --addr unix:/tmp/agent.sock call ListInterfaces --json '{}'
    kata-agent-ctl --addr unix-serial:/path/console.sock proxy --listen /tmp/proxy.sock

Responses print as JSON (proto field names). Exit status: 0 on success; the gRPC status
code (1-16) when the agent answers with an error or cannot be reached; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from kata_agent.channel import ChannelError
from kata_agent.host.client import AddressError, AgentClient, parse_address
from kata_agent.protocol import names

EXIT_USAGE = 2
AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"


class UsageError(Exception):
    pass


def _print_json(message: Any) -> None:
    print(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def resolve_method(method: str) -> tuple[str, names.MethodInfo]:
    """Accept `CreateContainer`, `AgentService/CreateContainer`, `grpc.Health/Check`..."""
    service, _, short = method.rpartition("/")
    service = service.lstrip("/")
    candidates = (
        [s for s in names.SERVICES if s == service or s.endswith("." + service)]
        if service
        else [AGENT_SERVICE, HEALTH_SERVICE]
    )
    for candidate in candidates:
        info = names.SERVICES[candidate].get(short)
        if info is not None:
            return candidate, info
    raise UsageError(f"unknown method {method!r}; `kata-agent-ctl methods` lists them")


def build_request(info: names.MethodInfo, text: str) -> Any:
    request = info.request()
    try:
        json_format.Parse(text or "{}", request)
    except json_format.ParseError as err:
        raise UsageError(f"bad JSON for {info.request.DESCRIPTOR.full_name}: {err}") from None
    return request


def call(client: AgentClient, method: str, request_json: str, timeout: float) -> Any:
    service, info = resolve_method(method)
    request = build_request(info, request_json)
    rpc = client.channel.unary_unary(
        f"/{service}/{info.name}",
        request_serializer=info.request.SerializeToString,
        response_deserializer=info.response.FromString,
    )
    return rpc(request, timeout=timeout, wait_for_ready=True)


def _read_json_arg(args: argparse.Namespace) -> str:
    if args.json_file:
        if args.json_file == "-":
            return sys.stdin.read()
        with open(args.json_file, encoding="utf-8") as f:
            return f.read()
    return str(args.json or "{}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kata-agent-ctl", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--addr", help="unix-serial:PATH | vsock:CID:PORT | unix:PATH (not needed for `methods`)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    p.add_argument("--debug", action="store_true", help="log the client's inner workings")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="grpc.Health/Check").add_argument("--service", default="")
    sub.add_parser("version", help="grpc.Health/Version")
    sub.add_parser("methods", help="list every RPC with its request type")
    c = sub.add_parser("call", help="call any RPC with a JSON request")
    c.add_argument("method", help="e.g. ListInterfaces or grpc.Health/Check")
    c.add_argument("--json", help="request as JSON (proto field names); default {}")
    c.add_argument("--json-file", help="read the request from this file ('-' for stdin)")
    x = sub.add_parser("proxy", help="serve local sockets, each connection one yamux stream")
    x.add_argument("--listen", action="append", required=True, help="socket path (repeatable)")
    return p.parse_args(argv)


def run_proxy(addr: str, listen: list[str]) -> int:
    from kata_agent.host.proxy import Proxy

    target = parse_address(addr)
    if target.kind != "unix-serial":
        raise UsageError("proxy needs a unix-serial:PATH address")
    proxy = Proxy(target.path, listen)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        proxy.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reason = proxy.run()
    if stopping.is_set():
        return 0
    print(f"kata-agent-ctl: agent session ended: {reason.name}", file=sys.stderr)
    return int(grpc.StatusCode.UNAVAILABLE.value[0])


def run(args: argparse.Namespace) -> int:
    if args.command == "methods":
        for service, methods in names.SERVICES.items():
            for name, info in methods.items():
                print(f"{service}/{name}\t{info.request.DESCRIPTOR.full_name}")
        return 0
    if not args.addr:
        raise UsageError("--addr is required")
    if args.command == "proxy":
        return run_proxy(args.addr, args.listen)
    with AgentClient(args.addr) as client:
        if args.command == "check":
            reply = call(
                client, "grpc.Health/Check", json.dumps({"service": args.service}), args.timeout
            )
        elif args.command == "version":
            reply = call(client, "grpc.Health/Version", "{}", args.timeout)
        else:
            reply = call(client, args.method, _read_json_arg(args), args.timeout)
        _print_json(reply)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except (UsageError, AddressError, ChannelError) as err:
        print(f"kata-agent-ctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        print(f"kata-agent-ctl: {code.name}: {details}", file=sys.stderr)
        return int(code.value[0]) or 1
    except OSError as err:
        print(f"kata-agent-ctl: cannot reach agent at {args.addr}: {err}", file=sys.stderr)
        return int(grpc.StatusCode.UNAVAILABLE.value[0])


if __name__ == "__main__":
    sys.exit(main())
