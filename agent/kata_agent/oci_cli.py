"""``kata-oci``: a runc-compatible command line over the container engine.

Verbs and flags follow runc so OCI tooling (runtime-tools validation, shims) can drive it.
The process is single-threaded and forks container processes itself; before it does, it
re-executes from a sealed copy of the interpreter (see engine/process.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Sequence
from typing import Any

from kata_agent.engine import process as proc_mod
from kata_agent.engine import syscalls as sc
from kata_agent.engine.container import Engine, Stdio
from kata_agent.engine.errors import EngineError, NotFoundError, SpecError
from kata_agent.engine.spec import Process, Spec, default_spec
from kata_agent.engine.state import STOPPED

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/run/kata-oci"
FORKING_VERBS = ("create", "run", "exec")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-oci", description="OCI runtime for Kata guests")
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory")
    p.add_argument("--log", default="", help="log file (default stderr)")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="not supported; accepted for compatibility")
    sub = p.add_subparsers(dest="verb", required=True)

    def with_id(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("id")
        return sp

    def creating(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", "-b", default=".")
        sp.add_argument("--console-socket", default=None)
        sp.add_argument("--pid-file", default=None)
        sp.add_argument("--no-pivot", action="store_true")
        sp.add_argument("--no-new-keyring", action="store_true")
        sp.add_argument("--preserve-fds", type=int, default=0)

    creating(with_id("create", "create a container"))
    run = with_id("run", "create and start a container, wait for it")
    creating(run)
    run.add_argument("--detach", "-d", action="store_true")
    run.add_argument("--keep", action="store_true")
    with_id("start", "start a created container")
    with_id("state", "print the state of a container")
    k = with_id("kill", "send a signal to a container")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("--all", "-a", action="store_true")
    d = with_id("delete", "delete a container")
    d.add_argument("--force", "-f", action="store_true")
    e = with_id("exec", "run a process in a container")
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.add_argument("--process", "-p", default=None)
    e.add_argument("--tty", "-t", action="store_true")
    e.add_argument("--env", "-e", action="append", default=[])
    e.add_argument("--cwd", default=None)
    e.add_argument("--user", "-u", default=None)
    e.add_argument("--additional-gids", "-g", action="append", default=[])
    e.add_argument("--detach", "-d", action="store_true")
    e.add_argument("--pid-file", default=None)
    e.add_argument("--console-socket", default=None)
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("--no-new-privs", action="store_true")
    ps = with_id("ps", "list processes of a container")
    ps.add_argument("--format", "-f", default="table", choices=("table", "json"))
    with_id("pause", "freeze a container")
    with_id("resume", "thaw a container")
    ls = sub.add_parser("list", help="list containers")
    ls.add_argument("--format", "-f", default="table", choices=("table", "json"))
    ls.add_argument("--quiet", "-q", action="store_true")
    sp = sub.add_parser("spec", help="write a default config.json")
    sp.add_argument("--bundle", "-b", default=".")
    sp.add_argument("--rootless", action="store_true")
    return p


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower(), "msg": record.getMessage(),
                           "time": self.formatTime(record), "logger": record.name})


def setup_logging(args: argparse.Namespace) -> None:
    handler: logging.Handler = (logging.FileHandler(args.log) if args.log
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(_JsonFormatter() if args.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING)


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    if not t.startswith("SIG"):
        t = "SIG" + t
    try:
        return int(signal.Signals[t])
    except KeyError as e:
        raise SpecError(f"unknown signal {text!r}", field="signal") from e


def exit_status(status: int) -> int:
    """What a shell reports: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def grab_preserved(n: int) -> list[int]:
    """Move fds 3..3+n-1 out of the way (close-on-exec copies) before we open anything."""
    out = []
    for fd in range(3, 3 + n):
        out.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256))
        os.close(fd)
    return out


def wait_child(pid: int, forward: bool = True) -> int:
    """Wait for ``pid`` (our child by the subreaper rule), forwarding signals to it and
    reaping any other orphan that lands on us meanwhile."""

    def relay(signum: int, _frame: object) -> None:
        # waitpid() restarts after a handler runs (PEP 475): forward from the handler.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    if forward:
        for s in FORWARDED_SIGNALS:
            signal.signal(s, relay)
    try:
        while True:
            try:
                wpid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return 255
            if wpid == pid:
                return exit_status(status)
    finally:
        if forward:
            for s in FORWARDED_SIGNALS:
                signal.signal(s, signal.SIG_DFL)


def proxy_tty(master: int, pid: int) -> int:
    """Copy between our terminal and the container's pty until the process exits."""
    def relay(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for s in FORWARDED_SIGNALS:
        signal.signal(s, relay)
    old = None
    if os.isatty(0):
        old = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        fds = [0, master]
        while True:
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 255
            if wpid == pid:
                _drain(master)
                return exit_status(status)
            r, _, _ = select.select(fds, [], [], 0.2)
            if 0 in r:
                data = os.read(0, 4096)
                if data:
                    os.write(master, data)
                else:
                    fds.remove(0)
            if master in r:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    data = b""
                if data:
                    os.write(1, data)
                else:
                    fds.remove(master)
    finally:
        if old is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, old)


