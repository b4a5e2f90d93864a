"""libcontainer-style container engine: typed OCI spec, namespaces, rootfs, lifecycle.

The names below load on first use, so importing one submodule (the CLI's ``state`` or
``delete`` path, the sealed-interpreter helper) does not pull in the whole engine.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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

_WHERE = {
    "Engine": "container", "InProcessLauncher": "container", "Stdio": "container",
    "AlreadyExistsError": "errors", "EngineError": "errors", "HostError": "errors",
    "NotFoundError": "errors", "SpecError": "errors", "StateError": "errors",
    "Process": "spec", "Spec": "spec", "ContainerState": "state",
}

__all__ = [
    "AlreadyExistsError", "ContainerState", "Engine", "EngineError", "HostError",
    "InProcessLauncher", "NotFoundError", "Process", "Spec", "SpecError", "StateError", "Stdio",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value
