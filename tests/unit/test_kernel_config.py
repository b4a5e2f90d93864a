"""Kernel config fragments, allow list and the build cache key (image-build/kernel-tool.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "kernel-config"
TOOL = ROOT / "image-build" / "kernel-tool.py"
BUILD_SCRIPT = ROOT / "image-build" / "build-kernel.sh"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernel_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_tool"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


kt = _load_tool()


def _copy_tree(dest: Path) -> tuple[Path, Path, Path]:
    shutil.copytree(CONFIG_DIR, dest / "kernel-config")
    (dest / "image-build").mkdir()
    shutil.copy2(BUILD_SCRIPT, dest / "image-build" / "build-kernel.sh")
    shutil.copy2(TOOL, dest / "image-build" / "kernel-tool.py")
    return (
        dest / "kernel-config",
        dest / "image-build" / "build-kernel.sh",
        dest / "image-build" / "kernel-tool.py",
    )


# --- parsing ----------------------------------------------------------------------------------


def test_parse_all_value_forms() -> None:
    text = "\n".join(
        [
            "# a plain comment",
            "",
            "CONFIG_A=y",
            "CONFIG_B=m",
            "CONFIG_C=n",
            'CONFIG_D="some string"',
            "CONFIG_E=42",
            "CONFIG_F=0x1000",
            "CONFIG_G=-1",
            "# CONFIG_H is not set",
        ]
    )
    options = kt.parse_config_text(text, "frag.conf")
    got = {o.name: o.value for o in options}
    assert got == {
        "CONFIG_A": "y",
        "CONFIG_B": "m",
        "CONFIG_C": "n",
        "CONFIG_D": '"some string"',
        "CONFIG_E": "42",
        "CONFIG_F": "0x1000",
        "CONFIG_G": "-1",
        "CONFIG_H": "n",
    }
    assert options[0].origin == "frag.conf:3"


@pytest.mark.parametrize(
    "line",
    ["CONFIG_A=yes", "CONFIG_A=", "A=y", "CONFIG_A y", 'CONFIG_A="unterminated', "CONFIG_A=1.5"],
)
def test_parse_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(kt.ConfigError):
        kt.parse_config_text(line, "bad.conf")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_real_fragments_parse_without_conflicts(arch: str) -> None:
    requested = kt.requested_options(CONFIG_DIR, kt.kernel_arch(arch))
    # The concerns the guest depends on are all requested.
    for name in [
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_SCSI_VIRTIO",
        "CONFIG_NET_9P_VIRTIO",
        "CONFIG_VIRTIO_FS",
        "CONFIG_FS_DAX",
        "CONFIG_USER_NS",
        "CONFIG_TIME_NS",
        "CONFIG_CGROUP_BPF",
        "CONFIG_SECCOMP_FILTER",
        "CONFIG_OVERLAY_FS",
        "CONFIG_DEVTMPFS_MOUNT",
        "CONFIG_RD_GZIP",
        "CONFIG_MEMORY_HOTPLUG",
        "CONFIG_HOTPLUG_CPU",
        "CONFIG_VETH",
        "CONFIG_BRIDGE",
        "CONFIG_BINFMT_SCRIPT",
        "CONFIG_SMP",
    ]:
        assert requested[name].value == "y", name
    console = {
        "x86_64": "CONFIG_SERIAL_8250_CONSOLE",
        "aarch64": "CONFIG_SERIAL_AMBA_PL011_CONSOLE",
    }[arch]
    assert requested[console].value == "y"
    if arch == "x86_64":
        assert requested["CONFIG_ACPI_NFIT"].value == "y"
        assert requested["CONFIG_ARCH_MEMORY_PROBE"].value == "y"
    else:
        assert "CONFIG_ACPI_NFIT" not in requested


def test_fragment_files_are_sorted_common_first() -> None:
    files = kt.fragment_files(CONFIG_DIR, "arm64")
    parts = [f.parent.name for f in files]
    assert parts == sorted(parts, key=lambda p: p != "common")
    assert "x86_64" not in parts


def test_conflicting_requests_are_reported(tmp_path: Path) -> None:
    for part in ("common", "x86_64"):
        (tmp_path / "fragments" / part).mkdir(parents=True)
    (tmp_path / "fragments" / "common" / "a.conf").write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    (tmp_path / "fragments" / "x86_64" / "b.conf").write_text("# CONFIG_X is not set\nCONFIG_Y=y\n")
    with pytest.raises(kt.ConfigError, match=r"CONFIG_X: y \(fragments/common/a.conf:1\) vs n"):
        kt.requested_options(tmp_path, "x86_64")


def test_same_request_twice_with_same_value_is_fine(tmp_path: Path) -> None:
    for part in ("common", "x86_64"):
        (tmp_path / "fragments" / part).mkdir(parents=True)
    (tmp_path / "fragments" / "common" / "a.conf").write_text("CONFIG_X=y\n")
    (tmp_path / "fragments" / "x86_64" / "b.conf").write_text("CONFIG_X=y\n")
    assert kt.requested_options(tmp_path, "x86_64")["CONFIG_X"].value == "y"


def test_every_fragment_starts_with_a_comment() -> None:
    for path in sorted((CONFIG_DIR / "fragments").rglob("*.conf")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path} must say which concern it covers"


# --- allow list -------------------------------------------------------------------------------


def test_real_allow_list_entries_are_all_commented() -> None:
    text = (CONFIG_DIR / "allow-missing.txt").read_text()
    allowed = kt.parse_allow_list(text, "allow-missing.txt")
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert re.match(r"^CONFIG_\w+\s+#\s*\S", stripped), line
    assert all(reason for reason in allowed.values())


def test_allow_list_rejects_bare_names() -> None:
    with pytest.raises(kt.ConfigError, match="needs a '# reason'"):
        kt.parse_allow_list("# header\nCONFIG_FOO\n", "allow")
    with pytest.raises(kt.ConfigError, match="listed twice"):
        kt.parse_allow_list("CONFIG_FOO # a\nCONFIG_FOO # b\n", "allow")
    assert kt.parse_allow_list("CONFIG_FOO  # gone in 6.1\n", "allow") == {
        "CONFIG_FOO": "gone in 6.1"
    }


# --- verification -----------------------------------------------------------------------------


def test_missing_options_compares_values_and_treats_absent_as_n() -> None:
    req = {
        o.name: o
        for o in kt.parse_config_text(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=16\n", "f"
        )
    }
    final = {"CONFIG_A": "y", "CONFIG_D": "32"}
    lost = {o.name: got for o, got in kt.missing_options(req, final)}
    assert lost == {"CONFIG_B": "n", "CONFIG_D": "32"}


def _verify_cli(tmp_path: Path, final: str, allow: str) -> subprocess.CompletedProcess[str]:
    for part in ("common", "x86_64"):
        (tmp_path / "fragments" / part).mkdir(parents=True, exist_ok=True)
    (tmp_path / "fragments" / "common" / "a.conf").write_text(
        "# test\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n"
    )
    (tmp_path / "allow-missing.txt").write_text(allow)
    (tmp_path / "final.config").write_text(final)
    return subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "verify",
            "--config-dir",
            str(tmp_path),
            "--arch",
            "x86_64",
            "--config",
            str(tmp_path / "final.config"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_verify_fails_naming_every_lost_option(tmp_path: Path) -> None:
    result = _verify_cli(tmp_path, "CONFIG_A=y\n# CONFIG_B is not set\n", "")
    assert result.returncode == 1
    assert "MISSING: CONFIG_B=y" in result.stderr
    assert "MISSING: CONFIG_C=y" in result.stderr
    assert "CONFIG_A" not in result.stderr


def test_verify_accepts_allow_listed_losses(tmp_path: Path) -> None:
    result = _verify_cli(
        tmp_path, "CONFIG_A=y\n", "CONFIG_B  # test reason\nCONFIG_C  # another reason\n"
    )
    assert result.returncode == 0, result.stderr
    assert "allowed missing: CONFIG_B=y (got n): test reason" in result.stdout


def test_render_allconfig_round_trips() -> None:
    options = kt.parse_config_text('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="x y"\n', "f")
    again = kt.parse_config_text(kt.render_allconfig(options), "g")
    assert [(o.name, o.value) for o in again] == [(o.name, o.value) for o in options]


# --- cache key --------------------------------------------------------------------------------

SOURCE = "tarball:sha256:" + "ab" * 32


def test_cache_key_is_stable_for_an_identical_copy(tmp_path: Path) -> None:
    config_dir, script, tool = _copy_tree(tmp_path / "copy")
    original = kt.cache_key(SOURCE, CONFIG_DIR, BUILD_SCRIPT, TOOL, "x86_64")
    copied = kt.cache_key(SOURCE, config_dir, script, tool, "x86_64")
    assert re.fullmatch(r"[0-9a-f]{64}", original)
    assert copied == original
    # Touching files without changing them keeps the key.
    for path in config_dir.rglob("*.conf"):
        path.touch()
    assert kt.cache_key(SOURCE, config_dir, script, tool, "x86_64") == original


def test_cache_key_changes_with_each_input(tmp_path: Path) -> None:
    config_dir, script, tool = _copy_tree(tmp_path / "copy")
    base = kt.cache_key(SOURCE, config_dir, script, tool, "x86_64")
    keys = {base}

    def key() -> str:
        return str(kt.cache_key(SOURCE, config_dir, script, tool, "x86_64"))

    fragment = config_dir / "fragments" / "common" / "base.conf"
    original = fragment.read_text()
    fragment.write_text(original + "CONFIG_EXTRA_FOR_TEST=y\n")
    keys.add(key())
    fragment.write_text(original)
    assert key() == base  # reverting the change restores the key

    # An arm64-only fragment still counts: the key is over all fragments.
    (config_dir / "fragments" / "arm64" / "new.conf").write_text("# t\nCONFIG_Z=y\n")
    keys.add(key())
    (config_dir / "fragments" / "arm64" / "new.conf").unlink()

    allow = config_dir / "allow-missing.txt"
    allow.write_text(allow.read_text() + "CONFIG_Q  # reason\n")
    keys.add(key())
    allow.write_text((CONFIG_DIR / "allow-missing.txt").read_text())

    script.write_text(script.read_text() + "\n# changed\n")
    keys.add(key())
    shutil.copy2(BUILD_SCRIPT, script)
    assert key() == base

    keys.add(kt.cache_key("tarball:sha256:" + "cd" * 32, config_dir, script, tool, "x86_64"))
    keys.add(kt.cache_key(SOURCE, config_dir, script, tool, "aarch64"))
    assert len(keys) == 7


def test_renaming_a_fragment_changes_the_key(tmp_path: Path) -> None:
    config_dir, script, tool = _copy_tree(tmp_path / "copy")
    base = kt.cache_key(SOURCE, config_dir, script, tool, "x86_64")
    frag = config_dir / "fragments" / "common" / "9p.conf"
    frag.rename(frag.with_name("ninep.conf"))
    assert kt.cache_key(SOURCE, config_dir, script, tool, "x86_64") != base


def test_unknown_arch_is_rejected() -> None:
    with pytest.raises(kt.ConfigError, match="unknown arch"):
        kt.kernel_arch("riscv64")


def test_kernel_tool_is_lint_clean() -> None:
    """The tool lives outside the package, so the suite-wide linters do not see it."""
    bin_dir = Path(sys.executable).parent
    for cmd in (
        [str(bin_dir / "ruff"), "check", str(TOOL)],
        [str(bin_dir / "mypy"), "--strict", "--no-incremental", str(TOOL)],
    ):
        result = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
