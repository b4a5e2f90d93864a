"""grpc.AgentService process RPCs: ExecProcess, SignalProcess, WaitProcess.

The edge only converts: protobuf -> typed values -> ``Sandbox`` -> protobuf.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from kata_agent import oci_convert
from kata_agent.engine.errors import SpecError
from kata_agent.protocol import agent_pb2
from kata_agent.sandbox import Sandbox
from kata_agent.service.sandbox import cancellation


class ProcessService:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def ExecProcess(self, request: Any, context: Any) -> Any:
        if not request.HasField("process"):
            raise SpecError("is required", field="process")
        self.sandbox.exec_process(request.container_id, request.exec_id,
                                  oci_convert.process_to_oci(request.process))
        return empty_pb2.Empty()

    def SignalProcess(self, request: Any, context: Any) -> Any:
        self.sandbox.signal_process(request.container_id, request.exec_id, request.signal)
        return empty_pb2.Empty()

    def WaitProcess(self, request: Any, context: Any) -> Any:
        with cancellation(context) as cancel:
            status = self.sandbox.wait_process(request.container_id, request.exec_id, cancel)
        return agent_pb2.WaitProcessResponse(status=status)
