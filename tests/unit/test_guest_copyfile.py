"""CopyFile: chunked round trip, and every way out of the shared directory refused."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kata_agent import guest
from kata_agent.engine.errors import EngineError, NotFoundError, SpecError, StateError
from kata_agent.guest import CopyFileRequest, GuestOps

MiB = 1024 * 1024


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "run/kata-containers/shared/containers"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    return root, outside


def _req(path: str, data: bytes, *, size: int | None = None, offset: int = 0,
         mode: int = 0o644, dir_mode: int = 0o755, uid: int = -1, gid: int = -1) -> CopyFileRequest:
    return CopyFileRequest(path=path, file_size=len(data) if size is None else size,
                           file_mode=mode, dir_mode=dir_mode, uid=uid, gid=gid, offset=offset,
                           data=data)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            for p in d.rglob("*")}


def _outside_untouched(outside: Path) -> None:
    assert _snapshot(outside) == {"victim": b"untouched"}


def test_three_mib_in_one_mib_chunks(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    ops = GuestOps(shared_dir=root)
    payload = os.urandom(3 * MiB)
    target = f"{root}/sandbox/ctr/rootfs-hosts"
    for off in range(0, 3 * MiB, MiB):
        ops.copy_file(_req(target, payload[off:off + MiB], size=3 * MiB, offset=off,
                           mode=0o640, dir_mode=0o750))
        installed = Path(target).exists()
        assert installed == (off == 2 * MiB)  # only the last chunk installs the file
    assert Path(target).read_bytes() == payload
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(root / "sandbox").st_mode) & 0o7000 == 0
    assert os.listdir(root / "sandbox/ctr") == ["rootfs-hosts"]  # temp file renamed away


def test_replaces_an_existing_file_atomically(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    ops = GuestOps(shared_dir=root)
    target = root / "f"
    target.write_text("old")
    ops.copy_file(_req(str(target), b"new-and-longer"))
    assert target.read_bytes() == b"new-and-longer"


def test_empty_file(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    GuestOps(shared_dir=root).copy_file(_req(f"{root}/empty", b""))
    assert (root / "empty").read_bytes() == b""


def test_modes_are_masked(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    old = os.umask(0)
    try:
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/d/x", b"data", mode=0o6777,
                                                 dir_mode=0o3777))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root / "d/x").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o777


def test_owner_is_applied(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    uid, gid = os.getuid(), os.getgid()
    GuestOps(shared_dir=root).copy_file(_req(f"{root}/owned", b"x", uid=uid, gid=gid))
    st = os.stat(root / "owned")
    assert (st.st_uid, st.st_gid) == (uid, gid)


@pytest.mark.parametrize("path", [
    "/etc/passwd",
    "relative/path",
    "{root}/../escape",
    "{root}/a/../../escape",
    "{root}",
    "{root}/",
    "{root}x/file",
    "{root}/a\0b",
])
def test_paths_outside_or_malformed_are_invalid(dirs: tuple[Path, Path], path: str) -> None:
    root, outside = dirs
    with pytest.raises(SpecError):
        GuestOps(shared_dir=root).copy_file(_req(path.format(root=root), b"x"))
    _outside_untouched(outside)
    assert not (root.parent / "escape").exists()


@pytest.mark.parametrize("kind", ["absolute", "relative-climbing", "parent-dir"])
def test_symlinks_never_lead_outside(dirs: tuple[Path, Path], kind: str) -> None:
    root, outside = dirs
    if kind == "absolute":
        os.symlink(str(outside), root / "link")
    elif kind == "relative-climbing":
        os.symlink("../" * 12 + str(outside).lstrip("/"), root / "link")
    else:
        (root / "sub").mkdir()
        os.symlink(str(outside), root / "sub/link")
    target = f"{root}/link/victim" if kind != "parent-dir" else f"{root}/sub/link/victim"
    # The link resolves inside the shared directory, where its target does not exist:
    # safe_path either refuses it or creates the target there; never outside.
    try:
        GuestOps(shared_dir=root).copy_file(_req(target, b"pwned"))
    except NotFoundError:
        pass
    else:
        assert (root / str(outside).lstrip("/") / "victim").read_bytes() == b"pwned"
    _outside_untouched(outside)


def test_symlink_resolving_inside_the_root_is_followed_there(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    # The same absolute link, once its target exists below the root, lands below the root.
    os.symlink(str(outside), root / "link")
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    GuestOps(shared_dir=root).copy_file(_req(f"{root}/link/victim", b"confined"))
    assert (root / str(outside).lstrip("/") / "victim").read_bytes() == b"confined"
    _outside_untouched(outside)


def test_target_symlink_is_replaced_not_followed(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    os.symlink(str(outside / "victim"), root / "f")
    GuestOps(shared_dir=root).copy_file(_req(f"{root}/f", b"new"))
    assert not (root / "f").is_symlink()
    assert (root / "f").read_bytes() == b"new"
    _outside_untouched(outside)


def test_temp_file_swapped_for_symlink_between_chunks(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    ops = GuestOps(shared_dir=root)
    target = f"{root}/d/f"
    ops.copy_file(_req(target, b"aaaa", size=8))
    tmp = root / "d" / guest.temp_name("f")
    tmp.unlink()
    os.symlink(str(outside / "victim"), tmp)
    with pytest.raises(SpecError):
        ops.copy_file(_req(target, b"bbbb", size=8, offset=4))
    _outside_untouched(outside)
    assert not (root / "d/f").exists()


def test_temp_file_swapped_for_hard_link_between_chunks(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    ops = GuestOps(shared_dir=root)
    target = f"{root}/f"
    ops.copy_file(_req(target, b"aaaa", size=8))
    tmp = root / guest.temp_name("f")
    tmp.unlink()
    os.link(outside / "victim", tmp)
    with pytest.raises(SpecError, match="link"):
        ops.copy_file(_req(target, b"bbbb", size=8, offset=4))
    _outside_untouched(outside)


def test_hard_link_planted_before_first_chunk_is_not_written(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    os.link(outside / "victim", root / guest.temp_name("f"))
    GuestOps(shared_dir=root).copy_file(_req(f"{root}/f", b"fresh"))
    assert (root / "f").read_bytes() == b"fresh"
    _outside_untouched(outside)


def test_parent_dir_swapped_for_symlink_between_chunks(dirs: tuple[Path, Path]) -> None:
    root, outside = dirs
    ops = GuestOps(shared_dir=root)
    target = f"{root}/d/f"
    ops.copy_file(_req(target, b"aaaa", size=8))
    os.rename(root / "d", root / "moved")
    os.symlink(str(outside), root / "d")
    # Resolved inside the root, the link leads to a directory without the temp file.
    with pytest.raises((NotFoundError, StateError)):
        ops.copy_file(_req(target, b"bbbb", size=8, offset=4))
    _outside_untouched(outside)


@pytest.mark.parametrize("kw", [
    {"size": guest.MAX_COPY_FILE_SIZE + 1},
    {"size": -1},
    {"size": 4, "offset": -1},
    {"size": 4, "offset": 2},          # 2 + 4 bytes > 4
    {"size": 2**62, "offset": 2**62},
    {"uid": -2},
    {"gid": 2**31},
])
def test_absurd_sizes_offsets_and_ids(dirs: tuple[Path, Path], kw: dict[str, int]) -> None:
    root, _ = dirs
    with pytest.raises(SpecError):
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/f", b"data", **kw))
    assert list(root.iterdir()) == []


def test_chunk_larger_than_the_message_limit(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    data = b"x" * (guest.MAX_COPY_CHUNK + 1)
    with pytest.raises(SpecError):
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/f", data, size=len(data) * 2))


def test_later_chunk_without_a_first_one(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    with pytest.raises(StateError):
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/f", b"tail", size=8, offset=4))
    assert not (root / "f").exists()


def test_target_that_is_a_directory(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    (root / "dir/inner").mkdir(parents=True)
    with pytest.raises(SpecError):
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/dir", b"x"))
    assert (root / "dir/inner").is_dir()


def test_parent_that_is_a_file(dirs: tuple[Path, Path]) -> None:
    root, _ = dirs
    (root / "file").write_text("x")
    with pytest.raises(SpecError):
        GuestOps(shared_dir=root).copy_file(_req(f"{root}/file/child", b"x"))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "abs", "rel", "up", "file"]),
                min_size=1, max_size=6))
def test_no_path_writes_outside(parts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "shared"
        outside = base / "outside"
        (root / "a").mkdir(parents=True)
        outside.mkdir()
        (outside / "victim").write_text("untouched")
        (root / "file").write_text("x")
        os.symlink(str(outside), root / "abs")
        os.symlink("../../outside", root / "a/rel")
        os.symlink("../..", root / "up")
        path = f"{root}/" + "/".join(parts)
        with contextlib.suppress(EngineError):
            GuestOps(shared_dir=root).copy_file(_req(path, b"payload"))
        _outside_untouched(outside)
        # Whatever happened, it happened below the root.
        assert sorted(p.name for p in base.iterdir()) == ["outside", "shared"]
