"""Errors of the container engine.

One type per kind of failure; each carries an errno (0 when none applies) and, for spec
errors, the OCI field path at fault. The RPC edge maps these to gRPC status codes.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every engine failure."""

    def __init__(self, msg: str, *, errno: int = 0, field: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.errno = errno
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.msg}"
        return self.msg


class SpecError(EngineError):
    """The OCI spec or request is invalid; `field` names the offending path
    (for example ``linux.resources.memory.limit``)."""


class NotFoundError(EngineError):
    """No such container, process or file."""


class AlreadyExistsError(EngineError):
    """A container or process with that id exists already."""


class StateError(EngineError):
    """The operation does not fit the container's current state."""


class HostError(EngineError):
    """A system call failed for a reason that is not the caller's fault."""
