"""`make image`: rootfs (cached) -> initrd.img, rootfs.img, manifest.json in build/<arch>/."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from . import rootfs as rootfs_mod
from .common import Arch, hash_inputs, sha256_file
from .cpio import write_initrd
from .disk import KERNEL_ARGS_PMEM, KERNEL_ARGS_VIRTIO, measure, write_disk_image
from .manifest import KERNEL_NAMES, build_manifest, write_manifest
from .nsdax import DAX_ALIGNMENT, DAX_DATA_OFFSET, PFN_INFO_OFFSET, ROOT_PARTITION_START

log = logging.getLogger(__name__)

INITRD = "initrd.img"
DISK = "rootfs.img"
MANIFEST = "manifest.json"
CONSOLE = {"x86_64": "console=ttyS0", "aarch64": "console=ttyAMA0"}


def boot_args(arch: Arch) -> dict[str, str]:
    console = CONSOLE[arch.name]
    return {
        "initrd_systemd": f"{console} rdinit=/init",
        "initrd_agent_init": f"{console} rdinit={'/' + rootfs_mod.AGENT_LAUNCHER}",
        "disk_virtio": f"{console} {KERNEL_ARGS_VIRTIO} init=/usr/lib/systemd/systemd",
        "disk_pmem": f"{console} {KERNEL_ARGS_PMEM} init=/usr/lib/systemd/systemd",
        "disk_agent_init": f"{console} {KERNEL_ARGS_VIRTIO} init={'/' + rootfs_mod.AGENT_LAUNCHER}",
    }


def place_kernel(arch: Arch, build_dir: Path) -> Path | None:
    """The kernel the kernel target left in build/<arch>/, or one named by $KERNEL."""
    dest = build_dir / KERNEL_NAMES[arch.name]
    override = os.environ.get("KERNEL")
    if override:
        src = Path(override).resolve()
        if src != dest.resolve():
            shutil.copyfile(src, dest)
    if dest.exists():
        return dest
    log.warning("step=kernel status=missing path=%s (run `make kernel ARCH=%s`)", dest, arch.name)
    return None


def python_packages(paths: rootfs_mod.RootfsPaths, arch: Arch,
                    debian: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for wheel in sorted(paths.wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        out[name.replace("_", "-").lower()] = {
            "version": version, "source": f"PyPI wheel ({arch.wheel_platform})",
            "file": wheel.name, "sha256": sha256_file(wheel)}
    pins = rootfs_mod.pinned_requirements()
    for name, why in rootfs_mod.FROM_DEBIAN.items():
        deb = why.split(" ", 1)[0]
        out[name] = {"version": debian.get(deb, "missing"), "pinned": pins.get(name, ""),
                     "source": f"Debian package {why}"}
    return out


def build_image(arch: Arch, build_dir: Path, epoch: int, cache: Path,
                force_rootfs: bool = False) -> Path:
    build_dir.mkdir(parents=True, exist_ok=True)
    root = rootfs_mod.build_rootfs(arch, build_dir, epoch, cache, force=force_rootfs)
    paths = rootfs_mod.RootfsPaths.for_build(build_dir)
    digest = paths.stamp.read_text().strip()
    initrd, disk, out = build_dir / INITRD, build_dir / DISK, build_dir / MANIFEST
    # Artifacts depend on the rootfs, the builder code, the epoch and the kernel file.
    kernel = place_kernel(arch, build_dir)
    artifacts_hash = hash_inputs(
        [Path(__file__).resolve().parent] + ([kernel] if kernel else []),
        [digest, str(epoch)])
    stamp = paths.work / "artifacts.inputs"
    if (all(p.exists() for p in (initrd, disk, out)) and stamp.exists()
            and stamp.read_text().strip() == artifacts_hash):
        log.info("step=artifacts status=up-to-date hash=%s", artifacts_hash[:12])
        return out
    stamp.unlink(missing_ok=True)

    log.info("step=initrd")
    raw_size = write_initrd(root, initrd, epoch)
    log.info("step=initrd status=done cpio_bytes=%d gzip_bytes=%d", raw_size, initrd.stat().st_size)

    log.info("step=disk")
    layout = write_disk_image(root, disk, f"{arch.name}:{digest}", epoch)
    log.info("step=disk status=done image_bytes=%d", layout.image_size)

    debian = rootfs_mod.package_versions(paths.mkosi_manifest)
    usage = measure(root)
    manifest = build_manifest(
        arch=arch, epoch=epoch, kernel=kernel, files=[initrd, disk],
        rootfs_size=usage.bytes_in_blocks, rootfs_files=usage.files, inputs_hash=digest,
        agent_version=str(rootfs_mod.project_metadata()["version"]),
        mkosi_version=rootfs_mod.MKOSI_VERSION,
        python_packages=python_packages(paths, arch, debian),
        debian_packages=debian, boot_args=boot_args(arch),
        layout={"image_bytes": layout.image_size, "pfn_info_offset": PFN_INFO_OFFSET,
                "dax_data_offset": DAX_DATA_OFFSET, "dax_alignment": DAX_ALIGNMENT,
                "root_partition_offset": ROOT_PARTITION_START},
    )
    write_manifest(out, manifest)
    stamp.write_text(artifacts_hash + "\n")
    for item in manifest["files"]:
        log.info("artifact name=%s bytes=%d sha256=%s", item["name"], item["size"],
                 item["sha256"][:16])
    return out
