"""OCI spec parsing: valid specs become typed values, bad ones fail naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from kata_agent.engine.errors import SpecError
from kata_agent.engine.spec import MAX_ITEMS, Spec, default_spec, validate_id


def minimal() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]},
    }


def test_default_spec_parses_into_typed_values() -> None:
    spec = Spec.from_oci(default_spec())
    assert spec.root.path == "rootfs" and spec.root.readonly
    assert spec.process is not None and spec.process.args == ("sh",)
    assert [m.destination for m in spec.mounts][:3] == ["/proc", "/dev", "/dev/pts"]
    assert {n.type for n in spec.linux.namespaces} == {"pid", "network", "ipc", "uts", "mount",
                                                       "cgroup"}
    assert "/proc/kcore" in spec.linux.masked_paths
    assert spec.process.capabilities is not None
    assert "CAP_KILL" in spec.process.capabilities.bounding


def test_minimal_spec_fields() -> None:
    d = minimal()
    d["hostname"] = "box"
    d["process"]["user"] = {"uid": 5, "gid": 6, "additionalGids": [7, 8], "umask": 0o27}
    d["linux"]["sysctl"] = {"kernel.shmmax": "100"}
    d["linux"]["namespaces"].append({"type": "ipc"})
    spec = Spec.from_oci(d)
    assert spec.hostname == "box"
    assert spec.process is not None
    assert spec.process.user.uid == 5 and spec.process.user.additional_gids == (7, 8)
    assert spec.process.user.umask == 0o27
    assert spec.linux.sysctl == {"kernel.shmmax": "100"}
    assert spec.process.env_map() == {"PATH": "/bin"}


def test_bind_type_implies_bind_option() -> None:
    d = minimal()
    d["mounts"] = [{"destination": "/x", "type": "bind", "source": "/tmp"}]
    spec = Spec.from_oci(d)
    assert spec.mounts[0].is_bind


def _mutate(path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(minimal())
    keys = path.split("/")
    cur: Any = d
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    last = keys[-1]
    if value is _DELETE:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


_DELETE = object()

BAD = [
    ("root", _DELETE, "root"),
    ("root/path", "", "root.path"),
    ("linux/namespaces/0/type", "bogus", "linux.namespaces[0].type"),
    ("linux/namespaces/1", {"type": "pid"}, "linux.namespaces[1].type"),
    ("linux/namespaces/0/path", "relative/ns", "linux.namespaces[0].path"),
    ("mounts", [{"destination": "/x", "type": "nosuchfs"}], "mounts[0].type"),
    ("mounts", [{"destination": "x", "type": "tmpfs"}], "mounts[0].destination"),
    ("mounts", [{"destination": "/x", "type": "none"}], "mounts[0].type"),
    ("mounts", [{"destination": "/x", "type": "tmpfs", "options": [1]}], "mounts[0].options[0]"),
    ("process/args", [], "process.args"),
    ("process/env", ["NOEQUALS"], "process.env[0]"),
    ("process/cwd", "relative", "process.cwd"),
    ("process/user", {"uid": "0"}, "process.user.uid"),
    ("process/user", {"uid": -1}, "process.user.uid"),
    ("process/terminal", "yes", "process.terminal"),
    ("process/oomScoreAdj", 5000, "process.oomScoreAdj"),
    ("hostname", 7, "hostname"),
    ("linux/sysctl", {"kernel.panic": "1"}, "linux.sysctl.kernel.panic"),
    ("linux/sysctl", {"net.ipv4.ip_forward": "1"}, "linux.sysctl.net.ipv4.ip_forward"),
    ("linux/devices", [{"path": "/etc/x", "type": "c", "major": 1, "minor": 3}],
     "linux.devices[0].path"),
    ("linux/devices", [{"path": "/dev/x", "type": "q", "major": 1, "minor": 3}],
     "linux.devices[0].type"),
    ("linux/devices", [{"path": "/dev/x", "type": "c"}], "linux.devices[0].major"),
    ("linux/maskedPaths", ["proc/kcore"], "linux.maskedPaths[0]"),
    ("linux/rootfsPropagation", "sideways", "linux.rootfsPropagation"),
    ("linux/uidMappings", [{"containerID": 0, "hostID": 0, "size": 1}], "linux.uidMappings"),
    ("process/capabilities", {"bounding": ["CAP_NOPE"]}, "process.capabilities.bounding[0]"),
    ("mounts", [{"destination": "/x", "type": "tmpfs"}] * (MAX_ITEMS + 1), "mounts"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD, ids=[b[2] + ":" + b[0] for b in BAD])
def test_bad_specs_name_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        Spec.from_oci(_mutate(path, value))
    assert ei.value.field == field
    assert field in str(ei.value)


def test_hostname_needs_uts_namespace() -> None:
    d = minimal()
    d["hostname"] = "h"
    d["linux"]["namespaces"] = [{"type": "pid"}]
    with pytest.raises(SpecError) as ei:
        Spec.from_oci(d)
    assert ei.value.field == "hostname"


@pytest.mark.parametrize("good", ["a", "A.b_c+d-1", "0", "x" * 128])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 129, "../x", "-a", "a/b", "a b", ".a", "a\x00", "a\n",
                                 "é"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(SpecError) as ei:
        validate_id(bad)
    assert ei.value.field == "id"


def test_load_from_bundle(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(minimal()))
    assert Spec.load(str(tmp_path)).rootfs_path(str(tmp_path)) == str(tmp_path / "rootfs")


def test_load_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as ei:
        Spec.load(str(tmp_path))
    assert ei.value.field == "config"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not JSON"):
        Spec.load(str(tmp_path))
