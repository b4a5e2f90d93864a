"""``overlay`` / ``overlayfs``: an overlay of directories that all lie inside the allowed
roots (layers unpacked by the host into the shared directory, tmpfs upper layers).

Each layer is opened with O_PATH inside its root (no symlink can lead out) and handed to
the kernel as ``/proc/self/fd/N``, so a path swapped after the check changes nothing.
"""

from __future__ import annotations

import errno
import os

from kata_agent import safe_path
from kata_agent.engine.errors import HostError, NotFoundError, SpecError
from kata_agent.storage.base import DriverContext, fs_options
from kata_agent.storage.options import root_of
from kata_agent.storage.spec import MountPlan, StorageSpec

NAMES = ("overlay", "overlayfs")
MAX_LAYERS = 64
_DIR_KEYS = ("lowerdir", "upperdir", "workdir")


def _open_dir(path: str, ctx: DriverContext, field: str) -> int:
    root, rel = root_of(path, ctx.allowed_roots, field)
    try:
        return safe_path.open_in_root(root, rel, os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        raise NotFoundError(f"{path!r} does not exist", errno=errno.ENOENT, field=field) from None
    except NotADirectoryError:
        raise SpecError(f"{path!r} is not a directory", errno=errno.ENOTDIR, field=field) from None
    except OSError as e:
        raise HostError(f"cannot open {path!r}: {e.strerror}", errno=e.errno or 0,
                        field=field) from e


def plan(spec: StorageSpec, ctx: DriverContext) -> MountPlan:
    if spec.fstype not in ("", "overlay", "overlayfs"):
        raise SpecError(f"overlay storage cannot mount {spec.fstype!r}", field="fstype")
    flags, propagation, data = fs_options(spec)
    dirs: dict[str, str] = {}
    others: list[str] = []
    for i, word in enumerate(data):
        key, _, value = word.partition("=")
        if key in _DIR_KEYS:
            if key in dirs:
                raise SpecError(f"{key} given twice", field=f"options[{i}]")
            dirs[key] = value
        elif "dir" in key:
            # datadir=, lowerdir+= and friends would name paths we have not checked.
            raise SpecError(f"overlay option {key!r} is not supported", field=f"options[{i}]")
        else:
            others.append(word)
    if not dirs.get("lowerdir"):
        raise SpecError("overlay needs lowerdir=", field="options")
    if ("upperdir" in dirs) != ("workdir" in dirs):
        raise SpecError("upperdir and workdir go together", field="options")
    lowers = dirs["lowerdir"].split(":")
    if len(lowers) > MAX_LAYERS:
        raise SpecError(f"{len(lowers)} lower layers, at most {MAX_LAYERS}",
                        field="options.lowerdir")
    fds: list[int] = []
    try:
        for n, path in enumerate(lowers):
            fds.append(_open_dir(path, ctx, f"options.lowerdir[{n}]"))
        words = ["lowerdir=" + ":".join(f"/proc/self/fd/{fd}" for fd in fds)]
        for key in ("upperdir", "workdir"):
            if key in dirs:
                fd = _open_dir(dirs[key], ctx, f"options.{key}")
                fds.append(fd)
                words.append(f"{key}=/proc/self/fd/{fd}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return MountPlan(source="overlay", fstype="overlay", flags=flags, propagation=propagation,
                     data=",".join([*words, *others]), hold_fds=tuple(fds))
