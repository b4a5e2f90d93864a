"""Guest image figures: kernel, initrd and disk image sizes from the build manifests, and the
time from QEMU start to the agent's first Health.Check answer (through the agent.channel.0
port, yamux over QEMU's chardev socket). QEMU runs under TCG here, so the boot figure is
emulated: it shows trends between runs, not what KVM would give. Figures whose artefacts
are missing are skipped with the reason.

    .venv/bin/python bench/image_bench.py [--arch x86_64] [--boots 1] [--no-boot]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Figure, print_figures, record

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILE = {"x86_64": "vmlinuz", "aarch64": "Image"}
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
# Kata's published sizes (shared anchors): about 10 MB compressed kernel, 10-14 MB initrd,
# 128-512 MiB image (the smallest of each range is the one to beat).
KATA = "kata osbuilder (anchor)"
ANCHOR_MB = {"kernel": 10.0, "initrd": 10.0, "image": 128 * 1.048576}
BOOT_DEADLINE = 600.0


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_sizes(manifest: dict[str, Any] | None, kernel: dict[str, Any] | None) -> dict[str, int]:
    """Sizes in bytes by file name, from manifest.json's list and kernel.json's map."""
    sizes: dict[str, int] = {}
    if kernel is not None:
        for name, rec in (kernel.get("files") or {}).items():
            if isinstance(rec, dict) and isinstance(rec.get("size"), int):
                sizes[str(name)] = rec["size"]
    if manifest is not None:
        for rec in manifest.get("files") or []:
            if isinstance(rec, dict) and isinstance(rec.get("size"), int):
                sizes[str(rec.get("name"))] = rec["size"]
    return sizes


def size_figures(build: Path, arch: str) -> list[Figure]:
    manifest = read_json(build / "manifest.json")
    kernel = read_json(build / "kernel.json")
    sizes = file_sizes(manifest, kernel)
    wanted = [("kernel", KERNEL_FILE[arch], "kernel.json (make kernel)"),
              ("initrd", "initrd.img", "manifest.json (make image)"),
              ("image", "rootfs.img", "manifest.json (make image)")]
    figures = []
    for what, name, source in wanted:
        fig_name = f"image.{what}_size"
        if name not in sizes:
            figures.append(Figure.skipped(fig_name, "MB", f"no {name} in {build}/{source}"))
            continue
        figures.append(Figure(fig_name, "MB", sizes[name] / 1e6,
                              peers={KATA: ANCHOR_MB[what]}, note=f"{name}, {sizes[name]} bytes"))
    if manifest is not None and isinstance(manifest.get("rootfs"), dict):
        used = manifest["rootfs"].get("bytes")
        if isinstance(used, int):
            figures.append(Figure("image.rootfs_content", "MB", used / 1e6,
                                  note=f"{manifest['rootfs'].get('entries')} entries"))
    return figures


def boot_once(build: Path, arch: str, work: Path) -> tuple[float, float]:
    """(ms to the agent's "agent ready" on the console, ms to the first Health.Check answer)
    from QEMU start, booting the initrd with the agent as init."""
    import grpc
    from kata_agent.host.client import AgentClient
    from kata_agent.host.vm import VM
    from kata_agent.protocol import health_pb2

    sock = work / "agent.sock"
    vm = VM(arch=arch,  # type: ignore[arg-type]
            kernel=build / KERNEL_FILE[arch], initrd=build / "initrd.img", agent_socket=sock,
            kernel_args=["rdinit=/usr/bin/kata-agent"], memory_mib=1024, workdir=work)
    t0 = time.monotonic()
    vm.start()
    try:
        vm.wait_for_console("agent ready", timeout=BOOT_DEADLINE)
        console = time.monotonic()
        deadline = console + 120
        while True:
            try:
                with AgentClient(f"unix-serial:{sock}") as client:
                    client.health.Check(health_pb2.CheckRequest(), timeout=3)
                break
            except (grpc.RpcError, OSError):
                # The port may not be open in the guest yet; bytes sent then are lost.
                if time.monotonic() > deadline:
                    raise
        answered = time.monotonic()
    finally:
        vm.stop()
    return (console - t0) * 1000.0, (answered - t0) * 1000.0


def boot_figures(build: Path, arch: str, boots: int) -> list[Figure]:
    name = "image.qemu_start_to_agent_ready"
    kernel = build / KERNEL_FILE[arch]
    initrd = build / "initrd.img"
    for path in (kernel, initrd):
        if not path.is_file():
            return [Figure.skipped(name, "ms", f"{path} is missing (make kernel image)")]
    if shutil.which(QEMU[arch]) is None:
        return [Figure.skipped(name, "ms", f"{QEMU[arch]} is not installed")]
    console: list[float] = []
    answered: list[float] = []
    for _ in range(boots):
        with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
            try:
                c, a = boot_once(build, arch, Path(tmp))
            except Exception as err:  # any failure of the boot becomes the skip reason
                return [Figure.skipped(name, "ms", f"boot failed: {type(err).__name__}: "
                                                   f"{str(err)[:200]}")]
            console.append(c)
            answered.append(a)
    return [
        Figure.from_samples(name, "ms", answered,
                            note="QEMU TCG (emulated, no KVM here), initrd with the agent as "
                                 "init, first Health.Check answered"),
        Figure.from_samples("image.qemu_start_to_agent_log_ready", "ms", console,
                            note="the agent's 'agent ready' line on the serial console (TCG)"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--arch", default="x86_64", choices=sorted(KERNEL_FILE))
    p.add_argument("--boots", type=int, default=1)
    p.add_argument("--no-boot", action="store_true")
    p.add_argument("--build-dir", type=Path, default=None)
    args = p.parse_args()
    build = args.build_dir or ROOT / "build" / args.arch
    figures = size_figures(build, args.arch)
    if not args.no_boot:
        figures += boot_figures(build, args.arch, args.boots)
    record(figures)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
