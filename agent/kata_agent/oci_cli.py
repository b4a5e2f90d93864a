"""``kata-oci``: a runc-compatible command line over the container engine.

Verbs and flags follow runc so OCI tooling (runtime-tools validation, shims) can drive it.
The process is single-threaded and forks container processes itself; before it does, it
re-executes from a sealed copy of the interpreter (see engine/process.py).

Start-up cost matters (a shim runs one process per verb): a verb that puts a process into a
container re-executes before loading anything else, and every verb loads only the modules
it uses (hence the imports inside functions).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from kata_agent.engine.container import Engine
    from kata_agent.engine.spec import Process

DEFAULT_ROOT = "/run/kata-oci"
FORKING_VERBS = ("create", "run", "exec")
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def forwarded_signals() -> list[int]:
    import signal

    return [int(getattr(signal, name)) for name in FORWARDED_SIGNALS]


VERBS = ("create", "run", "start", "state", "kill", "delete", "exec", "ps", "pause", "resume",
         "list", "spec")
_GLOBAL_FLAGS = ("--debug", "--systemd-cgroup")
_GLOBAL_VALUES = ("--root", "--log", "--log-format")


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb of a command line spelled plainly (global options in full, before the
    verb); None for anything else (abbreviations, --help, ``--``...)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _GLOBAL_FLAGS:
            i += 1
        elif a in _GLOBAL_VALUES:
            i += 2
        elif "=" in a and a.split("=", 1)[0] in _GLOBAL_VALUES:
            i += 1
        else:
            return a if a in VERBS else None
    return None


def _terminal_columns() -> int:
    """COLUMNS, else the width of the terminal on stdout, else 80 (as shutil does)."""
    try:
        cols = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        cols = 0
    if cols > 0:
        return cols
    out = sys.__stdout__
    try:
        return (os.get_terminal_size(out.fileno()).columns if out is not None else 0) or 80
    except (ValueError, OSError):
        return 80


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the one verb's sub-command (what a plainly spelled
    command line needs: it parses to the same namespace, for less start-up time)."""
    import argparse

    def want(name: str) -> bool:
        return only is None or only == name

    # What argparse would ask shutil for (shutil alone costs more to load than parsing).
    width = _terminal_columns() - 2

    def formatter(prog: str) -> argparse.HelpFormatter:
        return argparse.HelpFormatter(prog, width=width)

    p = argparse.ArgumentParser(prog="kata-oci", description="OCI runtime for Kata guests",
                                formatter_class=formatter)
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory")
    p.add_argument("--log", default="", help="log file (default stderr)")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="not supported; accepted for compatibility")
    sub = p.add_subparsers(dest="verb", required=True)

    def with_id(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, formatter_class=formatter)
        sp.add_argument("id")
        return sp

    def creating(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", "-b", default=".")
        sp.add_argument("--console-socket", default=None)
        sp.add_argument("--pid-file", default=None)
        sp.add_argument("--no-pivot", action="store_true")
        sp.add_argument("--no-new-keyring", action="store_true")
        sp.add_argument("--preserve-fds", type=int, default=0)

    if want("create"):
        creating(with_id("create", "create a container"))
    if want("run"):
        run = with_id("run", "create and start a container, wait for it")
        creating(run)
        run.add_argument("--detach", "-d", action="store_true")
        run.add_argument("--keep", action="store_true")
    if want("start"):
        with_id("start", "start a created container")
    if want("state"):
        with_id("state", "print the state of a container")
    if want("kill"):
        k = with_id("kill", "send a signal to a container")
        k.add_argument("signal", nargs="?", default="SIGTERM")
        k.add_argument("--all", "-a", action="store_true")
    if want("delete"):
        d = with_id("delete", "delete a container")
        d.add_argument("--force", "-f", action="store_true")
    if want("exec"):
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
    if want("ps"):
        ps = with_id("ps", "list processes of a container")
        ps.add_argument("--format", "-f", default="table", choices=("table", "json"))
    if want("pause"):
        with_id("pause", "freeze a container")
    if want("resume"):
        with_id("resume", "thaw a container")
    if want("list"):
        ls = sub.add_parser("list", help="list containers", formatter_class=formatter)
        ls.add_argument("--format", "-f", default="table", choices=("table", "json"))
        ls.add_argument("--quiet", "-q", action="store_true")
    if want("spec"):
        sp = sub.add_parser("spec", help="write a default config.json",
                            formatter_class=formatter)
        sp.add_argument("--bundle", "-b", default=".")
        sp.add_argument("--rootless", action="store_true")
    return p


def setup_logging(args: argparse.Namespace) -> None:
    import json
    import logging

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"level": record.levelname.lower(), "msg": record.getMessage(),
                               "time": self.formatTime(record), "logger": record.name})

    handler: logging.Handler = (logging.FileHandler(args.log) if args.log
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter() if args.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING)


