"""The engine's command line against runc and crun on one busybox `/bin/true` bundle.

Each round runs `<runtime> run` and then `delete --force` (runc's own cleanup spelling) for
every runtime in turn, so load from other work on the machine falls on all of them alike.
A runtime that is missing or refuses the bundle on its first run is reported unavailable
with the reason it gave. Needs root (namespaces, cgroups).

    .venv/bin/python bench/oci_bench.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kata_agent.engine.spec import default_spec
from report import Figure, as_deployed, print_figures, record

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


@dataclass(frozen=True, slots=True)
class Runtime:
    name: str
    argv: tuple[str, ...]  # the command up to (not including) the verb


def kata_oci_argv() -> tuple[str, ...]:
    script = Path(sys.executable).parent / "kata-oci"
    if script.exists():
        return (str(script),)
    return (sys.executable, "-m", "kata_agent.oci_cli")


def make_bundle(base: Path) -> Path:
    """A busybox rootfs and the engine's default spec running /bin/true."""
    rootfs = base / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("true", "sh"):
        os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (rootfs / d).mkdir()
    spec = default_spec()
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/true"]
    spec["hostname"] = "bench"
    (base / "config.json").write_text(json.dumps(spec))
    return base


def run_once(rt: Runtime, state: Path, bundle: Path, cid: str) -> tuple[float, str | None]:
    """Wall time of run + delete --force in ms, and an error text when `run` failed."""
    base = [*rt.argv, "--root", str(state)]
    t0 = time.perf_counter()
    run = subprocess.run([*base, "run", "--bundle", str(bundle), cid],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    subprocess.run([*base, "delete", "--force", cid], stdin=subprocess.DEVNULL,
                   capture_output=True, text=True, timeout=60)
    elapsed = (time.perf_counter() - t0) * 1000.0
    if run.returncode != 0:
        reason = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        return elapsed, reason[:200]
    return elapsed, None


def bench(runs: int) -> list[Figure]:
    name = "oci.kata_oci_run_delete_true"
    if os.geteuid() != 0:
        return [Figure.skipped(name, "ms", "needs root (namespaces, cgroups)")]
    if not os.path.exists(BUSYBOX):
        return [Figure.skipped(name, "ms", "busybox-static is not installed")]
    runtimes = [Runtime("kata-oci", kata_oci_argv())]
    unavailable: dict[str, str] = {}
    for peer in ("runc", "crun"):
        path = shutil.which(peer)
        if path is None:
            unavailable[peer] = "not installed"
        else:
            runtimes.append(Runtime(peer, (path,)))
    samples: dict[str, list[float]] = {rt.name: [] for rt in runtimes}
    with tempfile.TemporaryDirectory(prefix="oci-bench-") as tmp:
        base = Path(tmp)
        bundle = make_bundle(base / "bundle")
        for rt in list(runtimes):
            # The first run is a warm-up and the availability probe.
            _, err = run_once(rt, base / f"state-{rt.name}", bundle, f"warm-{rt.name}")
            if err is not None:
                unavailable[rt.name] = err
                runtimes.remove(rt)
        for i in range(runs):
            for rt in runtimes:
                ms, err = run_once(rt, base / f"state-{rt.name}", bundle, f"b{i}-{rt.name}")
                if err is None:
                    samples[rt.name].append(ms)
    figures: list[Figure] = []
    if "kata-oci" in unavailable:
        figures.append(Figure.skipped(name, "ms", f"kata-oci failed: {unavailable['kata-oci']}"))
    else:
        peers: dict[str, float | None] = {}
        notes: dict[str, str] = {}
        for peer in ("runc", "crun"):
            if peer in unavailable:
                peers[peer] = None
                notes[peer] = unavailable[peer]
            elif samples[peer]:
                peers[peer] = Figure.from_samples(peer, "ms", samples[peer]).median
        figures.append(Figure.from_samples(name, "ms", samples["kata-oci"], peers=peers,
                                           peer_notes=notes))
    for peer in ("runc", "crun"):
        fname = f"oci.{peer}_run_delete_true"
        if peer in unavailable:
            reason = f"{peer}: unavailable ({unavailable[peer]})"
            figures.append(Figure.skipped(fname, "ms", reason))
        elif samples[peer]:
            figures.append(Figure.from_samples(fname, "ms", samples[peer]))
    figures.append(interpreter_floor(runs))
    return figures


def interpreter_floor(runs: int) -> Figure:
    """What any Python command line pays before its first line: the interpreter start."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.perf_counter() - t0) * 1000.0)
    return Figure.from_samples("oci.python_interpreter_start", "ms", times,
                               note="floor for kata-oci: `python -c pass`")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    as_deployed()
    figures = bench(args.runs)
    record(figures)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
