"""Reproducible initramfs: "newc" cpio of a directory tree, gzip-compressed.

Entries are sorted (parents first), owned by root, stamped with one mtime, numbered in
order. Hard links share an inode number and only the first one carries the bytes, which
is what the kernel's initramfs unpacker expects (it links later names to the first).
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    mode: int
    ino: int
    nlink: int
    mtime: int
    data: bytes
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def encode_entry(entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        entry.ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime,
        len(entry.data), 0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(header) == HEADER_LEN
    return header + name + _pad4(HEADER_LEN + len(name)) + entry.data + _pad4(len(entry.data))


# Device nodes an initramfs needs before anything mounts devtmpfs: the kernel opens
# /dev/console for init's stdio, and Python seeds its hashes from /dev/urandom when the
# kernel's random pool is not ready yet (agent as rdinit).
INITRD_NODES: tuple[tuple[str, int, int, int], ...] = (
    ("dev/console", stat.S_IFCHR | 0o600, 5, 1),
    ("dev/null", stat.S_IFCHR | 0o666, 1, 3),
    ("dev/urandom", stat.S_IFCHR | 0o666, 1, 9),
)


def _sort_key(name: str) -> list[bytes]:
    return name.encode().split(b"/")


def entries_from_tree(root: Path, mtime: int,
                      nodes: tuple[tuple[str, int, int, int], ...] = ()) -> Iterator[Entry]:
    """Archive entries for everything under root plus extra device nodes, in a fixed order."""
    items: list[tuple[str, Path | None]] = list(_all_paths(root))
    present = {name for name, _ in items}
    items += [(name, None) for name, _, _, _ in nodes if name not in present]
    node_spec = {name: (mode, major, minor) for name, mode, major, minor in nodes}
    seen: dict[tuple[int, int], int] = {}
    next_ino = 1
    for name, path in sorted(items, key=lambda item: _sort_key(item[0])):
        if path is None:
            mode, major, minor = node_spec[name]
            yield Entry(name, mode, next_ino, 1, mtime, b"", rdev_major=major, rdev_minor=minor)
            next_ino += 1
            continue
        st = os.lstat(path)
        mode = st.st_mode
        data = b""
        nlink = 2 if stat.S_ISDIR(mode) else 1
        rdev_major = rdev_minor = 0
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                yield Entry(name, mode, seen[key], st.st_nlink, mtime, b"")
                continue
            seen[key] = next_ino
            nlink = st.st_nlink
        if stat.S_ISREG(mode):
            data = path.read_bytes()
        elif stat.S_ISLNK(mode):
            data = os.fsencode(os.readlink(path))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev_major, rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        yield Entry(name, mode, next_ino, nlink, mtime, data,
                    rdev_major=rdev_major, rdev_minor=rdev_minor)
        next_ino += 1


def _all_paths(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield rel, Path(dirpath) / name


def write_archive(out: Writable, entries: Iterator[Entry], mtime: int) -> int:
    """Write entries and the trailer; returns the uncompressed size."""
    size = 0
    for entry in entries:
        chunk = encode_entry(entry)
        out.write(chunk)
        size += len(chunk)
    trailer = encode_entry(Entry(TRAILER, 0, 0, 1, mtime, b""))
    out.write(trailer)
    size += len(trailer)
    return size


def write_initrd(root: Path, dest: Path, mtime: int, level: int = 9,
                 nodes: tuple[tuple[str, int, int, int], ...] = INITRD_NODES) -> int:
    """gzip(newc cpio of root) into dest, byte-identical for identical trees."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=mtime,
    ) as gz:
        size = write_archive(gz, entries_from_tree(root, mtime, nodes), mtime)
    os.replace(tmp, dest)
    return size


def read_archive(data: bytes) -> list[Entry]:
    """Parse a newc archive (used to check what was written)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, filesize, _, _, rmaj, rmin, namesize, _ = fields
        name_start = pos + HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(HEADER_LEN + namesize) % 4)
        body = data[data_start:data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, ino, nlink, mtime, body, uid, gid, rmaj, rmin))
