"""The gRPC server: every RPC of grpc.AgentService and grpc.Health, behind one error edge.

Services are plain objects whose methods are named after RPCs (``CreateContainer(request,
context)``). The server registers every method of the protocol: those no service implements
answer UNIMPLEMENTED with a message, so a host runtime gets a clear answer instead of a
transport error. Exceptions become gRPC statuses here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any

import grpc

from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    NotFoundError,
    SpecError,
    StateError,
)
from kata_agent.protocol import names

log = logging.getLogger(__name__)

# Long polls (WaitProcess, GetOOMEvent, ReadStdout/ReadStderr) each hold a worker for as
# long as they wait: a shim keeps three open per process, so the pool must be far larger
# than the processes a sandbox runs. Workers are only started when needed.
DEFAULT_MAX_WORKERS = 512
# CopyFile chunks are 1 MiB; anything far above that is not a request a runtime sends.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class RpcError(Exception):
    """A service's explicit answer: a status code and a message for the host."""

    def __init__(self, code: grpc.StatusCode, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


_ENGINE_STATUS: tuple[tuple[type[EngineError], grpc.StatusCode], ...] = (
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised by a service to the status the host sees."""
    if isinstance(err, RpcError):
        return err.code, err.msg
    if isinstance(err, EngineError):
        for kind, code in _ENGINE_STATUS:
            if isinstance(err, kind):
                return code, str(err)
        return grpc.StatusCode.INTERNAL, str(err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


Handler = Callable[[Any, grpc.ServicerContext], Any]


def _edge(full_name: str, fn: Handler) -> Handler:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        try:
            reply = fn(request, context)
        except Exception as err:
            code, msg = status_for(err)
            if code is grpc.StatusCode.INTERNAL and not isinstance(err, (RpcError, EngineError)):
                log.exception("rpc failed method=%s", full_name)
            else:
                log.warning("rpc error method=%s code=%s msg=%s", full_name, code.name, msg)
            context.abort(code, msg)
        log.debug("rpc method=%s ms=%.3f", full_name, (time.monotonic() - started) * 1000.0)
        return reply

    return handle


def _unimplemented(full_name: str) -> Handler:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        log.info("rpc unimplemented method=%s", full_name)
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{full_name} is not implemented by this agent"
        )

    return handle


def build_handlers(services: Iterable[object]) -> list[grpc.GenericRpcHandler]:
    """One generic handler per protocol service, every method registered."""
    services = list(services)
    handlers: list[grpc.GenericRpcHandler] = []
    for service_name, methods in names.SERVICES.items():
        table: dict[str, grpc.RpcMethodHandler] = {}
        for method, info in methods.items():
            full_name = f"/{service_name}/{method}"
            impl = next(
                (getattr(s, method) for s in services if callable(getattr(s, method, None))),
                None,
            )
            fn = _edge(full_name, impl) if impl is not None else _unimplemented(full_name)
            table[method] = grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=info.request.FromString,
                response_serializer=info.response.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(service_name, table))
    return handlers


def build_server(
    services: Iterable[object], *, max_workers: int = DEFAULT_MAX_WORKERS
) -> grpc.Server:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        handlers=build_handlers(services),
        options=options,
    )
    return server


def implemented_methods(services: Iterable[object]) -> Mapping[str, list[str]]:
    """Which RPCs the given services answer (for logs and GetGuestDetails)."""
    services = list(services)
    return {
        service_name: [m for m in methods if any(callable(getattr(s, m, None)) for s in services)]
        for service_name, methods in names.SERVICES.items()
    }
