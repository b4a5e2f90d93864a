"""OCI lifecycle hooks: run a program with the container state as JSON on its stdin."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import EngineError, SpecError

log = logging.getLogger(__name__)

MAX_HOOKS_PER_PHASE = 64
MAX_ARGS = 1024
OUTPUT_TAIL = 4096


def _strings(v: Any, field: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_ARGS:
        raise SpecError(f"must be an array of at most {MAX_ARGS} strings", field=field)
    for i, s in enumerate(v):
        if not isinstance(s, str) or "\0" in s:
            raise SpecError("must be a string without NUL", field=f"{field}[{i}]")
    return tuple(v)


@dataclass(frozen=True, slots=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None  # seconds

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Hook:
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        path = d.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise SpecError(f"hook path {path!r} must be absolute", field=f"{field}.path")
        env = _strings(d.get("env"), f"{field}.env")
        for i, e in enumerate(env):
            if "=" not in e:
                raise SpecError(f"env entry {e!r} is not KEY=VALUE", field=f"{field}.env[{i}]")
        timeout = d.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout <= 0):
            raise SpecError("timeout must be a positive number of seconds",
                            field=f"{field}.timeout")
        return cls(path=path, args=_strings(d.get("args"), f"{field}.args"), env=env,
                   timeout=timeout)


@dataclass(frozen=True, slots=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    create_container: tuple[Hook, ...] = ()
    start_container: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any] | None, field: str = "hooks") -> Hooks:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise SpecError("must be an object", field=field)
        out: dict[str, tuple[Hook, ...]] = {}
        for attr, key in (("prestart", "prestart"), ("create_runtime", "createRuntime"),
                          ("create_container", "createContainer"),
                          ("start_container", "startContainer"),
                          ("poststart", "poststart"), ("poststop", "poststop")):
            items = d.get(key)
            if items is None:
                out[attr] = ()
                continue
            if not isinstance(items, list) or len(items) > MAX_HOOKS_PER_PHASE:
                raise SpecError(f"must be an array of at most {MAX_HOOKS_PER_PHASE} hooks",
                                field=f"{field}.{key}")
            out[attr] = tuple(Hook.from_oci(h, f"{field}.{key}[{i}]")
                              for i, h in enumerate(items))
        return cls(**out)


def _env(hook: Hook) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in hook.env:
        k, _, v = e.partition("=")
        env[k] = v
    return env


def run_hook(hook: Hook, state_json: bytes, *, phase: str) -> None:
    argv = list(hook.args) or [hook.path]
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv,
                executable=hook.path,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(hook),
                cwd="/",
                close_fds=True,
                start_new_session=True,  # its own process group: a timeout kills it all
            )
        except OSError as e:
            raise EngineError(f"{phase} hook {hook.path}: cannot start: {e.strerror}",
                              errno=e.errno or 0) from e
        try:
            proc.communicate(state_json, timeout=hook.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise EngineError(f"{phase} hook {hook.path}: timed out after {hook.timeout}s",
                              errno=errno.ETIMEDOUT) from None
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - OUTPUT_TAIL))
        tail = out.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        raise EngineError(f"{phase} hook {hook.path}: {how}: {tail}")
    log.info("hook ran phase=%s path=%s", phase, hook.path)


def run_hooks(hooks: Sequence[Hook], state: Mapping[str, Any], *, phase: str) -> None:
    """Run ``hooks`` in order; the first failure stops the phase with an EngineError
    naming the phase and the hook's path."""
    state_json = json.dumps(dict(state), separators=(",", ":")).encode()
    for hook in hooks:
        run_hook(hook, state_json, phase=phase)
