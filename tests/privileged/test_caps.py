"""Capabilities applied for real in a child process, read back from /proc/self/status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kata_agent.engine.caps import CAPABILITIES

CHILD = r"""
import json, os, sys
from kata_agent.engine.caps import Capabilities, apply_capabilities, keep_caps_for_setuid
doc = json.loads(sys.argv[1])
uid = int(sys.argv[2])
if uid:
    keep_caps_for_setuid()
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
apply_capabilities(Capabilities.from_oci(doc))
out = {}
for line in open("/proc/self/status"):
    k, _, v = line.partition(":")
    if k.startswith("Cap"):
        out[k] = int(v, 16)
out["uid"] = os.getuid()
# behaviour, not only bits: CAP_CHOWN lets us chown a file we do not own
try:
    os.chown(sys.argv[3], 12345, 12345)
    out["chown"] = 0
except OSError as e:
    out["chown"] = e.errno
print(json.dumps(out))
"""


def mask(*names: str) -> int:
    m = 0
    for n in names:
        m |= 1 << CAPABILITIES[n]
    return m


def run_child(doc: dict[str, Any], uid: int, target: str) -> dict[str, int]:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(doc), str(uid), target],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, int] = json.loads(r.stdout)
    return out


def test_root_drops_to_the_requested_sets(tmp_path: Any) -> None:
    f = tmp_path / "f"
    f.write_text("")
    doc = {"bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
           "effective": ["CAP_NET_BIND_SERVICE"], "permitted": ["CAP_NET_BIND_SERVICE"],
           "inheritable": ["CAP_NET_BIND_SERVICE"], "ambient": ["CAP_NET_BIND_SERVICE"]}
    out = run_child(doc, 0, str(f))
    nbs = mask("CAP_NET_BIND_SERVICE")
    assert out["CapBnd"] == mask("CAP_CHOWN", "CAP_NET_BIND_SERVICE")
    assert out["CapEff"] == out["CapPrm"] == out["CapInh"] == out["CapAmb"] == nbs
    assert out["chown"] == 1  # EPERM: CAP_CHOWN is only in the bounding set


def test_caps_survive_setuid_to_an_unprivileged_user() -> None:
    # uid 1000 must reach the file without CAP_DAC_OVERRIDE: a world-searchable directory
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        f = os.path.join(d, "f")
        Path(f).write_text("")
        doc = {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_CHOWN"],
               "permitted": ["CAP_CHOWN", "CAP_KILL"], "inheritable": [], "ambient": []}
        out = run_child(doc, 1000, f)
        assert os.stat(f).st_uid == 12345
    assert out["uid"] == 1000
    assert out["CapBnd"] == mask("CAP_CHOWN", "CAP_KILL")
    assert out["CapPrm"] == mask("CAP_CHOWN", "CAP_KILL")
    assert out["CapEff"] == mask("CAP_CHOWN") and out["CapAmb"] == 0
    assert out["chown"] == 0
