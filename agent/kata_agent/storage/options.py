"""Validation of host-given storage fields and mount option parsing."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Sequence

from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import SpecError
from kata_agent.engine.mounts import CLEAR_FLAGS, PROPAGATION, SET_FLAGS

MAX_OPTIONS = 64
MAX_OPTION_LEN = 4096
MAX_PATH_LEN = 4096
MAX_SOURCE_LEN = 4096

# The container engine's option words, plus a few that only filesystem mounts use.
FLAG_WORDS: dict[str, int] = {
    **dict.fromkeys(CLEAR_FLAGS, 0),
    **SET_FLAGS,
    "silent": sc.MS_SILENT,
    "loud": 0,
    "acl": 1 << 16,  # MS_POSIXACL
    "iversion": 1 << 23,  # MS_I_VERSION
}

# Flag words that turn off a flag another word may have set.
CLEAR_WORDS: dict[str, int] = CLEAR_FLAGS

PROPAGATION_WORDS: dict[str, int] = PROPAGATION

# Storage mounts create new filesystems; these would instead re-mount, bind or move an
# existing guest path (a bind of /etc into a container volume, a remount of /).
FORBIDDEN_FLAGS = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_MOVE

_FSTYPE_RE = re.compile(r"^[a-z0-9][a-z0-9_.]{0,31}$")


def check_text(value: str, field: str, *, limit: int = MAX_OPTION_LEN) -> str:
    if "\0" in value:
        raise SpecError("contains a NUL byte", field=field)
    if len(value) > limit:
        raise SpecError(f"longer than {limit} characters", field=field)
    return value


def check_list(values: Sequence[str], field: str, *, limit: int = MAX_OPTIONS) -> tuple[str, ...]:
    # Bounded so a host cannot make us build huge mount data strings.
    if len(values) > limit:
        raise SpecError(f"{len(values)} entries, at most {limit} allowed", field=field)
    for i, v in enumerate(values):
        check_text(v, f"{field}[{i}]")
    return tuple(values)


def parse_mount_options(options: Sequence[str], field: str = "options"
                        ) -> tuple[int, int, list[str]]:
    """Split option words into (mount flags, propagation flags, data words). An entry may
    hold several words joined by ',' (the 1.x runtime sends the 9p options that way)."""
    check_list(options, field)
    flags = 0
    propagation = 0
    data: list[str] = []
    for entry in options:
        for opt in entry.split(","):
            if opt in FLAG_WORDS:
                flags &= ~CLEAR_WORDS.get(opt, 0)
                flags |= FLAG_WORDS[opt]
            elif opt in PROPAGATION_WORDS:
                propagation |= PROPAGATION_WORDS[opt]
            elif opt:
                data.append(opt)
    return flags, propagation, data


def split_kv(options: Iterable[str]) -> dict[str, str]:
    """``key=value`` words as a dict (the last one wins); other words are ignored."""
    out: dict[str, str] = {}
    for opt in options:
        key, eq, value = opt.partition("=")
        if eq and key:
            out[key] = value
    return out


def check_fstype(fstype: str, field: str = "fstype") -> str:
    if not _FSTYPE_RE.match(fstype):
        raise SpecError(f"invalid filesystem type {fstype!r}", field=field)
    return fstype


def check_abs_path(path: str, field: str) -> str:
    """An absolute, normalised path: no '..', no '.', no '//' and no trailing '/'."""
    check_text(path, field, limit=MAX_PATH_LEN)
    if not path.startswith("/"):
        raise SpecError(f"{path!r} is not an absolute path", field=field)
    # normpath keeps a leading '//', so compare component lists as well.
    parts = path.split("/")[1:]
    if posixpath.normpath(path) != path or any(p in ("", ".", "..") for p in parts):
        raise SpecError(f"{path!r} is not a normalised path", field=field)
    return path


def normalize_mount_point(path: str, field: str = "mount_point") -> str:
    """The 1.x runtime sends the shared directory with a trailing '/'; drop one."""
    if len(path) > 1 and path.endswith("/") and not path.endswith("//"):
        path = path[:-1]
    return check_abs_path(path, field)


def root_of(path: str, roots: Sequence[str], field: str) -> tuple[str, str]:
    """The allowed root holding ``path`` and the path relative to it; the path must lie
    strictly below the root."""
    check_abs_path(path, field)
    for root in roots:
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return root, path[len(prefix):]
    # Keeps a hostile host from mounting over /etc, /proc, /sbin or the agent itself.
    raise SpecError(f"{path!r} is outside the allowed roots {list(roots)}", field=field)


def parse_mode(value: str, field: str) -> int:
    if not re.fullmatch(r"0?[0-7]{1,4}", value):
        raise SpecError(f"invalid octal mode {value!r}", field=field)
    return int(value, 8)


def parse_id(value: str, field: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) >= 0xFFFFFFFF:
        raise SpecError(f"invalid id {value!r}", field=field)
    return int(value)


def dev_name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}", name))


def dev_node(path: str, dev_root: str, field: str) -> str:
    """Map a host-given ``/dev/...`` path to the node under ``dev_root`` (``/dev`` in the
    guest); anything not under /dev is refused."""
    check_abs_path(path, field)
    if not path.startswith("/dev/"):
        # Source devices come from /dev only: no regular files, no paths elsewhere.
        raise SpecError(f"{path!r} is not a device under /dev", field=field)
    return dev_root.rstrip("/") + path[len("/dev"):]


def is_block(path: str) -> bool:
    try:
        return os.path.exists(path) and (os.stat(path).st_mode & 0o170000) == 0o060000
    except OSError:
        return False