def parse_signal(text: str) -> int:
    import signal

    from kata_agent.engine.errors import SpecError

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
    import fcntl

    out = []
    for fd in range(3, 3 + n):
        out.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256))
        os.close(fd)
    return out


def relay_signals(pid: int) -> None:
    """Forward the signals a shell or shim sends us to ``pid`` from now on."""
    import contextlib
    import signal

    def relay(signum: int, _frame: object) -> None:
        # waitpid() restarts after a handler runs (PEP 475): forward from the handler.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for s in forwarded_signals():
        signal.signal(s, relay)


def _default_signals() -> None:
    import signal

    for s in forwarded_signals():
        signal.signal(s, signal.SIG_DFL)


def wait_child(pid: int, forward: bool = True) -> int:
    """Wait for ``pid`` (our child by the subreaper rule), forwarding signals to it and
    reaping any other orphan that lands on us meanwhile."""
    if forward:
        relay_signals(pid)
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
            _default_signals()


def proxy_tty(master: int, pid: int) -> int:
    """Copy between our terminal and the container's pty until the process exits."""
    import select
    import termios
    import tty

    relay_signals(pid)
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
    import select

    while select.select([master], [], [], 0)[0]:
        try:
            data = os.read(master, 4096)
        except OSError:
            return
        if not data:
            return
        os.write(1, data)


def exec_process_spec(args: argparse.Namespace, engine: Engine) -> Process:
    import json
    from typing import Any

    from kata_agent.engine.errors import SpecError
    from kata_agent.engine.spec import Process

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
    from kata_agent.engine.errors import EngineError, NotFoundError, SpecError

    if args.systemd_cgroup:
        raise SpecError("systemd cgroup driver is not supported", field="--systemd-cgroup")
    if args.verb == "delete" and args.force:
        # What a shim runs after every container, usually once it is gone: with nothing
        # under the id there is nothing to do (and no engine to load).
        from kata_agent.engine.ids import validate_id

        if not os.path.lexists(os.path.join(args.root, validate_id(args.id))):
            return 0
    import json

    from kata_agent.engine.container import Engine, Stdio

    engine = Engine(args.root)
    verb = args.verb
    if verb == "spec":
        from kata_agent.engine.spec import default_spec

        path = os.path.join(args.bundle, "config.json")
        with open(path, "x") as f:
            json.dump(default_spec(rootless=args.rootless), f, indent=2)
        return 0
    if verb in ("create", "run"):
        from kata_agent.engine.spec import Spec

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
        if not args.detach:
            # From before the workload runs, so a signal sent as soon as it shows signs of
            # life reaches it instead of killing us.
            relay_signals(cstate.pid)
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
            from kata_agent.engine.state import STOPPED

            print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<30} {'CREATED':<32} OWNER")
            for s in states:
                pid = s.pid if s.status != STOPPED else 0
                print(f"{s.id:<20} {pid:<8} {s.status:<10} {s.bundle:<30} {s.created:<32} "
                      f"{s.owner or 'root'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in FORKING_VERBS for a in argv):
        # Container processes start as forks of this interpreter: run from a sealed copy.
        # Done before parsing or loading the engine, which the sealed process does anyway.
        # (Any argument spelled like such a verb counts; the check after parsing below
        # stays the one that decides.)
        from kata_agent.engine.sealed import reexec_sealed

        reexec_sealed(["-m", "kata_agent.oci_cli", *argv])
    args = build_parser(verb_of(argv)).parse_args(argv)
    if args.verb in FORKING_VERBS:
        from kata_agent.engine import syscalls as sc
        from kata_agent.engine.sealed import reexec_sealed

        reexec_sealed(["-m", "kata_agent.oci_cli", *argv])
        sc.Syscalls().prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    preserved = grab_preserved(getattr(args, "preserve_fds", 0) or 0)
    setup_logging(args)
    from kata_agent.engine.errors import EngineError

    try:
        return cmd(args, preserved)
    except EngineError as e:
        import logging

        logging.getLogger(__name__).debug("event=failed verb=%s error=%s", args.verb, e)
        print(f"kata-oci: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kata-oci: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