def _drain(master: int) -> None:
    while select.select([master], [], [], 0)[0]:
        try:
            data = os.read(master, 4096)
        except OSError:
            return
        if not data:
            return
        os.write(1, data)


def exec_process_spec(args: argparse.Namespace, engine: Engine) -> Process:
    if args.process:
        with open(args.process) as f:
            return Process.from_oci(json.load(f), "process")
    if not args.command:
        raise SpecError("a command or --process is required", field="process.args")
    cstate = engine.state(args.id)
    base: dict[str, Any] = dict(cstate.config.get("process") or {})
    base["args"] = list(args.command)
    base["terminal"] = bool(args.tty)
    env = list(base.get("env") or [])
    env += list(args.env)
    base["env"] = env
    if args.cwd:
        base["cwd"] = args.cwd
    if args.no_new_privs:
        base["noNewPrivileges"] = True
    if args.user:
        uid, _, gid = args.user.partition(":")
        user: dict[str, Any] = {"uid": int(uid), "gid": int(gid or 0)}
        if args.additional_gids:
            user["additionalGids"] = [int(g) for g in args.additional_gids]
        base["user"] = user
    base.pop("consoleSize", None)
    return Process.from_oci(base, "process")


def cmd(args: argparse.Namespace, preserved: Sequence[int]) -> int:
    if args.systemd_cgroup:
        raise SpecError("systemd cgroup driver is not supported", field="--systemd-cgroup")
    engine = Engine(args.root)
    verb = args.verb
    if verb == "spec":
        path = os.path.join(args.bundle, "config.json")
        with open(path, "x") as f:
            json.dump(default_spec(rootless=args.rootless), f, indent=2)
        return 0
    if verb in ("create", "run"):
        spec = Spec.load(args.bundle)
        master: list[int] = []
        stdio = Stdio(fds=(0, 1, 2), on_console=master.append)
        cstate = engine.create(args.id, args.bundle, spec, stdio=stdio,
                               console_socket=args.console_socket, pid_file=args.pid_file,
                               preserve_fds=preserved, no_pivot=args.no_pivot)
        if verb == "create":
            for fd in master:
                os.close(fd)
            return 0
        try:
            engine.start(args.id)
        except EngineError:
            engine.delete(args.id, force=True)
            raise
        if args.detach:
            return 0
        code = proxy_tty(master[0], cstate.pid) if master else wait_child(cstate.pid)
        if not args.keep:
            engine.delete(args.id, force=True)
        return code
    if verb == "start":
        engine.start(args.id)
    elif verb == "state":
        print(json.dumps(engine.state(args.id).oci_state(), indent=2))
    elif verb == "kill":
        engine.kill(args.id, parse_signal(args.signal), all=args.all)
    elif verb == "delete":
        try:
            engine.delete(args.id, force=args.force)
        except NotFoundError:
            # As runc: deleting what is not there is only an error without --force.
            if not args.force:
                raise
    elif verb == "exec":
        process = exec_process_spec(args, engine)
        master = []
        pid = engine.exec_process(args.id, process,
                                  stdio=Stdio(fds=(0, 1, 2), on_console=master.append),
                                  console_socket=args.console_socket, pid_file=args.pid_file,
                                  preserve_fds=preserved)
        if args.detach:
            return 0
        return proxy_tty(master[0], pid) if master else wait_child(pid)
    elif verb == "ps":
        pids = engine.ps(args.id)
        if args.format == "json":
            print(json.dumps(pids))
        else:
            print("PID")
            for pid in pids:
                print(pid)
    elif verb == "pause":
        engine.pause(args.id)
    elif verb == "resume":
        engine.resume(args.id)
    elif verb == "list":
        states = engine.list()
        if args.quiet:
            for s in states:
                print(s.id)
        elif args.format == "json":
            print(json.dumps([s.oci_state() for s in states]))
        else:
            print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<30} {'CREATED':<32} OWNER")
            for s in states:
                pid = s.pid if s.status != STOPPED else 0
                print(f"{s.id:<20} {pid:<8} {s.status:<10} {s.bundle:<30} {s.created:<32} "
                      f"{s.owner or 'root'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.verb in FORKING_VERBS:
        # Container processes start as forks of this interpreter: run from a sealed copy.
        proc_mod.reexec_sealed(["-m", "kata_agent.oci_cli", *argv])
        sc.Syscalls().prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    preserved = grab_preserved(getattr(args, "preserve_fds", 0) or 0)
    setup_logging(args)
    try:
        return cmd(args, preserved)
    except EngineError as e:
        log.debug("event=failed verb=%s error=%s", args.verb, e)
        print(f"kata-oci: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kata-oci: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
