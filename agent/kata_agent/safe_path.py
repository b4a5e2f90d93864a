"""The only opener of paths given by the host or found inside a container's rootfs.

Every lookup is confined to a root directory: ``..`` never climbs above it, absolute symlinks
restart at it, and magic links (``/proc/self/fd/N`` style) are refused. The kernel does this
with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS); when openat2 is missing (kernel < 5.6)
we walk the path one component at a time with O_NOFOLLOW and resolve symlinks ourselves.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from kata_agent.engine.syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, Syscalls

log = logging.getLogger(__name__)

MAX_SYMLINKS = 40
_openat2_works: bool | None = None
_default_syscalls: Syscalls | None = None


def _sys(syscalls: Syscalls | None) -> Syscalls:
    global _default_syscalls
    if syscalls is not None:
        return syscalls
    if _default_syscalls is None:
        _default_syscalls = Syscalls()
    return _default_syscalls


@contextmanager
def _root_fd(root: int | str) -> Iterator[int]:
    if isinstance(root, int):
        yield root
        return
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def open_in_root(root: int | str, path: str, flags: int, mode: int = 0o644, *,
                 syscalls: Syscalls | None = None, use_openat2: bool | None = None) -> int:
    """Open ``path`` as if ``root`` were ``/``; returns a new close-on-exec fd.

    ``use_openat2`` forces (True) or forbids (False) the openat2 path; by default the kernel
    call is tried first and the manual walk is the fallback.
    """
    global _openat2_works
    flags |= os.O_CLOEXEC
    with _root_fd(root) as rfd:
        want2 = _openat2_works is not False if use_openat2 is None else use_openat2
        if want2:
            try:
                # openat2 rejects a mode without O_CREAT (EINVAL).
                creating = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
                how_mode = mode if creating else 0
                fd = _sys(syscalls).openat2(rfd, path or ".", flags, how_mode,
                                            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                _openat2_works = True
                return fd
            except OSError as e:
                if e.errno != errno.ENOSYS or use_openat2:
                    raise
                _openat2_works = False
                log.info("event=openat2_missing fallback=walk")
        return _walk_open(rfd, path, flags, mode)


def _walk_open(rfd: int, path: str, flags: int, mode: int) -> int:
    """Resolve ``path`` under ``rfd`` one component at a time, never following a symlink
    with the kernel (O_NOFOLLOW) so no link can leave the root."""
    stack: list[int] = [os.dup(rfd)]
    todo = _components(path)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            last = not todo
            if name == "..":
                # A lookup never climbs above the root (what RESOLVE_IN_ROOT does).
                if len(stack) > 1:
                    os.close(stack.pop())
                if last:
                    return os.open(".", flags & ~os.O_CREAT | os.O_NOFOLLOW, dir_fd=stack[-1])
                continue
            try:
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if last and flags & os.O_CREAT:
                    return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
                raise
            if stat.S_ISLNK(st.st_mode) and not (last and flags & os.O_NOFOLLOW):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path!r}")
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    # Absolute symlinks restart at the container root, not the host's.
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo = _components(target) + todo
                if not todo:
                    return os.open(".", flags | os.O_NOFOLLOW, dir_fd=stack[-1])
                continue
            if last:
                return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, f"{name!r} in {path!r} is not a directory")
            stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=stack[-1]))
        return os.open(".", flags | os.O_NOFOLLOW, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def fd_path(fd: int) -> str:
    """The path the kernel reports for an open fd (as seen from this mount namespace)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def resolve_in_root(root: int | str, path: str, *, syscalls: Syscalls | None = None) -> str:
    """The host-visible path of ``path`` resolved inside ``root``; it must exist."""
    fd = open_in_root(root, path, os.O_PATH, syscalls=syscalls)
    try:
        return fd_path(fd)
    finally:
        os.close(fd)


def mkdir_in_root(root: int | str, path: str, mode: int = 0o755, *,
                  syscalls: Syscalls | None = None, _links: int = 0) -> int:
    """Create every missing directory of ``path`` inside ``root`` and return an O_PATH fd
    of the last one. A dangling symlink on the way is followed inside the root (its target
    is created there, as an image's ``/var/run -> /run`` needs); a component that exists
    but is not a directory fails with ENOTDIR."""
    comps = _components(path)
    with _root_fd(root) as rfd:
        cur = os.dup(rfd)
        try:
            for i, name in enumerate(comps):
                sub = "/".join(comps[: i + 1])
                try:
                    nxt = open_in_root(rfd, sub, os.O_PATH | os.O_DIRECTORY, syscalls=syscalls)
                except FileNotFoundError:
                    if name == "..":
                        raise
                    try:
                        os.mkdir(name, mode, dir_fd=cur)
                    except FileExistsError:
                        st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                        if not stat.S_ISLNK(st.st_mode):
                            raise
                        if _links >= MAX_SYMLINKS:
                            raise OSError(errno.ELOOP, f"too many symlinks in {path!r}") from None
                        target = os.readlink(name, dir_fd=cur)
                        base = "/" if target.startswith("/") else "/" + "/".join(comps[:i])
                        rest = "/".join([base, target, *comps[i + 1:]])
                        return mkdir_in_root(rfd, rest, mode, syscalls=syscalls,
                                             _links=_links + 1)
                    nxt = open_in_root(rfd, sub, os.O_PATH | os.O_DIRECTORY, syscalls=syscalls)
                os.close(cur)
                cur = nxt
            return cur
        except BaseException:
            os.close(cur)
            raise


def create_file_in_root(root: int | str, path: str, mode: int = 0o644, *,
                        syscalls: Syscalls | None = None) -> int:
    """Make sure ``path`` exists inside ``root`` (creating parents and an empty regular file
    when missing) and return an O_PATH fd of it."""
    comps = _components(path)
    if not comps:
        raise OSError(errno.EINVAL, "empty path")
    with _root_fd(root) as rfd:
        try:
            return open_in_root(rfd, path, os.O_PATH, syscalls=syscalls)
        except FileNotFoundError:
            pass
        parent = mkdir_in_root(rfd, "/".join(comps[:-1]), syscalls=syscalls)
        try:
            try:
                fd = os.open(comps[-1], os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=parent)
                os.close(fd)
            except FileExistsError:
                pass
        finally:
            os.close(parent)
        return open_in_root(rfd, path, os.O_PATH, syscalls=syscalls)
