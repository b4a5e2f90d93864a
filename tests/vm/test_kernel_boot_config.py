"""The config stage of build-kernel.sh against a real kernel tree: losses fail the build.

Runs on a copy of kernel-config/ with an extra fragment asking for an option that olddefconfig
cannot keep (its dependency is off), so nothing in the real tree changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import BUILD_TIMEOUT, ROOT, BuiltKernel

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 600)

# CONFIG_USB_STORAGE needs CONFIG_USB, which no guest fragment requests.
LOST = "CONFIG_USB_STORAGE"


def _kernel_tree() -> Path:
    if os.environ.get("KERNEL_SRC"):
        return Path(os.environ["KERNEL_SRC"])
    cache = Path(os.environ.get("KATA_CACHE", Path.home() / ".cache" / "kata-agent-py"))
    for tree in sorted((cache / "kernel-src").glob("*/*/Makefile")):
        if (tree.parent.parent / ".complete").exists():
            return tree.parent
    pytest.skip("host capability missing: an unpacked kernel tree (run make kernel first)")


def _copy_repo(dest: Path, allow_extra: str = "") -> Path:
    shutil.copytree(ROOT / "kernel-config", dest / "kernel-config")
    (dest / "image-build").mkdir()
    for name in ("build-kernel.sh", "kernel-tool.py"):
        shutil.copy2(ROOT / "image-build" / name, dest / "image-build" / name)
    (dest / "kernel-config" / "fragments" / "common" / "zz-test.conf").write_text(
        f"# test: an option whose dependency is off\n{LOST}=y\n"
    )
    allow = dest / "kernel-config" / "allow-missing.txt"
    allow.write_text(allow.read_text() + allow_extra)
    return dest / "image-build" / "build-kernel.sh"


def _config_only(script: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        KERNEL_SRC=str(_kernel_tree()),
        KATA_CACHE=str(tmp_path / "cache"),
        BUILD_DIR=str(tmp_path / "build"),
        KERNEL_CONFIG_ONLY="1",
    )
    return subprocess.run(
        [str(script), "x86_64"], capture_output=True, text=True, env=env, timeout=1200, check=False
    )


def test_lost_option_fails_the_build_naming_it(x86_64_kernel: BuiltKernel, tmp_path: Path) -> None:
    script = _copy_repo(tmp_path / "repo")
    result = _config_only(script, tmp_path)
    assert result.returncode != 0
    assert f"MISSING: {LOST}=y requested at fragments/common/zz-test.conf:2" in result.stderr
    assert "1 requested option(s) did not survive" in result.stderr
    assert not (tmp_path / "build").exists()


def test_allow_listed_loss_passes(x86_64_kernel: BuiltKernel, tmp_path: Path) -> None:
    script = _copy_repo(tmp_path / "repo", f"{LOST}  # test: USB is not part of the guest\n")
    result = _config_only(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"allowed missing: {LOST}=y (got n)" in result.stdout
    assert "config only:" in result.stdout
