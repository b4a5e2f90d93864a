"""Running from a write-sealed memfd copy of the interpreter (see engine/process.py for why).

Kept free of engine imports: the CLI calls ``reexec_sealed`` before it loads anything else,
so the process that is replaced costs little more than the interpreter start.
"""

from __future__ import annotations

import fcntl
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

SEALED_NAME = "kata-engine"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def running_sealed() -> bool:
    return os.readlink("/proc/self/exe").startswith(f"/memfd:{SEALED_NAME}")


def sealed_interpreter_fd() -> int:
    """A close-on-exec memfd holding a copy of our interpreter, sealed against writes."""
    fd = os.memfd_create(SEALED_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        src = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(src).st_size
            off = 0
            while off < size:
                n = os.sendfile(fd, src, off, size - off)
                if n == 0:
                    break
                off += n
        finally:
            os.close(src)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd
    except BaseException:
        os.close(fd)
        raise


def reexec_sealed(argv: Sequence[str]) -> None:
    """Replace this process with the same program run from a sealed interpreter copy
    (no-op when already so). Must be called before any thread starts."""
    if running_sealed():
        return
    fd = sealed_interpreter_fd()
    # argv[0] stays the real interpreter path so Python finds its prefix and venv.
    os.execve(fd, [sys.executable, *argv], dict(os.environ))
