"""The initramfs writer: newc round trip, order, hard links, reproducibility, GNU cpio reads it."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "image-build"))

from kata_image import cpio

EPOCH = 1_700_000_000


def make_tree(root: Path) -> None:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "etc" / "odd").write_bytes(b"abc")  # length not a multiple of 4
    (root / "etc" / "empty").write_bytes(b"")
    (root / "init").symlink_to("/usr/lib/systemd/systemd")
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool2")
    (root / "a-b").mkdir()  # sorts between "a" entries and "etc" bytewise
    (root / "dev").mkdir()


def test_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    out = tmp_path / "initrd.img"
    cpio.write_initrd(root, out, EPOCH)
    entries = cpio.read_archive(gzip.decompress(out.read_bytes()))
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {"a-b", "dev", "dev/console", "dev/null", "dev/urandom", "etc",
                            "etc/empty", "etc/odd", "init", "usr", "usr/bin",
                            "usr/bin/tool", "usr/bin/tool2"}
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert (by_name["dev/urandom"].rdev_major, by_name["dev/urandom"].rdev_minor) == (1, 9)
    assert by_name["etc/odd"].data == b"abc"
    assert by_name["etc/empty"].data == b""
    assert stat.S_ISLNK(by_name["init"].mode)
    assert by_name["init"].data == b"/usr/lib/systemd/systemd"
    assert stat.S_IMODE(by_name["usr/bin/tool"].mode) == 0o755
    assert stat.S_ISDIR(by_name["usr"].mode)
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == EPOCH for e in entries)


def test_parents_come_before_children(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    names = [e.name for e in cpio.entries_from_tree(root, EPOCH, cpio.INITRD_NODES)]
    for i, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent:
            assert parent in names[:i]
    assert names == sorted(names, key=lambda n: n.encode().split(b"/"))


def test_hard_links_share_inode_and_data_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    entries = {e.name: e for e in cpio.entries_from_tree(root, EPOCH)}
    first, second = entries["usr/bin/tool"], entries["usr/bin/tool2"]
    assert first.ino == second.ino
    assert first.nlink == second.nlink == 2
    assert first.data == b"#!/bin/sh\necho hi\n"
    assert second.data == b""
    inos = [e.ino for name, e in entries.items() if name != "usr/bin/tool2"]
    assert len(inos) == len(set(inos))


def test_reproducible_bytes(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    make_tree(one)
    make_tree(two)
    os.utime(two / "etc" / "odd", (1, 1))  # source mtimes must not leak into the archive
    cpio.write_initrd(one, tmp_path / "1.img", EPOCH)
    cpio.write_initrd(two, tmp_path / "2.img", EPOCH)
    assert (tmp_path / "1.img").read_bytes() == (tmp_path / "2.img").read_bytes()
    cpio.write_initrd(one, tmp_path / "3.img", EPOCH + 1)
    assert (tmp_path / "1.img").read_bytes() != (tmp_path / "3.img").read_bytes()


def test_header_layout_and_trailer() -> None:
    raw = cpio.encode_entry(cpio.Entry("x", 0o100644, 5, 1, EPOCH, b"hello"))
    assert raw[:6] == b"070701"
    assert raw[6:14] == b"00000005"  # ino
    assert raw[14:22] == b"000081A4"  # mode
    assert raw[54:62] == b"00000005"  # filesize
    assert raw[94:102] == b"00000002"  # namesize including NUL
    assert len(raw) % 4 == 0
    assert raw[110:112] == b"x\0"
    with pytest.raises(ValueError):
        cpio.read_archive(b"garbage!" * 20)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="host capability missing: cpio")
def test_gnu_cpio_lists_and_extracts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    out = tmp_path / "initrd.img"
    cpio.write_initrd(root, out, EPOCH)
    dest = tmp_path / "x"
    dest.mkdir()
    cpio.write_initrd(root, out, EPOCH, nodes=())  # extracting device nodes needs mknod
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                   input=gzip.decompress(out.read_bytes()), cwd=dest, check=True)
    assert (dest / "etc" / "odd").read_bytes() == b"abc"
    assert os.readlink(dest / "init") == "/usr/lib/systemd/systemd"
    assert (dest / "usr" / "bin" / "tool2").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "usr" / "bin" / "tool").stat().st_mtime == EPOCH
