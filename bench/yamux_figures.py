"""The yamux figures recorded in bench/results: codec frames/s and MB/s, and one stream
through two bridges over a socketpair and a pty (measured by yamux_bench.py's functions;
each codec figure is the best of 3 runs, as that module measures it).

    .venv/bin/python bench/yamux_figures.py [--mib 64] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yamux_bench
from report import Figure, print_figures, record

# hashicorp/yamux's own benchmarks (shared anchors): 585 MB/s with 4 KiB messages.
GO_YAMUX = "hashicorp/yamux Go (anchor)"
GO_4K_MBS = 585.0


def codec_figures() -> list[Figure]:
    figures = []
    for size, frames in ((64, 200_000), (4096, 200_000)):
        fps, mbs = yamux_bench.bench_encode(size, frames)
        figures.append(Figure(f"yamux.encode_{size}b_frames", "frames/s", fps))
        figures.append(Figure(f"yamux.encode_{size}b_throughput", "MB/s", mbs))
        fps, mbs = yamux_bench.bench_decode(size, frames, 256 * 1024)
        figures.append(Figure(f"yamux.decode_{size}b_frames", "frames/s", fps))
        figures.append(Figure(f"yamux.decode_{size}b_throughput", "MB/s", mbs))
    return figures


def stream_figures(mib: int, rounds: int) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("socketpair", "pty"):
            mbs = yamux_bench.bench_stream(tmp, mib, transport)
            # Go's figure is a session over an in-memory pipe: compare it with the socketpair.
            peers: dict[str, float | None] = (
                {GO_YAMUX: GO_4K_MBS} if transport == "socketpair" else {})
            figures.append(Figure(f"yamux.stream_{transport}_throughput", "MB/s", mbs,
                                  peers=peers,
                                  note=f"{mib} MiB, one stream through two bridges"))
        p50, p99 = yamux_bench.bench_round_trip(tmp, rounds, 64)
        figures.append(Figure("yamux.echo_round_trip_64b", "us", p50, p99=p99, samples=rounds,
                              note="64 B echo through two bridges over a socketpair"))
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args()
    figures = codec_figures() + stream_figures(args.mib, args.rounds)
    record(figures)
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
