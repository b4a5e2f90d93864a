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


@pytest.mark.parametrize("argv", [
    ["run", "--bundle", "/b", "c1"],
    ["--root", "/r", "--debug", "create", "-b", "/b", "--pid-file", "/p", "c1"],
    ["--root=/r", "--log-format", "json", "exec", "-t", "--env", "A=1", "c1", "sh", "-c", "x"],
    ["--log", "/l", "--systemd-cgroup", "delete", "-f", "run"],
    ["kill", "--all", "c1", "KILL"],
    ["list", "-q"],
    ["ps", "--format", "json", "c1"],
    ["spec", "--rootless"],
    ["state", "exec"],
])
def test_one_verb_parser_parses_like_the_full_one(argv: list[str]) -> None:
    verb = oci_cli.verb_of(argv)
    assert verb is not None and verb in oci_cli.VERBS
    assert verb == oci_cli.build_parser().parse_args(argv).verb
    full = vars(oci_cli.build_parser().parse_args(argv))
    assert vars(oci_cli.build_parser(verb).parse_args(argv)) == full


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["--ro", "/r", "run", "x"], ["--", "run", "x"], ["--root", "/r"],
    ["nosuchverb", "x"], ["-x", "run", "x"],
])
def test_verb_of_gives_up_on_anything_unusual(argv: list[str]) -> None:
    assert oci_cli.verb_of(argv) is None


def test_verb_of_skips_option_values_named_like_verbs() -> None:
    assert oci_cli.verb_of(["--root", "run", "--log", "exec", "state", "c1"]) == "state"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(*sorted(sys.modules))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(out.split())


def test_front_end_loads_no_engine_before_the_sealed_reexec() -> None:
    """What runs before the re-exec is thrown away: it must not load the engine."""
    mods = _modules_after("import kata_agent.oci_cli, kata_agent.engine.sealed")
    assert "kata_agent.engine.sealed" in mods
    heavy = {"argparse", "logging", "dataclasses", "kata_agent.engine.container",
             "kata_agent.engine.process", "kata_agent.engine.spec", "ctypes"}
    assert not heavy & mods


def test_delete_and_state_paths_skip_the_launcher(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    mods = _modules_after(
        "from kata_agent import oci_cli\n"
        f"assert oci_cli.main(['--root', {str(tmp_path)!r}, 'delete', '-f', 'half']) == 0\n"
        f"assert oci_cli.main(['--root', {str(tmp_path)!r}, 'state', 'gone']) == 1")
    assert not (tmp_path / "half").exists()
    assert "kata_agent.engine.delete" in mods
    for m in ("kata_agent.engine.process", "kata_agent.engine.create",
              "kata_agent.engine.mounts", "kata_agent.engine.spec",
              "kata_agent.engine.seccomp"):
        assert m not in mods, m


def test_forced_delete_of_nothing_loads_no_engine(tmp_path: Path) -> None:
    mods = _modules_after(
        "from kata_agent import oci_cli\n"
        f"assert oci_cli.main(['--root', {str(tmp_path)!r}, 'delete', '--force', 'gone']) == 0")
    assert "kata_agent.engine.container" not in mods
    assert "kata_agent.engine.state" not in mods


def test_forced_delete_still_checks_the_id(tmp_path: Path) -> None:
    r = _cli("--root", str(tmp_path), "delete", "--force", "../x")
    assert r.returncode == 1 and "id:" in r.stderr


def test_forced_delete_clears_a_dir_without_state(tmp_path: Path) -> None:
    """What a create that died before saving its state leaves behind."""
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "exec.sock").write_text("")
    assert _cli("--root", str(tmp_path), "delete", "half").returncode == 1
    assert _cli("--root", str(tmp_path), "delete", "--force", "half").returncode == 0
    assert not (tmp_path / "half").exists()
