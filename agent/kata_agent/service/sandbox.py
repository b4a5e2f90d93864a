"""grpc.AgentService sandbox RPCs: CreateSandbox, DestroySandbox, GetOOMEvent.

The edge only converts: protobuf request -> ``sandbox.SandboxRequest`` -> ``Sandbox`` ->
protobuf reply. Long polls hold a ``Canceller`` fired by the RPC's cancellation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from google.protobuf import empty_pb2

from kata_agent import network
from kata_agent.engine.errors import SpecError
from kata_agent.iostreams import Cancelled, Canceller
from kata_agent.protocol import agent_pb2
from kata_agent.sandbox import MAX_KERNEL_MODULES, KernelModule, Sandbox, SandboxRequest
from kata_agent.server import RpcError, StatusCode
from kata_agent.service.storage import storages_from_pb


@contextmanager
def cancellation(context: Any) -> Iterator[Canceller]:
    """A Canceller fired when the RPC ends early (host gone, deadline, cancel)."""
    cancel = Canceller()
    try:
        if context is not None and not context.add_callback(cancel.set):
            cancel.set()  # the RPC is over already
        yield cancel
    except Cancelled:
        raise RpcError(StatusCode.CANCELLED, "the call was cancelled") from None
    finally:
        cancel.close()


def sandbox_request_from_pb(msg: Any) -> SandboxRequest:
    if len(msg.dns) > network.MAX_DNS_LINES:
        raise SpecError(f"more than {network.MAX_DNS_LINES} lines", field="dns")
    if len(msg.kernel_modules) > MAX_KERNEL_MODULES:
        raise SpecError(f"more than {MAX_KERNEL_MODULES} modules", field="kernel_modules")
    return SandboxRequest(
        hostname=msg.hostname, dns=tuple(msg.dns), storages=tuple(storages_from_pb(msg.storages)),
        sandbox_pidns=msg.sandbox_pidns, sandbox_id=msg.sandbox_id,
        guest_hook_path=msg.guest_hook_path,
        kernel_modules=tuple(KernelModule(name=m.name, parameters=tuple(m.parameters))
                             for m in msg.kernel_modules),
    )


class SandboxService:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def CreateSandbox(self, request: Any, context: Any) -> Any:
        self.sandbox.create_sandbox(sandbox_request_from_pb(request))
        return empty_pb2.Empty()

    def DestroySandbox(self, request: Any, context: Any) -> Any:
        self.sandbox.destroy_sandbox()
        return empty_pb2.Empty()

    def GetOOMEvent(self, request: Any, context: Any) -> Any:
        with cancellation(context) as cancel:
            return agent_pb2.OOMEvent(container_id=self.sandbox.oom.next_event(cancel))
