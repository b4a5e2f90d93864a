"""Escape attempts against storage mount points, through the real StorageManager and real
tmpfs mounts (ephemeral driver).

A mount point is host input; the directories below the allowed root may also be shaped by
a container that shares them. Every trick here must end with the mount inside the root
(or refused) and nothing mounted, created or changed anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import EngineError, SpecError
from kata_agent.storage import StorageManager, StorageSpec

from tests.privileged.test_storage_mounts import mounts_under


@pytest.fixture
def area(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(allowed root, a directory outside it that must stay untouched)."""
    root = tmp_path / "run/kata-containers"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host data")
    yield root, outside
    left = mounts_under(tmp_path)
    sysc = sc.Syscalls()
    for target, *_ in reversed(left):
        sysc.umount2(target, sc.MNT_DETACH)
    assert left == [], f"left mounted: {left}"


@pytest.fixture
def mgr(area: tuple[Path, Path]) -> StorageManager:
    return StorageManager(sc.Syscalls(), hotplug_timeout=5, allowed_roots=(str(area[0]),))


def tmpfs(mount_point: Path | str) -> StorageSpec:
    return StorageSpec("ephemeral", "tmpfs", str(mount_point))


def assert_outside_untouched(outside: Path) -> None:
    assert mounts_under(outside) == []
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_text() == "host data"


@pytest.mark.parametrize("target", [
    "ROOT/../../outside",
    "ROOT/a/../../../outside/x",
    "ROOT/./../outside",
])
def test_dotdot_mount_points_never_leave_the_root(mgr: StorageManager,
                                                  area: tuple[Path, Path], target: str) -> None:
    """Attack: ``..`` in the mount point climbs out of the allowed root."""
    root, outside = area
    with pytest.raises(SpecError) as err:
        mgr.add(tmpfs(target.replace("ROOT", str(root))))
    assert err.value.field == "mount_point"
    assert_outside_untouched(outside)


@pytest.mark.parametrize("link", ["absolute", "relative", "proc-self-root"])
def test_symlinked_mount_point_is_resolved_inside_the_root(
        mgr: StorageManager, area: tuple[Path, Path], link: str) -> None:
    """Attack: a directory under the root is a symlink to a directory outside (absolute,
    relative with many ``..``, or through the /proc/self/root magic link)."""
    root, outside = area
    target = {"absolute": str(outside),
              "relative": "../" * 12 + str(outside).lstrip("/"),
              "proc-self-root": f"/proc/self/root{outside}"}[link]
    os.symlink(target, root / "evil")
    try:
        handle = mgr.add(tmpfs(root / "evil" / "m"))
    except EngineError as err:
        # Refusing is fine (magic links are refused outright); escaping is not.
        assert err.field == "mount_point" or err.errno is not None
        assert_outside_untouched(outside)
        return
    mounted = mounts_under(root)
    assert len(mounted) == 1 and mounted[0][1] == "tmpfs"
    assert_outside_untouched(outside)
    mgr.remove(handle)
    assert mounts_under(root) == []


def test_mount_point_symlinked_to_proc_does_not_cover_proc(
        mgr: StorageManager, area: tuple[Path, Path]) -> None:
    """Attack: the mount point itself is a symlink to /proc (or /proc/sys): a tmpfs there
    would hide procfs from every later reader."""
    root, _ = area
    before = mounts_under(Path("/proc"))
    os.symlink("/proc", root / "p")
    os.symlink("/proc/sys", root / "ps")
    handles = []
    for name in ("p", "ps"):
        with contextlib.suppress(EngineError):
            handles.append(mgr.add(tmpfs(root / name)))
    assert mounts_under(Path("/proc")) == before
    for m in mounts_under(root):
        assert m[0].startswith(str(root) + "/")
    assert len(handles) == 2  # both mounted, at root/proc and root/proc/sys
    for h in reversed(handles):  # the nested one first
        mgr.remove(h)
    assert mounts_under(root) == []


