"""The gRPC server: every RPC of grpc.AgentService and grpc.Health, behind one error edge.

Services are plain objects whose methods are named after RPCs (``CreateContainer(request,
context)``). The server registers every method of the protocol: those no service implements
answer UNIMPLEMENTED with a message, so a host runtime gets a clear answer instead of a
transport error. Exceptions become gRPC statuses here and nowhere else. The transport is
``h2server`` (gRPC over HTTP/2 on h2): the agent never imports grpcio.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    NotFoundError,
    SpecError,
    StateError,
)
from kata_agent.h2server import Abort, Route, Server, StatusCode
from kata_agent.protocol import names

__all__ = ["DEFAULT_MAX_WORKERS", "MAX_MESSAGE_BYTES", "RpcError", "Server", "StatusCode",
           "build_server", "implemented_methods", "status_for"]

log = logging.getLogger(__name__)

# Long polls (WaitProcess, GetOOMEvent, ReadStdout/ReadStderr) each hold a worker for as
# long as they wait: a shim keeps three open per process, so the pool must be far larger
# than the processes a sandbox runs. Workers are only started when needed.
DEFAULT_MAX_WORKERS = 512
# CopyFile chunks are 1 MiB; anything far above that is not a request a runtime sends.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Answered on the server's I/O thread: they never block (see h2server.Route).
INLINE = frozenset({"/grpc.Health/Check", "/grpc.Health/Version"})


class RpcError(Exception):
    """A service's explicit answer: a status code and a message for the host."""

    def __init__(self, code: StatusCode, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


_ENGINE_STATUS: tuple[tuple[type[EngineError], StatusCode], ...] = (
    (SpecError, StatusCode.INVALID_ARGUMENT),
    (NotFoundError, StatusCode.NOT_FOUND),
    (AlreadyExistsError, StatusCode.ALREADY_EXISTS),
    (StateError, StatusCode.FAILED_PRECONDITION),
)


def status_for(err: BaseException) -> tuple[StatusCode, str]:
    """Map an exception raised by a service to the status the host sees."""
    if isinstance(err, RpcError):
        return err.code, err.msg
    if isinstance(err, Abort):
        return err.code, err.details
    if isinstance(err, EngineError):
        if err.errno == errno.ETIMEDOUT:
            # A wait that ran out (a hotplugged device that never showed up): the host may
            # retry, which INTERNAL would not suggest.
            return StatusCode.DEADLINE_EXCEEDED, str(err)
        for kind, code in _ENGINE_STATUS:
            if isinstance(err, kind):
                return code, str(err)
        return StatusCode.INTERNAL, str(err)
    return StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


Handler = Callable[[Any, Any], Any]


def _edge(full_name: str, fn: Handler) -> Handler:
    def handle(request: Any, context: Any) -> Any:
        started = time.monotonic()
        try:
            reply = fn(request, context)
        except Exception as err:
            code, msg = status_for(err)
            if code is StatusCode.INTERNAL and not isinstance(err, (RpcError, EngineError)):
                log.exception("rpc failed method=%s", full_name)
            else:
                log.warning("rpc error method=%s code=%s msg=%s", full_name, code.name, msg)
            context.abort(code, msg)
        log.debug("rpc method=%s ms=%.3f", full_name, (time.monotonic() - started) * 1000.0)
        return reply

    return handle


def _unimplemented(full_name: str) -> Handler:
    def handle(request: Any, context: Any) -> Any:
        log.info("rpc unimplemented method=%s", full_name)
        context.abort(StatusCode.UNIMPLEMENTED, f"{full_name} is not implemented by this agent")

    return handle


def build_routes(services: Iterable[object]) -> dict[str, Route]:
    """Every protocol method by its HTTP/2 path, answered by the first service that has it."""
    services = list(services)
    routes: dict[str, Route] = {}
    for info in names.BY_PATH.values():
        impl = next(
            (getattr(s, info.name) for s in services if callable(getattr(s, info.name, None))),
            None,
        )
        fn = _edge(info.path, impl) if impl is not None else _unimplemented(info.path)
        routes[info.path] = Route(deserialize=info.request.FromString, handler=fn,
                                  serialize=info.response.SerializeToString,
                                  inline=info.path in INLINE and impl is not None)
    return routes


def build_server(services: Iterable[object], *, max_workers: int = DEFAULT_MAX_WORKERS) -> Server:
    return Server(build_routes(services), max_workers=max_workers,
                  max_message_bytes=MAX_MESSAGE_BYTES)


def implemented_methods(services: Iterable[object]) -> Mapping[str, list[str]]:
    """Which RPCs the given services answer (for logs and GetGuestDetails)."""
    services = list(services)
    return {
        service_name: [m for m in methods if any(callable(getattr(s, m, None)) for s in services)]
        for service_name, methods in names.SERVICES.items()
    }
