"""Deny-by-default agent policy for hardened images.

A policy file (``agent.policy=PATH`` on the kernel command line, or ``--policy FILE``) lists
what the host may ask for; anything not listed is refused with PERMISSION_DENIED:

.. code-block:: json

    {
      "allow_rpcs": ["CreateContainer", "StartContainer", "WaitProcess"],
      "containers": {
        "allowed_commands": [["/bin/sh", "-c", "*"], ["/usr/bin/app", "**"]],
        "allowed_images": ["/run/kata-containers/shared/containers/*/rootfs"]
      },
      "exec": {"allowed_commands": [["/bin/ps"]]}
    }

``Check`` and ``Version`` are always allowed: without them a runtime cannot even see that
the agent is up. A missing section allows nothing of its kind.

Command patterns match a process's argv element by element with shell globs (``*`` and
``?`` match any characters of one argument); a last element ``**`` matches any number of
further arguments, including none. Image patterns match the container's root path with
``*`` and ``?`` inside one path component and ``**`` across components; the root path must
be absolute and normalized, so ``..`` can never make a listed prefix reach elsewhere.

A file that is unreadable, not JSON, or off this schema (unknown keys, unknown RPC names,
wrong types, absurd sizes) raises ``PolicyError``: the agent refuses to start rather than
run with a policy that means something other than what its author wrote.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kata_agent.protocol import names
from kata_agent.server import RpcError, StatusCode

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 1024 * 1024
MAX_RULES = 4096
MAX_RULE_ARGS = 256
MAX_PATTERN_LEN = 4096
ANY_REST = "**"

# Always allowed: liveness and protocol version are what a runtime checks before anything.
ALWAYS_ALLOWED_RPCS = frozenset({"Check", "Version"})
KNOWN_RPCS = frozenset(m for methods in names.SERVICES.values() for m in methods)

_TOP_KEYS = frozenset({"version", "allow_rpcs", "containers", "exec"})
_CONTAINER_KEYS = frozenset({"allowed_commands", "allowed_images"})
_EXEC_KEYS = frozenset({"allowed_commands"})
POLICY_VERSION = 1


class PolicyError(Exception):
    """The policy file cannot be used; the message names the file and the bad field."""


def _denied(msg: str) -> RpcError:
    return RpcError(StatusCode.PERMISSION_DENIED, f"denied by policy: {msg}")


def rpc_name(method: str) -> str:
    """``CreateContainer``, ``grpc.AgentService/CreateContainer`` and the full path
    ``/grpc.AgentService/CreateContainer`` all name the same RPC."""
    return method.rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class CommandRule:
    """One allowed argv shape: a glob per argument, optionally ending in ``**``."""

    pattern: tuple[str, ...]

    def matches(self, args: Sequence[str]) -> bool:
        pat = self.pattern
        if pat and pat[-1] == ANY_REST:
            fixed = pat[:-1]
            if len(args) < len(fixed):
                return False
        else:
            fixed = pat
            if len(args) != len(fixed):
                return False
        return all(fnmatch.fnmatchcase(a, p) for a, p in zip(args, fixed, strict=False))


def _path_glob(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith(ANY_REST, i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class ImageRule:
    """One allowed container root path glob."""

    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def of(cls, pattern: str) -> ImageRule:
        return cls(pattern, _path_glob(pattern))

    def matches(self, root_path: str) -> bool:
        return self.regex.fullmatch(root_path) is not None


def _clean_root_path(root_path: str) -> str | None:
    """The root path if it is absolute and normalized, else None (refused)."""
    if not root_path.startswith("/") or "\0" in root_path:
        return None
    trimmed = root_path.rstrip("/") or "/"
    # A path that normalizes differently (``..``, ``.``, ``//``) could satisfy a glob
    # lexically while naming another directory.
    if os.path.normpath(trimmed) != trimmed or trimmed.startswith("//"):
        return None
    return trimmed


@dataclass(frozen=True, slots=True)
class Policy:
    """What the host may ask of this agent. Build with ``load`` or ``allow_all``."""

    unrestricted: bool
    allowed_rpcs: frozenset[str]
    container_commands: tuple[CommandRule, ...]
    container_images: tuple[ImageRule, ...]
    exec_commands: tuple[CommandRule, ...]
    source: str = ""

    # -- construction ------------------------------------------------------------------

    @classmethod
    def allow_all(cls) -> Policy:
        """No policy file: everything is allowed (the stock agent's behaviour)."""
        return cls(True, KNOWN_RPCS, (), (), (), source="")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file; raises PolicyError with the reason."""
        where = os.fspath(path)
        try:
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            raise PolicyError(f"policy {where}: cannot open: {err.strerror}") from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PolicyError(f"policy {where}: not a regular file")
            if st.st_size > MAX_POLICY_BYTES:
                raise PolicyError(f"policy {where}: {st.st_size} bytes, at most "
                                  f"{MAX_POLICY_BYTES}")
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(MAX_POLICY_BYTES + 1)
        except OSError as err:
            raise PolicyError(f"policy {where}: cannot read: {err.strerror}") from err
        finally:
            os.close(fd)
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy {where}: larger than {MAX_POLICY_BYTES} bytes")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise PolicyError(f"policy {where}: not valid JSON: {err}") from err
        policy = cls.from_document(doc, source=where)
        log.info("policy loaded path=%s rpcs=%d container_commands=%d images=%d "
                 "exec_commands=%d", where, len(policy.allowed_rpcs),
                 len(policy.container_commands), len(policy.container_images),
                 len(policy.exec_commands))
        return policy

    @classmethod
    def from_document(cls, doc: object, *, source: str = "<document>") -> Policy:
        """Validate a decoded JSON document; raises PolicyError naming the bad field."""

        def fail(field: str, problem: str) -> PolicyError:
            return PolicyError(f"policy {source}: {field}: {problem}")

        top = _object(doc, "(top level)", _TOP_KEYS, fail)
        version = top.get("version", POLICY_VERSION)
        if type(version) is not int or version != POLICY_VERSION:
            raise fail("version", f"unsupported version {version!r}, expected "
                       f"{POLICY_VERSION}")
        rpcs = _strings(top.get("allow_rpcs", []), "allow_rpcs", fail)
        for i, name in enumerate(rpcs):
            if name not in KNOWN_RPCS:
                raise fail(f"allow_rpcs[{i}]", f"unknown RPC {name!r}")
        containers = _object(top.get("containers", {}), "containers", _CONTAINER_KEYS, fail)
        execs = _object(top.get("exec", {}), "exec", _EXEC_KEYS, fail)
        images = _strings(containers.get("allowed_images", []), "containers.allowed_images",
                          fail)
        for i, pattern in enumerate(images):
            if not pattern.startswith("/"):
                raise fail(f"containers.allowed_images[{i}]",
                           f"{pattern!r} is not an absolute path glob")
        return cls(
            unrestricted=False,
            allowed_rpcs=frozenset(rpcs) | ALWAYS_ALLOWED_RPCS,
            container_commands=_commands(containers.get("allowed_commands", []),
                                         "containers.allowed_commands", fail),
            container_images=tuple(ImageRule.of(p) for p in images),
            exec_commands=_commands(execs.get("allowed_commands", []),
                                    "exec.allowed_commands", fail),
            source=source,
        )

    # -- checks ------------------------------------------------------------------------

    def rpc_allowed(self, method: str) -> bool:
        name = rpc_name(method)
        return self.unrestricted or name in self.allowed_rpcs or name in ALWAYS_ALLOWED_RPCS

    def check_rpc(self, method: str) -> None:
        """Raise PERMISSION_DENIED unless the RPC is allowed."""
        if not self.rpc_allowed(method):
            log.warning("policy denied rpc=%s", rpc_name(method))
            raise _denied(f"RPC {rpc_name(method)} is not allowed")

    def check_container(self, args: Sequence[str], root_path: str) -> None:
        """Raise PERMISSION_DENIED unless both the container's command and its root
        path are allowed."""
        if self.unrestricted:
            return
        argv = list(args)
        if not any(rule.matches(argv) for rule in self.container_commands):
            log.warning("policy denied container command args=%r", argv[:8])
            raise _denied(f"container command {_show(argv)} is not allowed")
        clean = _clean_root_path(root_path)
        if clean is None or not any(rule.matches(clean) for rule in self.container_images):
            log.warning("policy denied container root=%r", root_path[:256])
            raise _denied(f"container root {root_path[:256]!r} is not allowed")

    def check_exec(self, args: Sequence[str]) -> None:
        """Raise PERMISSION_DENIED unless the exec'd command is allowed."""
        if self.unrestricted:
            return
        argv = list(args)
        if not any(rule.matches(argv) for rule in self.exec_commands):
            log.warning("policy denied exec args=%r", argv[:8])
            raise _denied(f"exec command {_show(argv)} is not allowed")

    def guard(self, service: object) -> object:
        """Wrap a service object so each of its RPC methods checks the policy first."""
        if self.unrestricted:
            return service
        return _Guarded(service, self)


class _Guarded:
    """A service whose RPC methods (names from the protocol) pass ``check_rpc`` first."""

    def __init__(self, service: object, policy: Policy) -> None:
        self._service = service
        self._policy = policy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._service, name)
        if name not in KNOWN_RPCS or not callable(attr):
            return attr
        policy = self._policy

        def checked(request: Any, context: Any) -> Any:
            policy.check_rpc(name)
            return attr(request, context)

        return checked


