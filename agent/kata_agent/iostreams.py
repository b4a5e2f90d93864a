"""Standard streams of container processes, as the host reads and writes them over RPCs.

Memory stays bounded: the kernel pipe (or pty) is the only buffer. Nothing is read ahead;
a ReadStdout takes at most the bytes it asked for straight from the pipe, so a process that
writes faster than the host reads simply blocks on its full pipe.

Every blocking wait polls the stream's fd together with two wake-up fds: the stream's own
(it is being closed) and the caller's ``Canceller`` (the RPC was cancelled), so no thread
stays blocked after its host went away or its process was removed.

"Drained" (what WaitProcess waits for after an exit) means: the host read the stream to its
end, or the pipe holds no byte and no read is handing bytes back, or nobody has read the
stream for ``grace`` seconds (the host stopped reading).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
# When agent.container_pipe_size is not given (the kernel's pipe-max-size default).
DEFAULT_OUTPUT_PIPE_SIZE = 1024 * 1024
MAX_IO_CHUNK = 1024 * 1024  # largest ReadStdout len / WriteStdin data accepted
VEOF_BYTE = b"\x04"


class StreamEOF(Exception):
    """The stream reached its end (the writer side is closed) or was closed by us."""


class Cancelled(Exception):
    """The caller's wait was cancelled (the RPC went away)."""


class Canceller:
    """A wake-up an RPC cancellation callback can fire from any thread.

    Blocking stream calls poll its eventfd; other waits register a callback with
    ``on_cancel``. Creating one costs one eventfd, released by ``close``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb()

    def on_cancel(self, cb: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(cb)
            already = self._set
        if already:
            cb()

    @property
    def is_set(self) -> bool:
        return self._set

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._callbacks.clear()


class _SharedFd:
    """An fd used by several threads: closed only once the last user let go, so a thread
    polling it never sees its number reused by another file."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def acquire(self) -> int:
        with self._lock:
            if self._closing:
                raise StreamEOF("stream closed")
            self._users += 1
            return self._fd

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            self._maybe_close()

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            os.eventfd_write(self.wake, 1)
            self._maybe_close()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def fd(self) -> int:
        """The fd while it is open, else -1."""
        with self._lock:
            return -1 if self._closing else self._fd

    def _maybe_close(self) -> None:
        if self._closing and self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            os.close(self.wake)
            self._fd = -1
            self.wake = -1


def _wait_fd(shared: _SharedFd, fd: int, events: int, cancel: Canceller | None) -> None:
    """Block until ``fd`` has ``events`` (or an error/hangup); raise when closed/cancelled."""
    poller = select.poll()
    poller.register(fd, events)
    poller.register(shared.wake, select.POLLIN)
    if cancel is not None:
        poller.register(cancel.fileno(), select.POLLIN)
    while True:
        ready = poller.poll()
        fds = {f for f, _ in ready}
        if cancel is not None and cancel.fileno() in fds:
            raise Cancelled("cancelled")
        if shared.wake in fds:
            raise StreamEOF("stream closed")
        if fd in fds:
            return


