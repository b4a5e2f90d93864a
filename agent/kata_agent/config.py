"""Agent configuration: the kernel command line, then command-line flags on top.

The host runtime configures the guest agent through `agent.*` words on the kernel command
line (Kata 1.x names). Flags given to `kata-agent` override them, which is how tests and
development runs choose a channel without a VM.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOG_LEVELS: Mapping[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "critical": logging.CRITICAL,
    "panic": logging.CRITICAL,
}

DEFAULT_VSOCK_PORT = 1024
SERIAL_PORT_NAME = "agent.channel.0"
# Pipe sizes the host may ask for: a page up to the kernel's default pipe-max-size.
MAX_PIPE_SIZE = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value could not be understood."""


@dataclass(frozen=True, slots=True)
class Channel:
    """Where the agent listens.

    kind: ``serial`` (virtio-serial port; ``path`` names a device to use instead of looking
    up ``agent.channel.0``), ``vsock`` (``port``), ``unix-serial`` (listen on ``path``, each
    connection is a serial line carrying yamux) or ``unix`` (plain gRPC on ``path``).
    """

    kind: str
    path: str = ""
    port: int = DEFAULT_VSOCK_PORT

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.port}"
        return f"{self.kind}:{self.path}" if self.path else self.kind


def parse_channel(text: str) -> Channel:
    """Parse the `--channel` syntax: serial[:DEV] | vsock[:PORT] | unix-serial:PATH | unix:PATH."""
    kind, _, rest = text.partition(":")
    if kind == "serial":
        return Channel("serial", path=rest)
    if kind == "vsock":
        if not rest:
            return Channel("vsock")
        try:
            port = int(rest, 10)
        except ValueError:
            raise ConfigError(f"vsock port is not a number: {rest!r}") from None
        if not 0 < port < 2**32 - 1:
            raise ConfigError(f"vsock port out of range: {port}")
        return Channel("vsock", port=port)
    if kind in ("unix-serial", "unix"):
        if not rest:
            raise ConfigError(f"{kind} channel needs a path: {kind}:PATH")
        return Channel(kind, path=rest)
    raise ConfigError(
        f"unknown channel {text!r}: use serial, vsock[:PORT], unix-serial:PATH, unix:PATH"
    )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    log_level: int = logging.INFO
    channel: Channel = Channel("serial")
    debug_console: bool = False
    debug_console_vport: int = 0
    log_vport: int = 0
    hotplug_timeout: float = 3.0
    container_pipe_size: int = 0
    trace: bool = False
    devmode: bool = False
    unified_cgroup_hierarchy: bool = False
    policy: str = ""  # path of a JSON policy file; empty: everything allowed


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("", "1", "true", "yes", "on", "y", "t"):
        return True
    if lowered in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def _parse_duration(value: str) -> float:
    # Kata accepts Go durations ("5s", "500ms") and plain seconds.
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * scale
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"not a duration: {value!r}") from None


def _parse_pipe_size(value: str) -> int:
    size = int(value, 10)
    if not 0 <= size <= MAX_PIPE_SIZE:
        raise ConfigError(f"pipe size {size} outside 0..{MAX_PIPE_SIZE}")
    return size


def _parse_vport(value: str) -> int:
    port = int(value, 10)
    if not 0 <= port < 2**32 - 1:
        raise ConfigError(f"vsock port out of range: {port}")
    return port


def _parse_level(value: str) -> int:
    try:
        return LOG_LEVELS[value.lower()]
    except KeyError:
        raise ConfigError(f"unknown log level {value!r}") from None


def split_cmdline(cmdline: str) -> list[str]:
    """Split a kernel command line into words, honouring double quotes as the kernel does."""
    words: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for ch in cmdline:
        if ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        words.append("".join(current))
    return words


def from_cmdline(cmdline: str, base: AgentConfig | None = None) -> AgentConfig:
    """Apply the `agent.*` options of a kernel command line.

    Unknown `agent.*` options and bad values are logged and ignored: a typo on the command line
    must not keep the agent from starting and leave the VM unreachable.
    """
    cfg = base or AgentConfig()
    changes: dict[str, object] = {}
    for word in split_cmdline(cmdline):
        if word == "--":
            break  # what follows is for init, not for the kernel or us
        key, has_value, value = word.partition("=")
        if not key.startswith("agent."):
            continue
        option = key[len("agent.") :]
        try:
            if option == "log":
                changes["log_level"] = _parse_level(value)
            elif option == "use_vsock":
                if _parse_bool(value):
                    changes["channel"] = Channel("vsock")
            elif option == "debug_console":
                changes["debug_console"] = _parse_bool(value) if has_value else True
            elif option == "debug_console_vport":
                changes["debug_console_vport"] = _parse_vport(value)
            elif option == "log_vport":
                changes["log_vport"] = _parse_vport(value)
            elif option == "hotplug_timeout":
                changes["hotplug_timeout"] = _parse_duration(value)
            elif option == "container_pipe_size":
                changes["container_pipe_size"] = _parse_pipe_size(value)
            elif option == "trace":
                changes["trace"] = _parse_bool(value) if has_value else True
            elif option == "devmode":
                changes["devmode"] = _parse_bool(value) if has_value else True
            elif option == "policy":
                if not value.startswith("/"):
                    raise ConfigError(f"policy path must be absolute: {value!r}")
                changes["policy"] = value
            elif option == "unified_cgroup_hierarchy":
                changes["unified_cgroup_hierarchy"] = _parse_bool(value) if has_value else True
            else:
                log.warning("unknown kernel command line option ignored option=%s", key)
        except (ConfigError, ValueError) as err:
            log.warning("bad kernel command line value ignored option=%s error=%s", key, err)
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def read_cmdline(path: str = "/proc/cmdline") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as err:
        log.warning("cannot read kernel command line path=%s error=%s", path, err)
        return ""


def with_overrides(cfg: AgentConfig, overrides: Iterable[tuple[str, object]]) -> AgentConfig:
    """Flags win over the kernel command line; None means "not given"."""
    changes = {name: value for name, value in overrides if value is not None}
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
