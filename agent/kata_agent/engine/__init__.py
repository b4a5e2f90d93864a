"""libcontainer-style container engine: typed OCI spec, namespaces, rootfs, lifecycle."""

from __future__ import annotations

from kata_agent.engine.container import Engine, InProcessLauncher, Stdio
from kata_agent.engine.errors import (
    AlreadyExistsError,
    EngineError,
    HostError,
    NotFoundError,
    SpecError,
    StateError,
)
from kata_agent.engine.spec import Process, Spec
from kata_agent.engine.state import ContainerState

__all__ = [
    "AlreadyExistsError", "ContainerState", "Engine", "EngineError", "HostError",
    "InProcessLauncher", "NotFoundError", "Process", "Spec", "SpecError", "StateError", "Stdio",
]
