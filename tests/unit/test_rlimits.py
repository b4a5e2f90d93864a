from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
from kata_agent.engine.errors import SpecError
from kata_agent.engine.rlimits import RLIMITS, Rlimit

U64 = (1 << 64) - 1


def test_every_rlimit_maps_to_the_resource_module() -> None:
    for name, number in RLIMITS.items():
        assert getattr(resource, name, number) == number
    assert len(RLIMITS) == 16 and sorted(RLIMITS.values()) == list(range(16))


def test_from_oci_and_list() -> None:
    r = Rlimit.from_oci({"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}, "x")
    assert (r.type, r.soft, r.hard, r.number) == ("RLIMIT_NOFILE", 1024, 4096, 7)
    rl = Rlimit.list_from_oci([{"type": "RLIMIT_CORE", "soft": U64, "hard": U64}])
    assert rl[0].hard == U64
    assert Rlimit.list_from_oci(None) == ()


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}], "process.rlimits[0].type"),
        ([{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}], "process.rlimits[0].soft"),
        ([{"type": "RLIMIT_NOFILE", "soft": 1}], "process.rlimits[0].hard"),
        ([{"type": "RLIMIT_NOFILE", "soft": 5, "hard": 1}], "process.rlimits[0].soft"),
        ([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}] * 2, "process.rlimits[1].type"),
        ({"type": "RLIMIT_NOFILE"}, "process.rlimits"),
    ],
)
def test_invalid(items: object, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        Rlimit.list_from_oci(items)
    assert ei.value.field == field


CHILD = """
import json, resource, sys
from kata_agent.engine.rlimits import Rlimit, apply_rlimits
try:
    apply_rlimits(Rlimit.list_from_oci(json.loads(sys.argv[1])))
except Exception as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
print(json.dumps({n: resource.getrlimit(getattr(resource, n)) for n in sys.argv[2:]}))
"""


def _child(items: list[dict[str, int | str]], *names: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(items), *names],
                         capture_output=True, text=True, check=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_apply_in_a_child_process() -> None:
    _, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = _child([{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 128},
                  {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}], "RLIMIT_NOFILE", "RLIMIT_CORE")
    assert got == {"RLIMIT_NOFILE": [64, 128], "RLIMIT_CORE": [0, 0]}
    assert nofile_hard >= 128


def test_unlimited_is_translated() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        pytest.skip("host capability missing: unlimited RLIMIT_FSIZE hard limit")
    got = _child([{"type": "RLIMIT_FSIZE", "soft": U64, "hard": U64}], "RLIMIT_FSIZE")
    assert got == {"RLIMIT_FSIZE": [resource.RLIM_INFINITY, resource.RLIM_INFINITY]}


def test_raising_above_hard_limit_fails_as_engine_error() -> None:
    # Unprivileged raising of the hard limit fails; as root it may succeed.
    import os

    if os.geteuid() == 0:
        got = _child([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2},
                      {"type": "RLIMIT_CORE", "soft": -0, "hard": 0}], "RLIMIT_NOFILE")
        assert got == {"RLIMIT_NOFILE": [1, 2]}
        return
    got = _child([{"type": "RLIMIT_NOFILE", "soft": 1 << 40, "hard": 1 << 40}])
    assert "RLIMIT_NOFILE" in str(got["error"])
