"""grpc.Health: Check and Version."""

from __future__ import annotations

from typing import Any

from kata_agent import __version__
from kata_agent.protocol import health_pb2

# The protocol API version the Kata 1.x runtime expects from `Version` (its APIVersion).
PROTOCOL_API_VERSION = "0.0.1"


class HealthService:
    def __init__(self) -> None:
        self.serving = True

    def Check(self, request: Any, context: Any) -> Any:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    def Version(self, request: Any, context: Any) -> Any:
        return health_pb2.VersionCheckResponse(
            grpc_version=PROTOCOL_API_VERSION, agent_version=__version__
        )