class OutputStream:
    """The agent's read end of a process's stdout or stderr (or its pty master)."""

    def __init__(self, shared: _SharedFd, name: str, *, tty: bool = False) -> None:
        self._shared = shared
        self.name = name
        self.tty = tty
        self._cond = threading.Condition()
        self.eof = False
        self._readers = 0
        self._handing_back = 0
        self._last_activity = time.monotonic()

    def read(self, max_len: int, cancel: Canceller | None = None) -> bytes:
        """Up to ``max_len`` bytes, blocking until some are there; StreamEOF at the end."""
        if not 0 < max_len <= MAX_IO_CHUNK:
            raise ValueError(f"read length must be 1..{MAX_IO_CHUNK}")
        if self.eof:
            raise StreamEOF("end of stream")
        fd = self._shared.acquire()
        with self._cond:
            self._readers += 1
        got = False
        try:
            while True:
                _wait_fd(self._shared, fd, select.POLLIN, cancel)
                try:
                    data = os.read(fd, max_len)
                except BlockingIOError:
                    continue  # another reader took the bytes first
                except OSError as e:
                    # A pty master answers EIO once the last slave fd is closed.
                    if not (self.tty and e.errno == errno.EIO):
                        raise
                    data = b""
                if not data:
                    with self._cond:
                        self.eof = True
                    raise StreamEOF("end of stream")
                got = True
                with self._cond:
                    self._handing_back += 1
                return data
        finally:
            with self._cond:
                self._readers -= 1
                self._last_activity = time.monotonic()
                self._cond.notify_all()
            self._shared.release()
            if got:
                # The bytes are on their way to the host; from here on the caller owns them.
                self.returned()

    def returned(self) -> None:
        with self._cond:
            if self._handing_back:
                self._handing_back -= 1
            self._cond.notify_all()

    def pending_bytes(self) -> int:
        """Bytes waiting in the pipe (FIONREAD); 0 once closed."""
        try:
            fd = self._shared.acquire()
        except StreamEOF:
            return 0
        try:
            buf = array.array("i", [0])
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            return int(buf[0])
        except OSError:
            return 0
        finally:
            self._shared.release()

    def drained(self, grace: float) -> bool:
        with self._cond:
            if self.eof or self._shared.closed:
                return True
            if self._handing_back:
                return False
            idle = self._readers == 0 and time.monotonic() - self._last_activity > grace
        return idle or self.pending_bytes() == 0

    def touch(self) -> None:
        """Start the idle clock now (called at process exit)."""
        with self._cond:
            self._last_activity = time.monotonic()

    def wait_drained(self, grace: float, cancel: Canceller | None, tick: float = 0.05) -> None:
        """Block until ``drained``; re-checked on every read and every ``tick`` seconds."""
        while not self.drained(grace):
            if cancel is not None and cancel.is_set:
                raise Cancelled("cancelled")
            with self._cond:
                self._cond.wait(tick)


class InputStream:
    """The agent's write end of a process's stdin (or its pty master)."""

    def __init__(self, shared: _SharedFd, *, tty: bool = False) -> None:
        self._shared = shared
        self.tty = tty
        self._lock = threading.Lock()  # one writer at a time keeps chunks whole
        self.closed = False

    def write(self, data: bytes, cancel: Canceller | None = None) -> int:
        """Write all of ``data`` (blocking while the pipe is full); returns the count."""
        if len(data) > MAX_IO_CHUNK:
            raise ValueError(f"write larger than {MAX_IO_CHUNK} bytes")
        if self.closed:
            raise StreamEOF("stdin is closed")
        fd = self._shared.acquire()
        done = 0
        try:
            with self._lock:
                view = memoryview(data)
                while done < len(data):
                    _wait_fd(self._shared, fd, select.POLLOUT, cancel)
                    try:
                        done += os.write(fd, view[done:])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError as e:
                        raise StreamEOF("the process closed its stdin") from e
        finally:
            self._shared.release()
        return done

    def close(self) -> None:
        """CloseStdin: a pipe is closed; on a terminal the EOF character is sent, since
        closing the master would hang up the whole terminal."""
        if self.closed:
            return
        self.closed = True
        if self.tty:
            try:
                fd = self._shared.acquire()
            except StreamEOF:
                return
            try:
                os.write(fd, VEOF_BYTE)
            except OSError as e:
                log.debug("event=veof_failed error=%s", e)
            finally:
                self._shared.release()
        else:
            self._shared.close()


