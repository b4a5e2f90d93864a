"""Agent benchmarks: start-up, idle memory, and unary RPC latency per channel.

Prints a table and merges its figures into bench/results/latest.json. No assertions: the
figures are compared with the anchors in the shared bench notes and with earlier runs.

    .venv/bin/python bench/agent_bench.py [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import grpc
from kata_agent.bridge import YamuxBridge
from kata_agent.host.client import AgentClient
from kata_agent.protocol import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
# The Kata 1.x Go agent measured on this machine (shared BENCH-ANCHORS).
GO_AGENT = {"health_check_yamux_p50_ms": 0.25, "idle_rss_mib": 13.1}


def start_agent(channel: str, workdir: Path) -> tuple[subprocess.Popen[bytes], float]:
    cmdline = workdir / "cmdline"
    cmdline.write_text("agent.log=info\n")
    log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - owned by the child
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kata_agent",
            "--channel",
            channel,
            "--cmdline",
            str(cmdline),
            "--runtime-dir",
            str(workdir / "run"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def latency(check: Callable[[], object], calls: int) -> tuple[float, float]:
    for _ in range(20):
        check()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        check()
        samples.append((time.perf_counter() - t0) * 1000.0)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def bench_unix_serial(calls: int, out: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "serial.sock"
        proc, started = start_agent(f"unix-serial:{path}", work)
        try:
            while not path.exists():
                time.sleep(0.001)
            with AgentClient(f"unix-serial:{path}") as client:

                def check() -> object:
                    return client.health.Check(health_pb2.CheckRequest(), timeout=10)

                ready = first_answer(check)
                out["start_to_first_check_ms"] = (ready - started) * 1000.0
                time.sleep(0.5)
                out["idle_rss_mib"] = rss_mib(proc.pid)
                p50, p99 = latency(check, calls)
                out["health_check_yamux_p50_ms"], out["health_check_yamux_p99_ms"] = p50, p99
        finally:
            stop(proc)


def bench_plain_unix(calls: int, out: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "plain.sock"
        proc, _ = start_agent(f"unix:{path}", work)
        try:
            with grpc.insecure_channel(f"unix:{path}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                def check() -> object:
                    return stub.Check(health_pb2.CheckRequest(), timeout=10)

                first_answer(check)
                p50, p99 = latency(check, calls)
                out["health_check_plain_p50_ms"], out["health_check_plain_p99_ms"] = p50, p99
        finally:
            stop(proc)


def bench_pty_serial(calls: int, out: dict[str, float]) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, _ = start_agent(f"serial:{os.ttyname(slave)}", work)
        os.close(slave)
        while b"agent ready" not in (work / "agent.log").read_bytes():
            time.sleep(0.001)
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
                stub = health_pb2_grpc.HealthStub(channel)

                def check() -> object:
                    return stub.Check(health_pb2.CheckRequest(), timeout=10)

                first_answer(check)
                p50, p99 = latency(check, calls)
                out["health_check_pty_p50_ms"], out["health_check_pty_p99_ms"] = p50, p99
        finally:
            bridge.close()
            runner.join(timeout=5)
            listener.close()
            stop(proc)
            os.close(master)


def save(figures: dict[str, float]) -> None:
    units = {"ms": "ms", "mib": "MiB"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = {e["name"]: e for e in json.loads(RESULTS.read_text())}
    except (OSError, ValueError):
        entries = {}
    for name, value in figures.items():
        entry: dict[str, object] = {
            "name": name,
            "unit": units[name.rsplit("_", 1)[1]],
            "median": round(value, 4),
        }
        if name in GO_AGENT:
            entry["peer_ratios"] = {"kata-1.x-go-agent": round(value / GO_AGENT[name], 3)}
        entries[name] = entry
    RESULTS.write_text(json.dumps(sorted(entries.values(), key=lambda e: str(e["name"])), indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    figures: dict[str, float] = {}
    bench_unix_serial(args.calls, figures)
    bench_plain_unix(args.calls, figures)
    bench_pty_serial(args.calls, figures)
    print(f"{'figure':34} {'value':>10}  vs Go 1.x agent")
    for name, value in figures.items():
        ratio = f"x{value / GO_AGENT[name]:.2f}" if name in GO_AGENT else ""
        print(f"{name:34} {value:10.3f}  {ratio}")
    save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
