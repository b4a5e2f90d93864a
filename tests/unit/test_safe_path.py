"""safe_path keeps every lookup inside the root, with openat2 and with the manual walk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from kata_agent import safe_path
from kata_agent.engine.syscalls import Syscalls

MODES = [True, False]  # openat2, fd-by-fd walk


def _openat2_available() -> bool:
    try:
        fd = Syscalls().openat2(-100, "/", os.O_PATH, 0, 0)
    except OSError as e:
        return e.errno != errno.ENOSYS
    os.close(fd)
    return True


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A root with its own etc/passwd, and a host dir outside it with a secret."""
    root = tmp_path / "root"
    host = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("inside")
    (root / "a" / "b").mkdir(parents=True)
    host.mkdir()
    (host / "passwd").write_text("SECRET")
    return root, host


def _read(root: Path, path: str, use2: bool) -> str:
    if use2 and not _openat2_available():
        pytest.skip("host capability missing: openat2 (kernel >= 5.6)")
    fd = safe_path.open_in_root(str(root), path, os.O_RDONLY, use_openat2=use2)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


@pytest.mark.parametrize("use2", MODES)
def test_dotdot_stays_in_root(world: tuple[Path, Path], use2: bool) -> None:
    root, _host = world
    assert _read(root, "../../../../etc/passwd", use2) == "inside"
    assert _read(root, "/a/b/../../../etc/passwd", use2) == "inside"


@pytest.mark.parametrize("use2", MODES)
def test_absolute_symlink_restarts_at_root(world: tuple[Path, Path], use2: bool) -> None:
    root, host = world
    os.symlink(str(host), root / "evil")  # points at the host dir by absolute path
    with pytest.raises(FileNotFoundError):
        _read(root, "evil/passwd", use2)
    os.symlink("/etc", root / "etclink")
    assert _read(root, "etclink/passwd", use2) == "inside"


@pytest.mark.parametrize("use2", MODES)
def test_relative_symlink_cannot_climb_out(world: tuple[Path, Path], use2: bool) -> None:
    root, _host = world
    os.symlink("../../../../../../../../etc", root / "a" / "b" / "up")
    assert _read(root, "a/b/up/passwd", use2) == "inside"
    os.symlink("../../host/passwd", root / "a" / "rel")
    with pytest.raises(FileNotFoundError):
        _read(root, "a/rel", use2)


@pytest.mark.parametrize("use2", MODES)
def test_symlink_loop_is_eloop(world: tuple[Path, Path], use2: bool) -> None:
    root, _host = world
    os.symlink("l2", root / "l1")
    os.symlink("l1", root / "l2")
    with pytest.raises(OSError) as ei:
        _read(root, "l1", use2)
    assert ei.value.errno == errno.ELOOP


def test_magic_links_refused() -> None:
    if not _openat2_available():
        pytest.skip("host capability missing: openat2 (kernel >= 5.6)")
    with pytest.raises(OSError) as ei:
        safe_path.open_in_root("/", "/proc/self/exe", os.O_RDONLY, use_openat2=True)
    assert ei.value.errno in (errno.ELOOP, errno.EXDEV)


@pytest.mark.parametrize("use2", MODES)
def test_nofollow_on_last_component(world: tuple[Path, Path], use2: bool) -> None:
    root, _host = world
    os.symlink("/etc/passwd", root / "plink")
    if use2 and not _openat2_available():
        pytest.skip("host capability missing: openat2 (kernel >= 5.6)")
    fd = safe_path.open_in_root(str(root), "plink", os.O_PATH | os.O_NOFOLLOW,
                                use_openat2=use2)
    try:
        assert os.path.islink(safe_path.fd_path(fd))
    finally:
        os.close(fd)


def test_mkdir_in_root_creates_inside(world: tuple[Path, Path]) -> None:
    root, _host = world
    fd = safe_path.mkdir_in_root(str(root), "/x/y/../z")
    try:
        assert safe_path.fd_path(fd) == str(root / "x" / "z")
    finally:
        os.close(fd)
    assert (root / "x" / "y").is_dir()


def test_mkdir_through_escaping_symlink_never_touches_host(world: tuple[Path, Path]) -> None:
    root, host = world
    os.symlink(str(host), root / "evil")
    # "evil" is followed inside the root: <root>/<host path>/sub is created, host/sub not.
    fd = safe_path.mkdir_in_root(str(root), "evil/sub")
    try:
        assert safe_path.fd_path(fd) == str(root) + str(host / "sub")
    finally:
        os.close(fd)
    assert not (host / "sub").exists()
    os.symlink("../../../../x", root / "a" / "up")
    fd = safe_path.mkdir_in_root(str(root), "a/up/y")
    try:
        assert safe_path.fd_path(fd) == str(root / "x" / "y")
    finally:
        os.close(fd)


def test_mkdir_refuses_file_component(world: tuple[Path, Path]) -> None:
    root, _host = world
    with pytest.raises(NotADirectoryError):
        safe_path.mkdir_in_root(str(root), "etc/passwd/x")


def test_create_file_does_not_follow_planted_symlink(world: tuple[Path, Path]) -> None:
    root, host = world
    os.symlink(str(host / "newfile"), root / "target")
    with pytest.raises(OSError):
        safe_path.create_file_in_root(str(root), "target")
    assert not (host / "newfile").exists()
    fd = safe_path.create_file_in_root(str(root), "/d1/d2/file")
    os.close(fd)
    assert (root / "d1" / "d2" / "file").is_file()


def test_resolve_in_root(world: tuple[Path, Path]) -> None:
    root, _host = world
    os.symlink("/etc", root / "e")
    assert safe_path.resolve_in_root(str(root), "e/passwd") == str(root / "etc" / "passwd")
    rfd = os.open(str(root), os.O_PATH)
    try:
        assert safe_path.resolve_in_root(rfd, "/../a/b") == str(root / "a" / "b")
    finally:
        os.close(rfd)
