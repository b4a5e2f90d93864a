"""``start``: release the init blocked on the exec-wait socket so it execs the workload."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

from kata_agent.engine import state as st_mod
from kata_agent.engine.errors import HostError, StateError

if TYPE_CHECKING:
    from kata_agent.engine.container import Engine

log = logging.getLogger(__name__)


def start(engine: Engine, container_id: str) -> None:
    cstate = engine.state(container_id)
    if cstate.status != st_mod.CREATED:
        raise StateError(f"container {container_id!r} is {cstate.status}, not created")
    dfd = os.open(engine.store.dir(container_id), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(f"/proc/self/fd/{dfd}/{st_mod.EXEC_SOCKET}")
        s.sendall(b"0")
        # The init answers once it left the wait: only then is the container running.
        if s.recv(1) != b"1":
            raise HostError(f"container {container_id!r} init died before exec")
    except OSError as e:
        raise HostError(f"starting {container_id!r}: {e}", errno=e.errno or 0) from e
    finally:
        s.close()
        os.close(dfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(engine.store.exec_socket(container_id))
    log.info("event=started container=%s pid=%d", container_id, cstate.pid)
    if st_mod.has_hooks(cstate.config, "poststart"):
        from kata_agent.engine.create import run_hooks
        from kata_agent.engine.spec import Spec

        run_hooks(Spec.from_oci(cstate.config), ("poststart",), cstate)
