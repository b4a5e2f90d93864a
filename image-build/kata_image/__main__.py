"""Command line: python -m kata_image {rootfs,image} --arch ARCH."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import REPO, arch_by_name, source_date_epoch
from .image import build_image
from .rootfs import build_rootfs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kata_image")
    parser.add_argument("step", choices=["rootfs", "image"])
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache")
    parser.add_argument("--force", action="store_true", help="rebuild the rootfs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[image] %(message)s", stream=sys.stderr)
    arch = arch_by_name(args.arch)
    build_dir = (args.build_dir or REPO / "build" / arch.name).resolve()
    epoch = source_date_epoch()
    cache = args.cache_dir.resolve()
    if args.step == "rootfs":
        build_rootfs(arch, build_dir, epoch, cache, force=args.force)
    else:
        build_image(arch, build_dir, epoch, cache, force_rootfs=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
