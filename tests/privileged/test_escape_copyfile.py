"""Escape attempts against CopyFile (GuestOps.copy_file) as root, racing a real attacker.

tests/unit/test_guest_copyfile.py covers each static trick once (``..``, absolute and
relative symlinks, a temp file swapped between two chunks). Here the directory tree is
changed *while* copies run, by a thread doing what a process sharing the directory could
do, in both resolution modes of safe_path (openat2 RESOLVE_IN_ROOT and the O_NOFOLLOW
walk used on kernels without openat2); and the temp file is replaced by special files.
As root, DAC checks do not save us: only the confinement does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kata_agent import guest, safe_path
from kata_agent.engine.errors import EngineError, SpecError
from kata_agent.guest import CopyFileRequest, GuestOps

CHUNK = 64 * 1024


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":
        # As on a kernel without openat2: safe_path resolves component by component.
        monkeypatch.setattr(safe_path, "_openat2_works", False)
    yield request.param


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    return shared, outside


def outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"original"
    st = (outside / "victim").stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644


def req(path: str, data: bytes, size: int, offset: int, *, uid: int = 4242) -> CopyFileRequest:
    return CopyFileRequest(path=path, file_size=size, file_mode=0o4755, dir_mode=0o755,
                           uid=uid, gid=uid, offset=offset, data=data)


def copy_whole(ops: GuestOps, path: str, payload: bytes) -> None:
    for off in range(0, len(payload), CHUNK):
        ops.copy_file(req(path, payload[off:off + CHUNK], len(payload), off))


TRICKS = {
    "dotdot": ("{shared}/sbx/../../outside/victim", None),
    "dotdot-deep": ("{shared}/a/b/../../../outside/new", None),
    "absolute-parent": ("{shared}/lnk/victim", "{outside}"),
    "relative-parent": ("{shared}/lnk/victim", "../../../../../../../../..{outside}"),
    "target-is-link": ("{shared}/lnk", "{outside}/victim"),
    "dangling-target": ("{shared}/lnk", "{outside}/new"),
    "dangling-parent": ("{shared}/lnk/new", "{outside}/newdir"),
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_static_tricks_in_both_resolution_modes(dirs: tuple[Path, Path], mode: str,
                                                trick: str) -> None:
    """Attack: ``..`` in the path, and absolute, relative, dangling symlinks as the parent
    or the target, in both resolution modes (the unit tests run only the default one)."""
    shared, outside = dirs
    path, link = TRICKS[trick]
    if link is not None:
        os.symlink(link.format(outside=outside), shared / "lnk")
    try:
        GuestOps(shared_dir=shared).copy_file(
            req(path.format(shared=shared, outside=outside), b"pwned", 5, 0))
    except EngineError:
        pass
    else:
        assert trick not in ("dotdot", "dotdot-deep")
    outside_untouched(outside)
    assert not (outside.parent / "new").exists()


@pytest.mark.parametrize("swap", ["parent-dir", "grandparent-dir", "target-file"])
def test_symlink_swap_race_during_multi_chunk_copies(dirs: tuple[Path, Path], mode: str,
                                                      swap: str) -> None:
    """Attack: a thread swaps a directory on the target's path (or the target itself) for a
    symlink to a directory outside, in a tight loop, while four-chunk copies run (the
    TOCTOU window between resolving and writing, and between chunks). No byte may land
    outside, no owner or mode may change there, and errors are engine errors only."""
    shared, outside = dirs
    os.chmod(outside / "victim", 0o644)
    ops = GuestOps(shared_dir=shared)
    base = shared / "sbx"
    base.mkdir()
    if swap == "parent-dir":
        swapped, target = base / "d", base / "d" / "victim"
    elif swap == "grandparent-dir":
        swapped, target = base / "d", base / "d" / "e" / "victim"
        (base / "d" / "e").mkdir(parents=True)
    else:
        swapped, target = base / "victim", base / "victim"
    link_to = outside if swap != "target-file" else outside / "victim"
    if swap != "target-file":
        swapped.mkdir(exist_ok=True)
    stop = threading.Event()
    swaps = 0
    progress = threading.Condition()

    def swapper() -> None:
        nonlocal swaps
        parked = swapped.with_name(swapped.name + ".parked")
        link = swapped.with_name(swapped.name + ".link")
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.symlink(str(link_to), link)
                if swapped.exists() and not swapped.is_symlink():
                    os.rename(swapped, parked)
                os.rename(link, swapped)           # now a symlink to the outside
                os.unlink(swapped)
                if parked.exists():
                    os.rename(parked, swapped)     # the real one is back
            with progress:
                swaps += 1
                progress.notify_all()

    payload = bytes(i & 0xFF for i in range(4 * CHUNK))
    outcomes = {"copied": 0, "refused": 0}
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline or outcomes["copied"] == 0:
            assert time.monotonic() < deadline + 30, f"never copied: {outcomes}"
            with progress:
                seen = swaps

                def moved(before: int = seen) -> bool:
                    return swaps > before

                assert progress.wait_for(moved, timeout=10), "swapper stuck"
            try:
                copy_whole(ops, str(target), payload)
            except EngineError:
                outcomes["refused"] += 1
            else:
                outcomes["copied"] += 1
            outside_untouched(outside)
    finally:
        stop.set()
        thread.join(10)
    outside_untouched(outside)
    # Whatever was written is inside the shared directory, with the modes masked.
    for p in shared.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), p
    assert outcomes["copied"] >= 1 and swaps >= 10, (outcomes, swaps)


@pytest.mark.parametrize("link", [
    "/proc/self/root{outside}",
    "/proc/self/cwd",
    "/proc/1/root{outside}",
    "/proc/self/fd/0",
])
def test_magic_link_parents_never_lead_outside(dirs: tuple[Path, Path], mode: str,
                                               link: str) -> None:
    """Attack: a directory symlink through procfs magic links (/proc/self/root,
    /proc/PID/root, /proc/self/fd/N), which ignore any root if followed."""
    shared, outside = dirs
    os.symlink(link.format(outside=outside), shared / "m")
    with contextlib.suppress(EngineError):
        GuestOps(shared_dir=shared).copy_file(req(f"{shared}/m/victim", b"pwned", 5, 0))
    outside_untouched(outside)


@pytest.mark.parametrize("special", ["char-device", "socket"])
def test_temp_file_replaced_by_a_special_file_is_refused(dirs: tuple[Path, Path],
                                                         special: str) -> None:
    """Attack: between two chunks the temp file becomes a device node (/dev/null's 1:3,
    standing for any device) or a socket; the second chunk must not write to it."""
    shared, outside = dirs
    ops = GuestOps(shared_dir=shared)
    target = f"{shared}/sbx/f"
    ops.copy_file(req(target, b"aaaa", 8, 0, uid=-1))
    tmp = shared / "sbx" / guest.temp_name("f")
    tmp.unlink()
    if special == "char-device":
        os.mknod(tmp, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        s = socket.socket(socket.AF_UNIX)
        with contextlib.chdir(tmp.parent):  # the full path is longer than sun_path
            s.bind(tmp.name)
        s.close()
    with pytest.raises(EngineError):
        ops.copy_file(req(target, b"bbbb", 8, 4, uid=-1))
    assert not (shared / "sbx/f").exists()
    outside_untouched(outside)


def test_temp_file_replaced_by_a_fifo_does_not_block(dirs: tuple[Path, Path]) -> None:
    """Attack: between two chunks the temp file becomes a FIFO with no reader. Opening it
    for writing would wait for a reader forever, holding the copy lock: every later
    CopyFile would hang too."""
    shared, outside = dirs
    ops = GuestOps(shared_dir=shared)
    target = f"{shared}/sbx/f"
    ops.copy_file(req(target, b"aaaa", 8, 0, uid=-1))
    tmp = shared / "sbx" / guest.temp_name("f")
    tmp.unlink()
    os.mkfifo(tmp)
    result: list[BaseException | None] = []

    def second_chunk() -> None:
        try:
            ops.copy_file(req(target, b"bbbb", 8, 4, uid=-1))
            result.append(None)
        except BaseException as err:  # recorded for the assertion below
            result.append(err)

    t = threading.Thread(target=second_chunk, daemon=True)
    t.start()
    t.join(5)
    blocked = t.is_alive()
    if blocked:
        # Be the reader it waits for, so the thread ends and the lock is released.
        fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
        t.join(10)
        os.close(fd)
    assert not blocked, "CopyFile blocked on a FIFO planted as its temp file"
    assert isinstance(result[0], SpecError)
    outside_untouched(outside)
