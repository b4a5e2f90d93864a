"""Rootfs inputs: pins, launcher, units, the staged extra tree, the input hash."""

from __future__ import annotations

import configparser
import marshal
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "image-build"))

from kata_image import common, rootfs  # noqa: E402


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / name)
    return parser


def test_agent_service_contract() -> None:
    unit = read_unit("kata-agent.service")
    service = unit["Service"]
    assert service["Type"] == "notify"  # started once it serves (READY=1)
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "process"  # containers survive an agent restart
    # ...and their stdio too: the agent keeps it in the fd store while it restarts.
    assert int(service["FileDescriptorStoreMax"]) >= 1024
    # Power off only once restarts keep failing: FailureAction= would fire on the first crash.
    assert unit["Unit"]["StartLimitAction"] == "poweroff"
    assert "FailureAction" not in service and "FailureAction" not in unit["Unit"]
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    assert service["ExecStart"].split() == ["/" + rootfs.AGENT_LAUNCHER, "--cgroup-favordynmods"]
    assert "console" in service["StandardOutput"]
    assert unit["Unit"]["Before"] == "kata-containers.target"


def test_target_wants_agent_and_is_default() -> None:
    target = read_unit("kata-containers.target")
    assert "kata-agent.service" in target["Unit"]["Wants"].split()
    assert target["Unit"]["AllowIsolate"] == "yes"
    assert rootfs.DEFAULT_TARGET == "kata-containers.target"


def test_pins_and_debian_substitutes() -> None:
    pins = rootfs.pinned_requirements()
    assert pins["grpcio"] and pins["protobuf"] and pins["pyroute2"]
    # The agent serves gRPC with h2 (pure Python, same wheels on every architecture).
    assert pins["h2"] and pins["hpack"] and pins["hyperframe"]
    # Every pin comes either from a wheel or from a named Debian package.
    assert set(rootfs.FROM_DEBIAN) <= set(pins)
    assert "python-prctl" in rootfs.FROM_DEBIAN


def test_the_guest_gets_no_host_only_wheels() -> None:
    names = {pin.split("==")[0] for pin in rootfs.guest_pins()}
    # grpcio serves only the host tools: the agent never imports it (test_h2server).
    assert "grpcio" in rootfs.HOST_ONLY and "grpcio" not in names
    assert "python-prctl" not in names  # from Debian
    assert {"protobuf", "pyroute2", "h2", "hpack", "hyperframe"} <= names
    assert rootfs.wheel_project(Path("grpcio-1.85.1-cp311-cp311-manylinux.whl")) == "grpcio"
    assert rootfs.wheel_project(Path("typing_extensions-4.1-py3-none-any.whl")) == \
        "typing-extensions"


def test_launcher_is_a_python_script_for_the_console_entry_point() -> None:
    text = rootfs.launcher_text()
    assert text.startswith("#!/usr/bin/python3 -Iu\n")
    assert "from kata_agent.__main__ import main" in text
    assert "initmode.run_as_init(main)" in text
    compile(text, "kata-agent", "exec")


def test_masked_units_keep_what_boot_needs() -> None:
    masked = set(rootfs.MASKED_UNITS)
    assert {"getty.target", "serial-getty@.service", "systemd-networkd.service",
            "systemd-timesyncd.service", "systemd-journal-flush.service",
            "systemd-firstboot.service"} <= masked
    assert not masked & {"systemd-journald.service", "kata-agent.service", "basic.target"}


def test_hash_changes_with_content_and_extra(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("one")
    first = common.hash_inputs([tmp_path], ["x86_64"])
    assert first == common.hash_inputs([tmp_path], ["x86_64"])
    assert first != common.hash_inputs([tmp_path], ["aarch64"])
    (tmp_path / "a").write_text("two")
    assert first != common.hash_inputs([tmp_path], ["x86_64"])


def test_arch_names() -> None:
    assert common.arch_by_name("arm64").name == "aarch64"
    assert common.arch_by_name("x86_64").wheel_platform == "manylinux2014_x86_64"
    with pytest.raises(ValueError):
        common.arch_by_name("sparc")


@pytest.mark.slow
def test_stage_tree_from_a_real_agent_wheel(tmp_path: Path) -> None:
    paths = rootfs.RootfsPaths.for_build(tmp_path)
    paths.wheels.mkdir(parents=True)
    wheel = rootfs.build_agent_wheel(tmp_path / "agent-wheel")
    rootfs.stage_tree(common.host_arch(), paths, wheel)
    stage = paths.stage

    launcher = stage / rootfs.AGENT_LAUNCHER
    assert launcher.read_text() == rootfs.launcher_text()
    assert os.stat(launcher).st_mode & 0o111
    assert (stage / rootfs.SYSTEMD_UNIT_DIR / "kata-agent.service").read_bytes() == (
        REPO / "systemd" / "kata-agent.service").read_bytes()
    etc = stage / "etc" / "systemd" / "system"
    assert os.readlink(etc / "default.target").endswith("/kata-containers.target")
    assert all(os.readlink(etc / name) == "/dev/null" for name in rootfs.MASKED_UNITS)
    assert os.readlink(stage / "init") == "/usr/lib/systemd/systemd"
    assert (stage / "etc" / "systemd" / "journald.conf.d" / "10-kata.conf").exists()

    site = stage / rootfs.SITE_PACKAGES
    assert (site / "kata_agent" / "__init__.py").exists()
    assert not (site / "bin").exists()
    pyc = next((site / "kata_agent" / "__pycache__").glob("__init__.cpython-311.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])
    # Tracebacks in the guest name guest paths, not the build host's staging folder.
    assert code.co_filename == f"/{rootfs.SITE_PACKAGES}/kata_agent/__init__.py"
