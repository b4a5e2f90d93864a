"""What lets containers outlive an agent restart: a journal of the sandbox and the stdio
fds of its processes kept by the service manager.

The journal (``<runtime dir>/sandbox.json``, on the guest's /run) is rewritten after every
change of the sandbox: ids, pids with their start times, storages, the pause process.
Each process's host side of stdio (pipe ends or pty master) goes to the manager's fd
store under a short key (``p<N>.stdout``); when the agent comes back the manager passes
them in again and ``Sandbox.restore`` rebuilds its tables from both.

Without a manager (agent run by hand, agent as init) nothing is kept: a restart then
starts from an empty sandbox, as it always did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kata_agent.sdnotify import Notifier

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
MAX_JOURNAL_BYTES = 16 * 1024 * 1024
STDIO_KINDS = ("stdin", "stdout", "stderr", "tty")


class Keeper:
    """The journal file and the fd store, for one agent."""

    def __init__(self, journal_path: str, notifier: Notifier) -> None:
        self.journal_path = journal_path
        self.notifier = notifier
        self._next_key = 0

    def new_key(self) -> str:
        self._next_key += 1
        return f"p{self._next_key}"

    def store_stdio(self, key: str, fds: Mapping[str, int]) -> None:
        for kind, fd in fds.items():
            if fd >= 0 and not self.notifier.store(f"{key}.{kind}", [fd]):
                log.warning("event=fd_store_refused key=%s kind=%s", key, kind)

    def drop_stdio(self, key: str, kinds: Sequence[str] = STDIO_KINDS) -> None:
        for kind in kinds:
            self.notifier.remove(f"{key}.{kind}")

    def save(self, doc: dict[str, Any]) -> None:
        doc = {"version": JOURNAL_VERSION, "next_key": self._next_key, **doc}
        tmp = f"{self.journal_path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.rename(tmp, self.journal_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def load(self) -> dict[str, Any] | None:
        """The last journal, or None (none written, or unreadable: logged)."""
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_JOURNAL_BYTES + 1)
            if len(data) > MAX_JOURNAL_BYTES:
                raise ValueError("journal too large")
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
                raise ValueError(f"unknown journal version {doc.get('version')!r}"
                                 if isinstance(doc, dict) else "not an object")
        except (OSError, ValueError) as e:
            log.error("event=journal_unreadable path=%s error=%s", self.journal_path, e)
            return None
        next_key = doc.get("next_key")
        if isinstance(next_key, int) and next_key > self._next_key:
            self._next_key = next_key
        return doc

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.journal_path)
