"""``delete``: stop what is left, then remove the cgroup and the state dir. The container's
mounts live in its own mount namespace and vanish with its last process."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

from kata_agent.engine import state as st_mod
from kata_agent.engine.errors import EngineError, NotFoundError, StateError
from kata_agent.engine.kill import kill_and_wait

if TYPE_CHECKING:
    from kata_agent.engine.container import Engine

log = logging.getLogger(__name__)


def delete(engine: Engine, container_id: str, force: bool = False) -> None:
    try:
        cstate = engine.state(container_id)
    except NotFoundError:
        # A create that died between reserving the id and saving the state leaves an
        # empty dir behind; --force clears it so the id can be used again.
        if force and os.path.isdir(engine.store.dir(container_id)):
            engine.store.remove(container_id)
            return
        raise
    if cstate.status in (st_mod.RUNNING, st_mod.PAUSED) and not force:
        raise StateError(f"container {container_id!r} is {cstate.status}; stop it or use "
                         "--force")
    cg = engine.open_cgroup(cstate.cgroups_path, container_id, existing=True)
    if cstate.status != st_mod.STOPPED or force:
        kill_and_wait(engine, cstate, cg=cg)
    if cg is not None:
        cg.destroy()
    if st_mod.has_hooks(cstate.config, "poststop"):
        _poststop(cstate)
    with contextlib.suppress(FileNotFoundError):
        engine.store.remove(container_id)
    log.info("event=deleted container=%s", container_id)


def _poststop(cstate: st_mod.ContainerState) -> None:
    from kata_agent.engine.create import run_hooks
    from kata_agent.engine.spec import Spec

    try:
        spec = Spec.from_oci(cstate.config)
        run_hooks(spec, ("poststop",), st_mod.with_status(cstate, st_mod.STOPPED))
    except EngineError as e:
        # poststop failures are reported, never a reason to keep a dead container around
        log.warning("event=poststop_failed container=%s error=%s", cstate.id, e)