class ProcessIO:
    """All streams of one process: three pipes, or one pty master."""

    def __init__(self, *, stdin: InputStream, stdout: OutputStream,
                 stderr: OutputStream | None, shared: tuple[_SharedFd, ...],
                 tty_fd: _SharedFd | None = None) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._all = shared
        self._tty = tty_fd

    @property
    def terminal(self) -> bool:
        return self._tty is not None

    @classmethod
    def pipes(cls, pipe_size: int = 0) -> tuple[ProcessIO, tuple[int, int, int]]:
        """New pipes; returns the agent's side and the (stdin, stdout, stderr) fds for the
        process, which the caller closes once the process has them."""
        made: list[int] = []
        try:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            made += [in_r, in_w]
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            made += [out_r, out_w]
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            made += [err_r, err_w]
            # Output pipes default to 1 MiB: a ReadStdout can then return up to that much
            # at once instead of 64 KiB. Pages are only used as data is written.
            for fd, size in ((in_w, pipe_size), (out_r, pipe_size or DEFAULT_OUTPUT_PIPE_SIZE),
                             (err_r, pipe_size or DEFAULT_OUTPUT_PIPE_SIZE)):
                if size:
                    set_pipe_size(fd, size)
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        s_in, s_out, s_err = _SharedFd(in_w), _SharedFd(out_r), _SharedFd(err_r)
        io = cls(stdin=InputStream(s_in), stdout=OutputStream(s_out, "stdout"),
                 stderr=OutputStream(s_err, "stderr"), shared=(s_in, s_out, s_err))
        return io, (in_r, out_w, err_w)

    @classmethod
    def terminal_master(cls, master: int) -> ProcessIO:
        """Streams over a pty master (this object owns ``master``)."""
        os.set_inheritable(master, False)
        shared = _SharedFd(master)
        return cls(stdin=InputStream(shared, tty=True),
                   stdout=OutputStream(shared, "stdout", tty=True), stderr=None,
                   shared=(shared,), tty_fd=shared)

    @classmethod
    def from_fds(cls, stdin: int, stdout: int, stderr: int) -> ProcessIO:
        """Streams over pipe ends this object takes over (an agent restart gets them back
        from the service manager); -1 stands for one already closed: stdin then refuses
        writes, an output stream reads as finished."""
        def ready(fd: int, *, read_end: bool) -> int:
            if fd >= 0:
                os.set_inheritable(fd, False)
                return fd
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w if read_end else r)
            return r if read_end else w
        s_in = _SharedFd(ready(stdin, read_end=False))
        s_out = _SharedFd(ready(stdout, read_end=True))
        s_err = _SharedFd(ready(stderr, read_end=True))
        io = cls(stdin=InputStream(s_in), stdout=OutputStream(s_out, "stdout"),
                 stderr=OutputStream(s_err, "stderr"), shared=(s_in, s_out, s_err))
        if stdin < 0:
            io.stdin.close()
        return io

    def host_fds(self) -> dict[str, int]:
        """The agent's side, by kind (for the fd store): a terminal's master, or the three
        pipe ends still open."""
        if self._tty is not None:
            return {"tty": self._tty.fd}
        out = {"stdin": self._all[0].fd, "stdout": self._all[1].fd, "stderr": self._all[2].fd}
        return {k: v for k, v in out.items() if v >= 0}

    def output(self, name: str) -> OutputStream | None:
        return self.stdout if name == "stdout" else self.stderr

    def resize(self, rows: int, columns: int) -> None:
        if self._tty is None:
            raise ValueError("the process has no terminal")
        fd = self._tty.acquire()
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        finally:
            self._tty.release()

    def process_exited(self) -> None:
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.touch()

    def wait_drained(self, grace: float, cancel: Canceller | None) -> None:
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.wait_drained(grace, cancel)

    def close(self) -> None:
        """Close every stream; blocked readers and writers wake up with StreamEOF."""
        for s in self._all:
            s.close()


def set_pipe_size(fd: int, size: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError as e:
        # Above /proc/sys/fs/pipe-max-size the kernel refuses: keep its default size.
        log.warning("event=pipe_size_refused size=%d error=%s", size, e)
