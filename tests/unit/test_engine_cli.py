"""kata-oci argument handling that needs no container."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kata_agent import oci_cli
from kata_agent.engine.errors import SpecError
from kata_agent.engine.spec import Spec


@pytest.mark.parametrize(("text", "num"), [("KILL", 9), ("SIGTERM", 15), ("9", 9),
                                           ("usr1", int(signal.SIGUSR1))])
def test_parse_signal(text: str, num: int) -> None:
    assert oci_cli.parse_signal(text) == num


def test_parse_bad_signal() -> None:
    with pytest.raises(SpecError):
        oci_cli.parse_signal("SIGNOPE")


def test_exit_status_like_a_shell() -> None:
    for code, want in (("exit 0", 0), ("exit 7", 7), ("kill -9 $$", 137), ("kill -15 $$", 143)):
        p = subprocess.Popen(["sh", "-c", code])
        _, status = os.waitpid(p.pid, 0)
        p.returncode = 0
        assert oci_cli.exit_status(status) == want


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kata_agent.oci_cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_spec_writes_default_config(tmp_path: Path) -> None:
    assert _cli("spec", "--bundle", str(tmp_path)).returncode == 0
    doc = json.loads((tmp_path / "config.json").read_text())
    assert Spec.from_oci(doc).root.path == "rootfs"
    assert _cli("spec", "--bundle", str(tmp_path)).returncode == 1  # no overwrite


def test_state_of_unknown_container_fails(tmp_path: Path) -> None:
    r = _cli("--root", str(tmp_path), "state", "nope")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_invalid_id_rejected(tmp_path: Path) -> None:
    r = _cli("--root", str(tmp_path), "state", "../x")
    assert r.returncode == 1 and "id:" in r.stderr


def test_systemd_cgroup_flag_is_an_error(tmp_path: Path) -> None:
    r = _cli("--root", str(tmp_path), "--systemd-cgroup", "list")
    assert r.returncode == 1 and "systemd" in r.stderr


def test_list_empty_root(tmp_path: Path) -> None:
    r = _cli("--root", str(tmp_path / "none"), "list", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
