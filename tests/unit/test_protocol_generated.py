"""The generated protocol modules match their .proto sources byte for byte.

Fails when a .proto file is edited without running `make protos`, or when a
generated module is edited by hand or left behind after its source is gone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "agent"
PROTO_DIR = AGENT_DIR / "kata_agent" / "protocol"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
EXPECTED_PROTOS = {"agent.proto", "health.proto", "oci.proto", "types.proto"}


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def test_proto_sources_are_the_expected_set() -> None:
    assert {p.name for p in PROTO_DIR.glob("*.proto")} == EXPECTED_PROTOS


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(AGENT_DIR)) for p in PROTO_DIR.glob("*.proto"))
    # Same command as the `protos` target of the top Makefile, output redirected.
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "agent",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", *protos,
        ],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh = _generated_files(tmp_path / "kata_agent" / "protocol")
    committed = _generated_files(PROTO_DIR)
    assert len(fresh) == 3 * len(EXPECTED_PROTOS)
    assert sorted(committed) == sorted(fresh), "stale or missing generated modules"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert stale == [], f"run `make protos`: out of date: {stale}"


def test_sources_do_not_depend_on_gogoproto() -> None:
    for proto in PROTO_DIR.glob("*.proto"):
        text = proto.read_text()
        assert "gogo" not in text, proto.name
        assert 'syntax = "proto3";' in text, proto.name
