"""manifest.json: what an image build produced, from which versions, with checksums."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from .common import Arch, sha256_file

KERNEL_NAMES = {"x86_64": "vmlinuz", "aarch64": "Image"}
_BANNER = re.compile(rb"Linux version (\S+)")


def kernel_version(path: Path) -> str | None:
    """Release string of a bzImage (setup header) or of an uncompressed arm64 Image (banner)."""
    data = path.read_bytes()
    if len(data) > 0x210 and data[0x202:0x206] == b"HdrS":
        (offset,) = struct.unpack_from("<H", data, 0x20E)
        start = 0x200 + offset
        end = data.find(b"\0", start, start + 512)
        if offset and end > start:
            return data[start:end].decode(errors="replace").split(" ", 1)[0]
    match = _BANNER.search(data)
    return match.group(1).decode(errors="replace") if match else None


def file_record(path: Path) -> dict[str, Any]:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def build_manifest(
    *,
    arch: Arch,
    epoch: int,
    kernel: Path | None,
    files: list[Path],
    rootfs_size: int,
    rootfs_files: int,
    inputs_hash: str,
    agent_version: str,
    mkosi_version: str,
    python_packages: dict[str, dict[str, str]],
    debian_packages: dict[str, str],
    boot_args: dict[str, str],
    layout: dict[str, int],
) -> dict[str, Any]:
    artifacts = [file_record(p) for p in files]
    if kernel is not None:
        artifacts.insert(0, file_record(kernel))
    return {
        "arch": arch.name,
        "source_date_epoch": epoch,
        "inputs_sha256": inputs_hash,
        "files": artifacts,
        "versions": {
            "kernel": kernel_version(kernel) if kernel is not None else None,
            "python": debian_packages.get("python3.11"),
            "systemd": debian_packages.get("systemd"),
            "agent": agent_version,
            "mkosi": mkosi_version,
            "distribution": "debian bookworm",
        },
        "rootfs": {"bytes": rootfs_size, "entries": rootfs_files},
        "python_packages": python_packages,
        "debian_packages": dict(sorted(debian_packages.items())),
        "disk_layout": layout,
        "kernel_args": boot_args,
    }


def write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    dest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
