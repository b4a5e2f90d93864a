"""RPC implementations, one module per group of grpc.AgentService / grpc.Health methods.

``build_services`` wires them to one sandbox, storage manager, network and guest: the
object graph of a running agent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kata_agent.config import AgentConfig

log = logging.getLogger(__name__)


def seccomp_supported(status_path: str = "/proc/self/status") -> bool:
    """The guest kernel filters syscalls (a ``Seccomp:`` line in /proc/self/status)."""
    try:
        with open(status_path) as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def build_services(cfg: AgentConfig, *, launcher: Any, state_root: str,
                   cgroup_root: str = "/sys/fs/cgroup", paths: Any = None,
                   policy: Any = None, keeper: Any = None,
                   stored_fds: dict[str, list[int]] | None = None) -> list[object]:
    """Every service of the agent. ``launcher`` starts container processes (the zygote:
    the agent is threaded); ``state_root`` holds the engine's per-container state;
    ``policy`` (default: allow all) decides which RPCs, containers and execs may run;
    ``keeper`` (persist.Keeper) keeps the sandbox across agent restarts, and with it the
    sandbox a previous agent left is taken back, with the ``stored_fds`` it kept."""
    from kata_agent.engine import syscalls as sc
    from kata_agent.engine.container import Engine
    from kata_agent.guest import GuestOps
    from kata_agent.network import Network
    from kata_agent.policy import Policy
    from kata_agent.sandbox import Sandbox
    from kata_agent.service.containers import ContainerService
    from kata_agent.service.guest import GuestService
    from kata_agent.service.health import HealthService
    from kata_agent.service.network import NetworkService
    from kata_agent.service.processes import ProcessService
    from kata_agent.service.sandbox import SandboxService
    from kata_agent.service.streams import StreamService
    from kata_agent.storage import StorageManager
    from kata_agent.storage.devices import DEVICE_TYPES

    syscalls = sc.Syscalls()
    engine = Engine(state_root, syscalls=syscalls, cgroup_root=cgroup_root, launcher=launcher)
    storage = StorageManager(syscalls, hotplug_timeout=cfg.hotplug_timeout)
    policy = policy or Policy.allow_all()
    sandbox = Sandbox(engine, storage, pipe_size=cfg.container_pipe_size, paths=paths,
                      syscalls=syscalls, policy=policy, keeper=keeper)
    if keeper is not None:
        sandbox.restore(stored_fds if stored_fds is not None else {})
    ops = GuestOps(device_handlers=DEVICE_TYPES, storage_handlers=storage.handlers(),
                   supports_seccomp=seccomp_supported())
    # After CPU hotplug the containers' cpusets follow the CPUs now online.
    ops.cpu_hooks.append(sandbox.set_container_cpus)
    services: list[object] = [
        HealthService(), SandboxService(sandbox), ContainerService(sandbox),
        ProcessService(sandbox), StreamService(sandbox), NetworkService(Network()),
        GuestService(ops),
    ]
    return [policy.guard(s) for s in services]


def close_services(services: Iterable[object]) -> None:
    """Agent shutdown: containers removed, storages unmounted, background work stopped."""
    done: set[int] = set()
    for s in services:
        target = getattr(s, "sandbox", None) or getattr(s, "ops", None)
        close = getattr(target, "close", None)
        if target is None or id(target) in done or not callable(close):
            continue
        done.add(id(target))
        try:
            close()
        except Exception:
            log.exception("event=close_failed service=%s", type(s).__name__)
