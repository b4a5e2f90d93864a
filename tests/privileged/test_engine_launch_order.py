"""The launcher hears from two processes on one socket: stage1 reports the init's pid,
the init reports it is ready. Nothing orders the two; a loaded machine can deliver
"ready" first, and the launch must still come back with the init's pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.privileged.test_oci_cli import make_rootfs

# Runs in a fresh interpreter: the launcher forks, and the test process may have threads
# (gRPC) that a fork must not copy.
SCENARIO = r'''
import json, os, select, sys
from kata_agent.engine import process
from kata_agent.engine.container import Engine, Stdio
from kata_agent.engine.spec import Spec, default_spec
from kata_agent.engine.state import pid_alive

base, rootfs = sys.argv[1], sys.argv[2]
doc = default_spec()
doc["process"]["terminal"] = False
doc["process"]["args"] = ["true"]
doc["root"]["path"] = rootfs
spec = Spec.from_oci(doc)
# The init gets the pipe's write end as its preserved fd 3 and writes to it once it sent
# "ready"; stage1 holds the pid message back until then.
r, w = os.pipe()
send = process.send_msg


def ordered_send(sock, msg, fds=()):
    if msg.get("type") == "pid":
        if not select.select([r], [], [], 60)[0]:
            os._exit(3)
    send(sock, msg, fds)
    if msg.get("type") == "ready":
        os.write(3, b"r")


class DirectLauncher:
    def launch(self, req, fds):
        return process.launch(req, fds)


process.send_msg = ordered_send
engine = Engine(os.path.join(base, "state"), use_cgroups=False, launcher=DirectLauncher())
out = {}
try:
    cstate = engine.create("order", base, spec, stdio=Stdio.inherit(), preserve_fds=[w])
    out = {"pid": cstate.pid, "alive": pid_alive(cstate.pid, cstate.pid_start_time),
           "status": engine.state("order").status, "signal": os.read(r, 1).decode()}
except Exception as e:
    out = {"error": f"{type(e).__name__}: {e}"}
finally:
    try:
        engine.delete("order", force=True)
    except Exception as e:
        out["delete_error"] = str(e)
print(json.dumps(out))
'''


def test_ready_before_pid_still_yields_the_init_pid(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    p = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path), str(rootfs)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert "error" not in out and "delete_error" not in out, out
    assert out["pid"] > 0 and out["alive"] is True
    assert out["status"] == "created"
    assert out["signal"] == "r"  # the forced order really happened
    assert not os.path.exists(tmp_path / "state" / "order")
