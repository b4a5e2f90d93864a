"""A small service manager for the restart tests: what systemd does for kata-agent.service
with ``Type=notify``, ``Restart=on-failure``, ``KillMode=process`` and
``FileDescriptorStoreMax=``.

``python fdstore_supervisor.py NOTIFY_SOCKET AGENT_ARGV...`` runs the agent with
$NOTIFY_SOCKET; keeps the fds it sends with FDSTORE=1 (dropping them on FDSTOREREMOVE=1);
when the agent dies of a signal or a failure status, starts it again with the stored fds
numbered from 3 and LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set. SIGTERM is passed on to the
agent; the supervisor exits with the agent's status once it stops on purpose. Its own
lines on stdout start with ``supervisor:``.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

HIGH_FD = 1000  # stored fds are moved above this before being numbered from 3


def say(text: str) -> None:
    os.write(1, f"supervisor: {text}\n".encode())


def spawn(argv: list[str], notify: str, store: list[tuple[str, int]]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["NOTIFY_SOCKET"] = notify
    if store:
        env["LISTEN_FDS"] = str(len(store))
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in store)
    pid = os.fork()
    if pid == 0:  # the supervisor is single-threaded: fork and exec only
        try:
            moved = [os.dup2(fd, HIGH_FD + i, inheritable=False) for i, (_, fd) in
                     enumerate(store)]
            for i, fd in enumerate(moved):
                os.dup2(fd, 3 + i, inheritable=True)
            if store:
                env["LISTEN_PID"] = str(os.getpid())
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    say(f"agent started pid={pid} fds={len(store)}")
    return pid


def receive(sock: socket.socket, store: list[tuple[str, int]]) -> None:
    msg, fds, _, _ = socket.recv_fds(sock, 4096, 64)
    fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
    name = fields.get("FDNAME", "stored")
    if fields.get("FDSTORE") == "1":
        for fd in fds:
            os.set_inheritable(fd, False)
            store.append((name, fd))
        return
    for fd in fds:
        os.close(fd)
    if fields.get("FDSTOREREMOVE") == "1":
        for entry in [e for e in store if e[0] == name]:
            store.remove(entry)
            os.close(entry[1])
    if fields.get("READY") == "1":
        say(f"agent ready fds_stored={len(store)}")


def main(argv: list[str]) -> int:
    notify, agent_argv = argv[0], argv[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(notify)
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        os.kill(pid, signal.SIGTERM)

    store: list[tuple[str, int]] = []
    pid = spawn(agent_argv, notify, store)
    signal.signal(signal.SIGTERM, on_term)
    while True:
        try:
            if select.select([sock], [], [], 0.05)[0]:
                receive(sock, store)
        except InterruptedError:
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            continue
        while select.select([sock], [], [], 0)[0]:
            receive(sock, store)  # what the agent sent before it died counts
        code = os.waitstatus_to_exitcode(status)
        say(f"agent exited pid={pid} status={code}")
        if stopping or code == 0:
            return code if code >= 0 else 128 - code
        pid = spawn(agent_argv, notify, store)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
