"""grpc.AgentService I/O RPCs: WriteStdin, ReadStdout, ReadStderr, CloseStdin,
TtyWinResize.

End of stream is the error the 1.x shim expects: OUT_OF_RANGE with the message "EOF".
Sizes are bounded here (``iostreams.MAX_IO_CHUNK``), before any buffer is made.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from kata_agent.iostreams import MAX_IO_CHUNK, StreamEOF
from kata_agent.protocol import agent_pb2
from kata_agent.sandbox import Sandbox
from kata_agent.server import RpcError, StatusCode
from kata_agent.service.sandbox import cancellation

EOF_MESSAGE = "EOF"
MAX_TTY_SIDE = 65535


def _eof() -> RpcError:
    return RpcError(StatusCode.OUT_OF_RANGE, EOF_MESSAGE)


class StreamService:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def _read(self, request: Any, context: Any, name: str) -> Any:
        if not 0 < request.len <= MAX_IO_CHUNK:
            raise RpcError(StatusCode.INVALID_ARGUMENT,
                           f"len: must be 1..{MAX_IO_CHUNK}, not {request.len}")
        proc = self.sandbox.process(request.container_id, request.exec_id)
        stream = proc.io.output(name)
        if stream is None:
            raise _eof()  # a terminal has no separate stderr
        with cancellation(context) as cancel:
            try:
                data = stream.read(request.len, cancel)
            except StreamEOF:
                raise _eof() from None
        return agent_pb2.ReadStreamResponse(data=data)

    def ReadStdout(self, request: Any, context: Any) -> Any:
        return self._read(request, context, "stdout")

    def ReadStderr(self, request: Any, context: Any) -> Any:
        return self._read(request, context, "stderr")

    def WriteStdin(self, request: Any, context: Any) -> Any:
        if len(request.data) > MAX_IO_CHUNK:
            raise RpcError(StatusCode.INVALID_ARGUMENT,
                           f"data: more than {MAX_IO_CHUNK} bytes")
        proc = self.sandbox.process(request.container_id, request.exec_id)
        with cancellation(context) as cancel:
            try:
                n = proc.io.stdin.write(bytes(request.data), cancel)
            except StreamEOF:
                raise _eof() from None
        return agent_pb2.WriteStreamResponse(len=n)

    def CloseStdin(self, request: Any, context: Any) -> Any:
        self.sandbox.close_stdin(request.container_id, request.exec_id)
        return empty_pb2.Empty()

    def TtyWinResize(self, request: Any, context: Any) -> Any:
        if request.row > MAX_TTY_SIDE or request.column > MAX_TTY_SIDE:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "row/column above 65535")
        proc = self.sandbox.process(request.container_id, request.exec_id)
        if not proc.io.terminal:
            raise RpcError(StatusCode.FAILED_PRECONDITION,
                           "the process has no terminal to resize")
        proc.io.resize(request.row, request.column)
        return empty_pb2.Empty()
