"""Architectures, paths, hashing and process running shared by the build steps."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent

# Used when neither SOURCE_DATE_EPOCH nor a git commit time is available.
FALLBACK_EPOCH = 1700000000


@dataclass(frozen=True, slots=True)
class Arch:
    name: str  # kernel/uname spelling, also the build/<name> folder
    mkosi: str  # mkosi --architecture
    deb: str  # Debian architecture
    wheel_platform: str  # pip --platform
    qemu_user: str  # binfmt_misc entry name for foreign builds


ARCHES: Mapping[str, Arch] = {
    "x86_64": Arch("x86_64", "x86-64", "amd64", "manylinux2014_x86_64", "qemu-x86_64"),
    "aarch64": Arch("aarch64", "arm64", "arm64", "manylinux2014_aarch64", "qemu-aarch64"),
}
ALIASES: Mapping[str, str] = {"amd64": "x86_64", "arm64": "aarch64", "x86-64": "x86_64"}


def arch_by_name(name: str) -> Arch:
    key = ALIASES.get(name, name)
    if key not in ARCHES:
        raise ValueError(f"unsupported architecture {name!r}; known: {sorted(ARCHES)}")
    return ARCHES[key]


def host_arch() -> Arch:
    return arch_by_name(os.uname().machine)


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH if set, else the commit time of HEAD, so rebuilds are identical."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return FALLBACK_EPOCH


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def iter_tree(root: Path) -> Iterable[Path]:
    """Files of a source tree in a stable order, without caches."""
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        if path.is_file() or path.is_symlink():
            yield path


def hash_inputs(paths: Sequence[Path], extra: Sequence[str]) -> str:
    """Content hash of files and folders (names, symlink targets, bytes) plus extra strings."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for top in paths:
        files = [top] if top.is_file() else list(iter_tree(top))
        for path in files:
            name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            digest.update(str(name).encode() + b"\0")
            if path.is_symlink():
                digest.update(b"L" + os.readlink(path).encode() + b"\0")
            else:
                digest.update(sha256_file(path).encode() + b"\0")
    return digest.hexdigest()


def run(cmd: Sequence[str | Path], *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, capture: bool = False) -> str:
    """Run a command, logging it and its duration; raise CalledProcessError on failure."""
    argv = [str(c) for c in cmd]
    log.info("run cmd=%s", " ".join(argv))
    started = time.monotonic()
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        argv, env=full_env, cwd=cwd, check=True, text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    log.info("done cmd=%s seconds=%.1f", argv[0], time.monotonic() - started)
    return proc.stdout if capture else ""


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
