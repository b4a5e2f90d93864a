"""Agent benchmarks: start-up, memory, unary RPC latency per channel, container lifecycle.

Each figure is merged into bench/results/latest.json (see report.py) and printed with its
goal and its ratio to peers measured in the same run: plain gRPC on a unix socket for the
yamux channel, and a bare grpcio server (one Health handler, nothing else) for start-up,
memory and latency. The Kata 1.x Go agent's figures come from the shared anchors.

The container figures drive the agent the way the Kata runtime does: CreateSandbox, then per
container a busybox rootfs under the shared containers directory and CreateContainer /
StartContainer / WaitProcess / RemoveContainer. They are skipped, with the reason, when the
agent answers UNIMPLEMENTED or when not run as root.

    .venv/bin/python bench/agent_bench.py [--calls 300] [--starts 5] [--containers 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from kata_agent.bridge import YamuxBridge
from kata_agent.host.client import AgentClient
from kata_agent.protocol import agent_pb2, health_pb2, health_pb2_grpc, oci_pb2
from report import GO_AGENT, Figure, as_deployed, print_figures, record

BARE = "bare-grpcio (same run)"
PLAIN = "plain unix gRPC (same run)"
SHARED_DIR = Path("/run/kata-containers/shared/containers")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
STDOUT_BYTES = 1 << 30
READ_LEN = 1 << 20  # the agent's largest ReadStdout len


class Skip(Exception):
    """A group of figures cannot be measured here; the message says why."""


# -- processes under test ------------------------------------------------------------------


# The agent changes its own hostname, /etc and /run the way it would in a guest: for the
# container figures it runs in private mount, UTS, IPC and network namespaces with /etc
# overlaid and the shared containers directory bound from the bench's temporary directory.
ISOLATE = """set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/etc-upper,workdir={tmp}/etc-work /etc
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p {shared}
mount --bind {tmp}/shared {shared}
exec "$@"
"""


def start_agent(channel: str, workdir: Path, *, isolated: bool = False
                ) -> tuple[subprocess.Popen[bytes], float]:
    cmdline = workdir / "cmdline"
    cmdline.write_text("agent.log=info\n")
    argv = [sys.executable, "-m", "kata_agent", "--channel", channel, "--cmdline", str(cmdline),
            "--runtime-dir", str(workdir / "run")]
    if os.geteuid() == 0:
        # As the guest's unit runs it; the agent puts the host's setting back when it stops.
        argv.append("--cgroup-favordynmods")
    if isolated:
        for d in ("etc-upper", "etc-work", "shared"):
            (workdir / d).mkdir(exist_ok=True)
        (workdir / "isolate.sh").write_text(ISOLATE.format(tmp=workdir, shared=SHARED_DIR))
        argv = ["unshare", "--mount", "--uts", "--ipc", "--net", "--propagation", "private",
                "sh", str(workdir / "isolate.sh"), *argv]
    log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - owned by the child
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return proc, started


def start_bare_server(path: Path, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(path)],
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, started


def bare_server(path: str) -> int:
    """The peer: a grpcio server with only a Health handler, 4 workers, on a unix socket."""
    from concurrent import futures

    class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        def Check(self, request: Any, context: Any) -> Any:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_mib(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024.0


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(cond: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not within {deadline:.0f}s")
        time.sleep(0.001)


def first_answer(check: Callable[[], object], deadline: float = 30.0) -> float:
    end = time.monotonic() + deadline
    while True:
        try:
            check()
            return time.monotonic()
        except grpc.RpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.001)


def dial(path: Path, deadline: float = 30.0) -> AgentClient:
    """An AgentClient on a unix-serial socket, retried while the agent is not listening."""
    wait_for(path.exists, "agent socket", deadline)
    end = time.monotonic() + deadline
    while True:
        try:
            return AgentClient(f"unix-serial:{path}")
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.001)


def latency(check: Callable[[], object], calls: int) -> list[float]:
    for _ in range(20):
        check()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        check()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def health_check(stub: Any) -> Callable[[], object]:
    def check() -> object:
        return stub.Check(health_pb2.CheckRequest(), timeout=10)

    return check


def settle_rss(pid: int) -> float:
    """RSS once the process is idle: a short pause lets start-up threads finish."""
    time.sleep(0.5)
    return rss_mib(pid)


# -- start-up, memory, latency ---------------------------------------------------------------


def bench_startup(starts: int) -> list[float]:
    """Process start to first Health.Check answered through yamux, `starts` times (ms)."""
    times = []
    for _ in range(starts):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "serial.sock"
            proc, started = start_agent(f"unix-serial:{path}", Path(tmp))
            try:
                with dial(path) as client:
                    ready = first_answer(health_check(client.health))
                times.append((ready - started) * 1000.0)
            finally:
                stop(proc)
    return times


def bench_bare(calls: int, starts: int) -> dict[str, Any]:
    out: dict[str, Any] = {"start": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(starts):
            path = Path(tmp) / f"bare{i}.sock"
            proc, started = start_bare_server(path, Path(tmp) / "bare.log")
            try:
                wait_for(path.exists, "bare server socket")
                with grpc.insecure_channel(f"unix:{path}") as channel:
                    check = health_check(health_pb2_grpc.HealthStub(channel))
                    out["start"].append((first_answer(check) - started) * 1000.0)
                    if i == 0:
                        out["rss"] = settle_rss(proc.pid)
                        out["threads"] = threads(proc.pid)
                        out["latency"] = latency(check, calls)
            finally:
                stop(proc)
    return out


def bench_plain_unix(calls: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.sock"
        proc, _ = start_agent(f"unix:{path}", Path(tmp))
        try:
            wait_for(path.exists, "agent socket")
            with grpc.insecure_channel(f"unix:{path}") as channel:
                check = health_check(health_pb2_grpc.HealthStub(channel))
                first_answer(check)
                return latency(check, calls)
        finally:
            stop(proc)


def bench_pty_serial(calls: int) -> list[float]:
    master, slave = os.openpty()
    tty.setraw(master)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, _ = start_agent(f"serial:{os.ttyname(slave)}", work)
        os.close(slave)
        wait_for(lambda: b"agent ready" in (work / "agent.log").read_bytes(), "agent ready")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(work / "l.sock"))
        listener.listen(4)
        os.set_blocking(master, False)
        bridge = YamuxBridge(master, "client", ping_interval=1.0)
        bridge.add_listener(listener)
        runner = threading.Thread(target=bridge.run, daemon=True)
        runner.start()
        try:
            with grpc.insecure_channel(f"unix:{work / 'l.sock'}") as channel:
                check = health_check(health_pb2_grpc.HealthStub(channel))
                first_answer(check)
                return latency(check, calls)
        finally:
            bridge.close()
            runner.join(timeout=5)
            listener.close()
            stop(proc)
            os.close(master)


# -- container lifecycle through the protocol ------------------------------------------------


def oci_spec(cid: str, args: list[str]) -> Any:
    """The spec as the Kata runtime sends it: rootfs under the shared containers directory,
    mount, pid, uts and ipc namespaces (the sandbox's network), /proc mounted."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return oci_pb2.Spec(
        Version="1.0.1",
        Process=oci_pb2.Process(
            Args=args, Env=["PATH=/bin:/usr/bin:/sbin:/usr/sbin"], Cwd="/",
            User=oci_pb2.User(UID=0, GID=0),
            Capabilities=oci_pb2.LinuxCapabilities(Bounding=caps, Effective=caps,
                                                   Permitted=caps),
            NoNewPrivileges=True,
        ),
        Root=oci_pb2.Root(Path=str(SHARED_DIR / cid / "rootfs"), Readonly=False),
        Hostname="bench",
        Mounts=[oci_pb2.Mount(destination="/proc", source="proc", type="proc",
                              options=["nosuid", "noexec", "nodev"]),
                oci_pb2.Mount(destination="/dev", source="tmpfs", type="tmpfs",
                              options=["nosuid", "strictatime", "mode=755", "size=65536k"])],
        Linux=oci_pb2.Linux(
            Namespaces=[oci_pb2.LinuxNamespace(Type=t) for t in ("mount", "pid", "uts", "ipc")],
            MaskedPaths=["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            ReadonlyPaths=["/proc/sys", "/proc/sysrq-trigger"],
        ),
    )


def make_rootfs(shared: Path, cid: str, busybox: Path) -> None:
    """What the host would have shared: a busybox rootfs (hard links to one copy)."""
    rootfs = shared / cid / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    os.link(busybox, rootfs / "bin" / "busybox")
    for applet in ("true", "sh", "dd", "sleep", "cat", "yes", "head"):
        os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (rootfs / d).mkdir(exist_ok=True)


def unimplemented(err: grpc.RpcError, method: str) -> Skip | None:
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
        return Skip(f"agent does not implement {method} yet")
    return None


def call(stub_method: Callable[..., Any], method: str, request: Any, timeout: float = 60) -> Any:
    try:
        return stub_method(request, timeout=timeout)
    except grpc.RpcError as err:
        skip = unimplemented(err, method)
        if skip is not None:
            raise skip from None
        raise


class Lifecycle:
    """One agent and the containers the bench made in it."""

    def __init__(self, client: AgentClient, shared: Path, busybox: Path) -> None:
        self.agent = client.agent
        self.shared = shared  # the host side of the agent's shared containers directory
        self.busybox = busybox
        self.n = 0
        self.lock = threading.Lock()

    def new(self) -> str:
        with self.lock:
            self.n += 1
            cid = f"bench{os.getpid()}c{self.n}"
        make_rootfs(self.shared, cid, self.busybox)
        return cid

    def create(self, cid: str, args: list[str]) -> None:
        call(self.agent.CreateContainer, "CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=cid, exec_id=cid, OCI=oci_spec(cid, args)))

    def start(self, cid: str) -> None:
        call(self.agent.StartContainer, "StartContainer",
             agent_pb2.StartContainerRequest(container_id=cid))

    def wait(self, cid: str, exec_id: str) -> int:
        resp = call(self.agent.WaitProcess, "WaitProcess",
                    agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id), 300)
        return int(resp.status)

    def remove(self, cid: str) -> None:
        try:
            call(self.agent.RemoveContainer, "RemoveContainer",
                 agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10))
        finally:
            shutil.rmtree(self.shared / cid, ignore_errors=True)

    def run_true(self) -> float:
        """CreateContainer + StartContainer + WaitProcess of /bin/true (ms); then removed."""
        cid = self.new()
        try:
            t0 = time.perf_counter()
            self.create(cid, ["/bin/true"])
            self.start(cid)
            status = self.wait(cid, cid)
            elapsed = (time.perf_counter() - t0) * 1000.0
        except BaseException:
            # Clean up what exists, but report the failure that happened first.
            with contextlib.suppress(grpc.RpcError, Skip):
                self.remove(cid)
            raise
        self.remove(cid)
        if status != 0:
            raise RuntimeError(f"/bin/true exited with status {status}")
        return elapsed

    @contextlib.contextmanager
    def running(self, args: list[str]) -> Iterator[str]:
        """A started container, killed and removed on exit."""
        cid = self.new()
        try:
            self.create(cid, args)
            self.start(cid)
            yield cid
        finally:
            with contextlib.suppress(grpc.RpcError, Skip):
                call(self.agent.SignalProcess, "SignalProcess", agent_pb2.SignalProcessRequest(
                    container_id=cid, exec_id=cid, signal=signal.SIGKILL))
                self.wait(cid, cid)
            self.remove(cid)

    def exec_true(self, cid: str, i: int) -> float:
        """ExecProcess + WaitProcess of /bin/true in a running container (ms)."""
        exec_id = f"x{i}"
        process = oci_pb2.Process(Args=["/bin/true"], Env=["PATH=/bin"], Cwd="/",
                                  User=oci_pb2.User(UID=0, GID=0))
        t0 = time.perf_counter()
        call(self.agent.ExecProcess, "ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, process=process))
        status = self.wait(cid, exec_id)
        elapsed = (time.perf_counter() - t0) * 1000.0
        if status != 0:
            raise RuntimeError(f"exec /bin/true exited with status {status}")
        return elapsed

    def stdout_throughput(self, total: int) -> float:
        """MB/s of a process writing `total` bytes, read through ReadStdout until EOF."""
        args = ["/bin/dd", "if=/dev/zero", "bs=65536", f"count={total // 65536}"]
        cid = self.new()
        got = 0
        try:
            self.create(cid, args)
            t0 = time.perf_counter()
            self.start(cid)
            req = agent_pb2.ReadStreamRequest(container_id=cid, exec_id=cid, len=READ_LEN)
            while True:
                try:
                    data = self.agent.ReadStdout(req, timeout=60).data
                except grpc.RpcError as err:
                    skip = unimplemented(err, "ReadStdout")
                    if skip is not None:
                        raise skip from None
                    if err.code() != grpc.StatusCode.OUT_OF_RANGE:
                        raise
                    break  # end of stream
                got += len(data)
            elapsed = time.perf_counter() - t0
            status = self.wait(cid, cid)
        finally:
            self.remove(cid)
        if got != total or status != 0:
            raise RuntimeError(f"read {got} bytes of {total}, writer exited {status}")
        return total / elapsed / 1e6


LIFECYCLE_FIGURES = [
    ("agent.create_start_wait_true_p50", "ms"), ("agent.rss_growth_100_containers", "MiB"),
    ("agent.exec_true_p50", "ms"), ("agent.stdout_throughput", "MB/s"),
    ("agent.start_100_concurrent", "ms"),
]


def lifecycle_figures(containers: int, execs: int) -> list[Figure]:
    try:
        return _lifecycle(containers, execs)
    except Skip as why:
        return [Figure.skipped(n, u, str(why)) for n, u in LIFECYCLE_FIGURES]


@contextlib.contextmanager
def agent_session(isolated: bool = False
                  ) -> Iterator[tuple[subprocess.Popen[bytes], AgentClient, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serial.sock"
        proc, _ = start_agent(f"unix-serial:{path}", Path(tmp), isolated=isolated)
        try:
            with dial(path) as client:
                first_answer(health_check(client.health))
                yield proc, client, Path(tmp)
        finally:
            stop(proc)


def failed(name: str, unit: str, err: BaseException) -> Figure:
    text = err.details() if isinstance(err, grpc.RpcError) else str(err)
    return Figure.skipped(name, unit, f"failed: {type(err).__name__}: {text}"[:300])


def _lifecycle(containers: int, execs: int) -> list[Figure]:
    if os.geteuid() != 0:
        raise Skip("needs root (namespaces, cgroups, mounts)")
    if not os.path.exists(BUSYBOX) or shutil.which("unshare") is None:
        raise Skip("busybox-static or unshare is not installed")
    figures: list[Figure] = []
    with agent_session(isolated=True) as (proc, client, work):
        shared = work / "shared"
        busybox = shared / ".busybox"
        shutil.copy2(BUSYBOX, busybox)
        life = Lifecycle(client, shared, busybox)
        call(client.agent.CreateSandbox, "CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname="bench", sandbox_id=f"bench{os.getpid()}"))
        idle = settle_rss(proc.pid)
        try:
            runs = [life.run_true() for _ in range(containers)]
            grown = settle_rss(proc.pid) - idle
            figures.append(Figure.from_samples(
                "agent.create_start_wait_true_p50", "ms", runs, peers={GO_AGENT: 12.2}))
            figures.append(Figure("agent.rss_growth_100_containers", "MiB", grown,
                                  peers={GO_AGENT: 20.1 - 13.1},
                                  note=f"after {containers} sequential containers"))
        except (grpc.RpcError, RuntimeError) as err:
            figures += [failed(n, u, err) for n, u in LIFECYCLE_FIGURES[:2]]
        try:
            with life.running(["/bin/sleep", "1000"]) as sleeper:
                samples = [life.exec_true(sleeper, i) for i in range(execs)]
            figures.append(Figure.from_samples("agent.exec_true_p50", "ms", samples))
        except (grpc.RpcError, RuntimeError) as err:
            figures.append(failed("agent.exec_true_p50", "ms", err))
        try:
            figures.append(Figure("agent.stdout_throughput", "MB/s",
                                  life.stdout_throughput(STDOUT_BYTES),
                                  note=f"1 GiB through ReadStdout, len={READ_LEN}"))
        except (grpc.RpcError, RuntimeError) as err:
            figures.append(failed("agent.stdout_throughput", "MB/s", err))
        try:
            figures.append(concurrent_start(life, containers))
        except (grpc.RpcError, RuntimeError) as err:
            figures.append(failed("agent.start_100_concurrent", "ms", err))
    return figures


def concurrent_start(life: Lifecycle, count: int) -> Figure:
    """Wall time to run `count` /bin/true containers at once, one host thread each."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        per = list(pool.map(lambda _: life.run_true(), range(count)))
    wall = (time.perf_counter() - t0) * 1000.0
    per.sort()
    return Figure("agent.start_100_concurrent", "ms", wall, samples=count,
                  note=f"{count} containers at once; per-container median "
                       f"{per[len(per) // 2]:.1f} ms")


# -- main ------------------------------------------------------------------------------------


def transport_figures(calls: int, starts: int) -> list[Figure]:
    bare = bench_bare(calls, starts)
    plain = bench_plain_unix(calls)
    plain_fig = Figure.from_samples("agent.health_check_plain_p50", "ms", plain,
                                    peers={BARE: Figure.from_samples("", "", bare["latency"])
                                           .median})
    figures = [plain_fig]
    with agent_session() as (proc, client, _):
        idle = settle_rss(proc.pid)
        nthreads = threads(proc.pid)
        helpers = children(proc.pid)
        # The agent and its helper processes (the zygote) together, shared pages counted once.
        pss = pss_mib(proc.pid) + sum(pss_mib(k) for k in helpers)
        yamux = latency(health_check(client.health), calls)
    figures.append(Figure.from_samples(
        "agent.health_check_yamux_p50", "ms", yamux,
        peers={PLAIN: plain_fig.median, GO_AGENT: 0.25}))
    figures.append(Figure("agent.idle_rss", "MiB", idle,
                          peers={BARE: bare["rss"], GO_AGENT: 13.1},
                          note=f"{nthreads} threads (bare grpcio server: {bare['threads']})"))
    figures.append(Figure("agent.idle_pss_with_helpers", "MiB", pss,
                          peers={GO_AGENT: 13.1},
                          note=f"PSS of the agent and {len(helpers)} helper process(es)"))
    figures.append(Figure.from_samples("agent.start_to_first_health_check", "ms",
                                       bench_startup(starts),
                                       peers={BARE: Figure.from_samples("", "", bare["start"])
                                              .median}))
    figures.append(Figure.from_samples("agent.health_check_pty_p50", "ms",
                                       bench_pty_serial(calls),
                                       note="yamux over a pty, the way a serial port carries it"))
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--containers", type=int, default=100)
    p.add_argument("--execs", type=int, default=50)
    p.add_argument("--skip-lifecycle", action="store_true")
    p.add_argument("--bare-server", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args()
    as_deployed()
    if args.bare_server:
        return bare_server(args.bare_server)
    figures = transport_figures(args.calls, args.starts)
    if not args.skip_lifecycle:
        figures += lifecycle_figures(args.containers, args.execs)
    record(figures)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