def test_symlink_swap_race_while_mounting(mgr: StorageManager,
                                          area: tuple[Path, Path]) -> None:
    """Attack: a thread swaps a directory on the mount point's path for a symlink to the
    outside, as fast as it can, while mounts are added and removed (TOCTOU between the
    check and mount(2)). The mount is made on an fd opened inside the root, so no mount
    may ever land outside."""
    root, outside = area
    real = root / "vol"
    real.mkdir()
    stop = threading.Event()
    # Held by the swapper for each full swap and by the test around remove(): this test
    # is about the add path (teardown by path is the next test).
    settled = threading.Lock()
    progress = threading.Condition()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        tmp_link = root / "vol.link"
        parked = root / "vol.parked"
        while not stop.is_set():
            with settled, contextlib.suppress(OSError):
                os.symlink(str(outside), tmp_link)
                os.rename(real, parked)
                os.rename(tmp_link, real)         # vol -> outside
                os.unlink(real)
                os.rename(parked, real)           # vol is a directory again
            with progress:
                swaps += 1
                progress.notify_all()

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"mounted": 0, "refused": 0, "teardown_failed": 0}
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline or outcomes["mounted"] == 0:
            assert time.monotonic() < deadline + 30, f"never mounted: {outcomes} swaps={swaps}"
            # Let the swapper move on between attempts, so they meet it in every phase.
            with progress:
                seen = swaps

                def moved(before: int = seen) -> bool:
                    return swaps > before

                assert progress.wait_for(moved, timeout=10), "swapper stuck"
            try:
                h = mgr.add(tmpfs(real / "m"))
            except EngineError:
                outcomes["refused"] += 1
                continue
            outcomes["mounted"] += 1
            assert mounts_under(outside) == []
            with settled:
                try:
                    mgr.remove(h)
                except EngineError:
                    # Mounted while its directory was moved: the recorded path is stale
                    # (the teardown finding below). Unmounted by hand after the race.
                    outcomes["teardown_failed"] += 1
    finally:
        stop.set()
        thread.join(10)
    assert_outside_untouched(outside)
    leaked = mounts_under(root)
    assert len(leaked) <= outcomes["teardown_failed"]
    for target, *_ in reversed(leaked):
        assert target.startswith(str(root) + "/")
        sc.Syscalls().umount2(target, sc.MNT_DETACH)
    assert swaps >= 10 and outcomes["mounted"] >= 1, (outcomes, swaps)


def test_mount_point_file_swapped_for_fifo_does_not_hang(mgr: StorageManager,
                                                         area: tuple[Path, Path]) -> None:
    """Attack: the mount point exists as a FIFO or a device node instead of a directory
    (an open for anything but O_PATH could block or touch a device)."""
    root, outside = area
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    done: list[BaseException | None] = []

    def attempt() -> None:
        for name in ("fifo", "null"):
            try:
                mgr.add(tmpfs(root / name))
            except EngineError as err:
                done.append(err)
            else:
                done.append(None)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        # Unblock a reader stuck on the FIFO before failing.
        fd = os.open(root / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        raise AssertionError("adding storage on a FIFO blocked")
    assert len(done) == 2
    assert all(isinstance(e, EngineError) for e in done), done
    assert mounts_under(root) == []
    assert_outside_untouched(outside)


def test_teardown_follows_no_symlink_swapped_in_after_mount(
        mgr: StorageManager, area: tuple[Path, Path]) -> None:
    """Attack: after the agent mounted at ROOT/vol/m, whoever can write ROOT moves vol
    away and puts a symlink vol -> /somewhere in its place, where /somewhere/m is a mount
    the agent never made. Removing the storage must unmount the agent's own mount (or
    fail), never the other one."""
    root, outside = area
    (root / "vol").mkdir()
    h = mgr.add(tmpfs(root / "vol" / "m"))
    victim = outside / "m"
    victim.mkdir()
    sysc = sc.Syscalls()
    sysc.mount("tmpfs", str(victim), "tmpfs", 0, None)
    try:
        os.rename(root / "vol", root / "vol.parked")
        os.symlink(str(outside), root / "vol")
        with contextlib.suppress(EngineError):
            mgr.remove(h)
        victim_still_mounted = mounts_under(victim) != []
        victim_exists = victim.is_dir()
    finally:
        for target, *_ in reversed(mounts_under(outside) + mounts_under(root)):
            sysc.umount2(target, sc.MNT_DETACH)
        os.unlink(root / "vol")
        os.rename(root / "vol.parked", root / "vol")
        with contextlib.suppress(FileNotFoundError):
            victim.rmdir()
    assert victim_still_mounted, "the storage teardown unmounted a mount outside the root"
    assert victim_exists, "the storage teardown removed a directory outside the root"
