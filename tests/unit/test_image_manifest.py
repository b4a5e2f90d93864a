"""manifest.json contents: files with sizes and checksums, versions, kernel release parsing."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "image-build"))

from kata_image import common, image, manifest  # noqa: E402


def fake_bzimage(path: Path, release: str) -> None:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x600)  # string at 0x200 + 0x600
    text = f"{release} (builder@host) #1 SMP".encode() + b"\0"
    data[0x800:0x800 + len(text)] = text
    path.write_bytes(bytes(data))


def test_kernel_version_from_bzimage_header(tmp_path: Path) -> None:
    fake_bzimage(tmp_path / "vmlinuz", "6.1.99-kata")
    assert manifest.kernel_version(tmp_path / "vmlinuz") == "6.1.99-kata"


def test_kernel_version_from_arm64_banner(tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(b"\0" * 64 + b"Linux version 6.1.7-arm (gcc) #2" + b"\0")
    assert manifest.kernel_version(tmp_path / "Image") == "6.1.7-arm"
    (tmp_path / "junk").write_bytes(b"\0" * 64)
    assert manifest.kernel_version(tmp_path / "junk") is None


def test_manifest_records_files_versions_and_sources(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    fake_bzimage(kernel, "6.1.99-kata")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd bytes")
    arch = common.arch_by_name("x86_64")
    data = manifest.build_manifest(
        arch=arch, epoch=1234, kernel=kernel, files=[initrd], rootfs_size=4096,
        rootfs_files=3, inputs_hash="ab" * 32, agent_version="0.1.0", mkosi_version="24.3",
        python_packages={"grpcio": {"version": "1.85.1"}},
        debian_packages={"python3.11": "3.11.2-6", "systemd": "252.39-1"},
        boot_args=image.boot_args(arch), layout={"image_bytes": 1},
    )
    names = [f["name"] for f in data["files"]]
    assert names == ["vmlinuz", "initrd.img"]
    rec = data["files"][1]
    assert rec["size"] == len(b"initrd bytes")
    assert rec["sha256"] == hashlib.sha256(b"initrd bytes").hexdigest()
    assert data["versions"] == {"kernel": "6.1.99-kata", "python": "3.11.2-6",
                                "systemd": "252.39-1", "agent": "0.1.0", "mkosi": "24.3",
                                "distribution": "debian bookworm"}
    assert data["source_date_epoch"] == 1234
    assert "rdinit=/init" in data["kernel_args"]["initrd_systemd"]
    assert "root=/dev/pmem0p1" in data["kernel_args"]["disk_pmem"]

    out = tmp_path / "manifest.json"
    manifest.write_manifest(out, data)
    first = out.read_bytes()
    manifest.write_manifest(out, json.loads(first))
    assert out.read_bytes() == first  # stable key order, no timestamps
    assert json.loads(first)["arch"] == "x86_64"


def test_manifest_without_kernel(tmp_path: Path) -> None:
    disk = tmp_path / "rootfs.img"
    disk.write_bytes(b"x")
    data = manifest.build_manifest(
        arch=common.arch_by_name("aarch64"), epoch=1, kernel=None, files=[disk],
        rootfs_size=1, rootfs_files=1, inputs_hash="0", agent_version="0.1.0",
        mkosi_version="24.3", python_packages={}, debian_packages={}, boot_args={},
        layout={},
    )
    assert [f["name"] for f in data["files"]] == ["rootfs.img"]
    assert data["versions"]["kernel"] is None


def test_python_package_sources_name_debian_substitutes(tmp_path: Path) -> None:
    from kata_image import rootfs

    paths = rootfs.RootfsPaths.for_build(tmp_path)
    paths.wheels.mkdir(parents=True)
    (paths.wheels / "grpcio-1.85.1-cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"w")
    out = image.python_packages(paths, common.arch_by_name("x86_64"),
                                {"python3-prctl": "1.8.1-1+b2"})
    assert out["grpcio"]["version"] == "1.85.1"
    assert out["grpcio"]["sha256"] == hashlib.sha256(b"w").hexdigest()
    assert out["python-prctl"]["version"] == "1.8.1-1+b2"
    assert "Debian" in out["python-prctl"]["source"]
    assert out["python-prctl"]["pinned"] == rootfs.pinned_requirements()["python-prctl"]
