"""`kata-agent`: the guest agent's entry point."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence

from kata_agent import __version__, config
from kata_agent.config import AgentConfig, ConfigError

log = logging.getLogger("kata_agent")

DEFAULT_RUNTIME_DIR = "/run/kata-agent"
PR_SET_CHILD_SUBREAPER = 36


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kata-agent",
        description="Kata Containers guest agent (1.x gRPC protocol). Options on the kernel "
        "command line (agent.log, agent.use_vsock, ...) apply unless a flag overrides them.",
    )
    p.add_argument(
        "--channel",
        help="serial[:DEVICE] (default: the port named agent.channel.0), vsock[:PORT] "
        "(default 1024), unix-serial:PATH (each connection is a serial line with yamux), "
        "unix:PATH (plain gRPC)",
    )
    p.add_argument("--log-level", choices=sorted(config.LOG_LEVELS), help="overrides agent.log")
    p.add_argument("--cmdline", default="/proc/cmdline", help="kernel command line file to read")
    p.add_argument(
        "--policy", help="JSON policy file: deny what it does not allow (overrides agent.policy)"
    )
    p.add_argument(
        "--runtime-dir",
        default=DEFAULT_RUNTIME_DIR,
        help="private directory for the agent's own sockets (created 0700)",
    )
    p.add_argument(
        "--cgroup-favordynmods",
        action="store_true",
        help="make cgroup moves cheap for the whole kernel while the agent runs (a guest "
        "setting: the unit passes it; the agent as PID 1 always does it)",
    )
    p.add_argument("--version", action="version", version=f"kata-agent {__version__}")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> AgentConfig:
    cfg = config.from_cmdline(config.read_cmdline(args.cmdline))
    overrides: list[tuple[str, object]] = [
        ("channel", config.parse_channel(args.channel) if args.channel else None),
        ("log_level", config.LOG_LEVELS[args.log_level] if args.log_level else None),
        ("policy", args.policy),
    ]
    return config.with_overrides(cfg, overrides)


def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def private_backend(runtime_dir: str) -> str:
    """A path for the gRPC backend socket that containers cannot reach.

    Containers share the guest's network namespace in Kata, so an abstract socket would be
    reachable from them; a socket in a 0700 directory of the agent's mount namespace is not.
    """
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    os.chmod(runtime_dir, 0o700)
    for name in os.listdir(runtime_dir):
        # Left by an agent that did not stop cleanly (one agent per runtime dir).
        if name.startswith("grpc-"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(runtime_dir, name, "agent.sock"))
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(runtime_dir, name))
    private = tempfile.mkdtemp(prefix="grpc-", dir=runtime_dir)
    return os.path.join(private, "agent.sock")


def serve(cfg: AgentConfig, runtime_dir: str, stop: threading.Event, *,
          favor_cgroup_changes: bool = False) -> int:
    # Imported here so that `--help` and config errors stay fast.
    from kata_agent import channel, debug_console, persist, sdnotify, server
    from kata_agent.engine import syscalls as sc
    from kata_agent.engine.zygote import ZygoteLauncher
    from kata_agent.policy import PolicyError, load_optional
    from kata_agent.service import build_services, close_services

    try:
        policy = load_optional(cfg.policy)
    except PolicyError as err:
        # A hardened image asked for a policy: serving without it would allow everything.
        log.error("policy refused, not starting error=%s", err)
        return 2
    if cfg.policy:
        log.info("policy loaded path=%s", cfg.policy)

    # Container inits become our children once their launcher exits, so their exit
    # statuses reach us; set before the zygote starts so its children inherit it.
    sc.Syscalls().prctl(PR_SET_CHILD_SUBREAPER, 1)
    # Under systemd: the stdio of containers a previous agent ran, kept in the unit's fd
    # store, and the journal that says whose they are.
    stored = sdnotify.listen_fds()
    notifier = sdnotify.Notifier.from_env()
    keeper = (persist.Keeper(os.path.join(runtime_dir, "sandbox.json"), notifier)
              if notifier.enabled else None)
    for fds in stored.values() if keeper is None else ():
        for fd in fds:
            os.close(fd)
    if threading.active_count() != 1:
        # The zygote must be forked from a single-threaded process.
        log.error("threads running before the zygote count=%d", threading.active_count())
        return 1
    zygote = ZygoteLauncher.start()
    undo_tuning = None
    if favor_cgroup_changes:
        from kata_agent.cgroup_tuning import favor_dynamic_changes

        undo_tuning = favor_dynamic_changes()
    state_root = os.path.join(runtime_dir, "containers")
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    services = build_services(cfg, launcher=zygote, state_root=state_root, policy=policy,
                              keeper=keeper, stored_fds=stored)
    grpc_server = server.build_server(services)
    if cfg.channel.kind == "unix":
        address = f"unix:{cfg.channel.path}"
        backend = ""
    else:
        backend = private_backend(runtime_dir)
        address = f"unix:{backend}"
    if grpc_server.add_insecure_port(address) == 0:
        log.error("cannot listen address=%s", address)
        close_services(services)
        zygote.close()
        if undo_tuning is not None:
            undo_tuning()
        return 1
    grpc_server.start()
    listener = channel.make_listener(cfg.channel, backend, endpoints=grpc_server.connection)
    if listener is not None:
        listener.start()
    consoles = debug_console.start(cfg, runtime_dir)
    log.info("agent ready version=%s channel=%s pid=%d", __version__, cfg.channel, os.getpid())
    notifier.ready()
    stop.wait()
    log.info("agent stopping")
    for console in consoles:
        console.stop()
    if listener is not None:
        listener.stop()
    grpc_server.stop(grace=1.0).wait()
    close_services(services)
    zygote.close()
    if undo_tuning is not None:
        undo_tuning()
    if keeper is not None:
        keeper.clear()  # stopped on purpose: nothing is left to take back
    notifier.close()
    with contextlib.suppress(OSError):
        os.rmdir(state_root)  # only when empty: state of live containers stays
    if backend:
        # The server removes its socket when it stops; the directory must go either way.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backend)
        os.rmdir(os.path.dirname(backend))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as err:
        print(f"kata-agent: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return serve(cfg, args.runtime_dir, stop,
                     favor_cgroup_changes=args.cgroup_favordynmods or os.getpid() == 1)
    except Exception:
        log.exception("agent failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