def load_optional(path: str | os.PathLike[str] | None) -> Policy:
    """The policy at ``path``, or ``allow_all`` when no path is configured."""
    if path is None or os.fspath(path) == "":
        return Policy.allow_all()
    return Policy.load(path)


def _show(argv: Sequence[str]) -> str:
    text = json.dumps(list(argv[:8]))
    return text if len(text) <= 200 else text[:200] + "..."


Fail = Callable[[str, str], PolicyError]


def _object(value: object, field: str, keys: Iterable[str], fail: Fail) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise fail(field, f"expected an object, got {type(value).__name__}")
    allowed = frozenset(keys)
    for key in value:
        # A misspelt key would silently deny (or, worse, silently mean nothing).
        if key not in allowed:
            raise fail(field, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    return value


def _strings(value: object, field: str, fail: Fail, *, limit: int = MAX_RULES,
             allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise fail(field, f"expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(field, f"{len(value)} entries, at most {limit}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fail(f"{field}[{i}]", f"expected a string, got {type(item).__name__}")
        if (not item and not allow_empty) or len(item) > MAX_PATTERN_LEN or "\0" in item:
            raise fail(f"{field}[{i}]", "empty, too long or contains NUL")
    return list(value)


def _commands(value: object, field: str, fail: Fail) -> tuple[CommandRule, ...]:
    if not isinstance(value, list):
        raise fail(field, f"expected a list of argv patterns, got {type(value).__name__}")
    if len(value) > MAX_RULES:
        raise fail(field, f"{len(value)} entries, at most {MAX_RULES}")
    rules: list[CommandRule] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        # An empty element is a literal empty argument.
        args = _strings(item, where, fail, limit=MAX_RULE_ARGS, allow_empty=True)
        if not args or not args[0] or args[0] == ANY_REST:
            raise fail(where, "a command pattern needs at least the program")
        for j, arg in enumerate(args[:-1]):
            if arg == ANY_REST:
                raise fail(f"{where}[{j}]", f"{ANY_REST!r} is only allowed as the last element")
        rules.append(CommandRule(tuple(args)))
    return tuple(rules)
