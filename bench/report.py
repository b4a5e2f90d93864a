"""Benchmark results: figures, goals, peer ratios, and the results files.

Every bench script builds `Figure`s and calls `record()`, which merges them by name into
bench/results/latest.json. `make bench` first runs `report.py begin`, which moves the last
complete run to previous.json, and ends with `report.py show`, which prints every figure
with its goal, its ratios against peers measured in the same run, and its change against
the previous run. Nothing here asserts: a missed goal is printed, not raised.

    .venv/bin/python bench/report.py begin | show [--latest PATH] [--previous PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
PREVIOUS = RESULTS_DIR / "previous.json"

# Peers not measured here but recorded on this machine (shared BENCH-ANCHORS): their names
# carry "(anchor)" so a ratio against them is never mistaken for a same-run comparison.
GO_AGENT = "kata-1.x-go-agent (anchor)"


@dataclass(frozen=True, slots=True)
class Goal:
    """A promise: value `op` limit, with where the limit comes from."""

    op: str  # "<=" or ">="
    limit: float
    source: str

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"goal operator must be <= or >=, got {self.op!r}")

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def text(self) -> str:
        return f"{self.op} {self.limit:g}"


# The goals of the issue, by figure name (BENCH-ANCHORS; the Kata 1.x Go agent is the peer).
GOALS: dict[str, Goal] = {
    "agent.health_check_yamux_p50": Goal("<=", 0.25, "Go agent p50 through yamux"),
    "agent.create_start_wait_true_p50": Goal("<=", 12.0, "Go agent p50"),
    "agent.idle_rss": Goal("<=", 20.0, "issue goal"),
    "agent.rss_growth_100_containers": Goal("<=", 24.0, "issue goal"),
    "agent.start_to_first_health_check": Goal("<=", 150.0, "issue goal"),
    "agent.stdout_throughput": Goal(">=", 200.0, "issue goal"),
    "oci.kata_oci_run_delete_true": Goal("<=", 21.0, "runc 1.1.5 here (anchor)"),
}


@dataclass(slots=True)
class Figure:
    """One measured figure; `median` is None when the figure was skipped (`note` says why)."""

    name: str
    unit: str
    median: float | None
    p99: float | None = None
    samples: int = 0
    peers: dict[str, float | None] = field(default_factory=dict)
    peer_notes: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def skipped(cls, name: str, unit: str, reason: str) -> Figure:
        return cls(name=name, unit=unit, median=None, note=reason)

    @classmethod
    def from_samples(cls, name: str, unit: str, samples: Sequence[float], **kw: Any) -> Figure:
        median, p99 = summarize(samples)
        return cls(name=name, unit=unit, median=median, p99=p99, samples=len(samples), **kw)


def as_deployed() -> None:
    """Run what is measured as the guest runs it: from compiled bytecode. The image ships
    it precompiled; a shell with PYTHONDONTWRITEBYTECODE set would make every start of
    the agent or the CLI compile the package from source again."""
    import compileall

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    package = Path(__file__).resolve().parents[1] / "agent" / "kata_agent"
    compileall.compile_dir(str(package), quiet=1)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} out of range")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("median of no samples")
    ordered = sorted(samples)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def summarize(samples: Sequence[float]) -> tuple[float, float]:
    """(median, p99) of the samples."""
    return median(samples), percentile(samples, 99)


def ratio(ours: float | None, peer: float | None) -> float | None:
    """ours / peer, or None when either is missing or the peer is not positive."""
    if ours is None or peer is None or peer <= 0 or math.isnan(ours) or math.isnan(peer):
        return None
    return ours / peer


def change_percent(now: float | None, before: float | None) -> float | None:
    if now is None or before is None or before == 0:
        return None
    return (now - before) / abs(before) * 100.0


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def to_entry(fig: Figure, measured_at: str) -> dict[str, Any]:
    """The JSON form of a figure (one entry of latest.json)."""
    entry: dict[str, Any] = {"name": fig.name, "unit": fig.unit, "median": _round(fig.median)}
    if fig.p99 is not None:
        entry["p99"] = _round(fig.p99)
    if fig.samples:
        entry["samples"] = fig.samples
    ratios = {peer: _round(ratio(fig.median, value)) for peer, value in fig.peers.items()}
    if fig.peers:
        entry["peers"] = {peer: _round(value) for peer, value in fig.peers.items()}
        entry["peer_ratios"] = ratios
    if fig.peer_notes:
        entry["peer_notes"] = dict(fig.peer_notes)
    goal = GOALS.get(fig.name)
    if goal is not None:
        entry["goal"] = {"op": goal.op, "limit": goal.limit, "source": goal.source}
        entry["goal_met"] = None if fig.median is None else goal.met(fig.median)
    if fig.note:
        entry["note"] = fig.note
    entry["measured_at"] = measured_at
    return entry


def load(path: Path) -> dict[str, dict[str, Any]]:
    """Entries by name; a missing or unreadable file is an empty run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, list):
        return {}
    return {
        str(e["name"]): e for e in data if isinstance(e, dict) and isinstance(e.get("name"), str)
    }


def merge(
    existing: Mapping[str, dict[str, Any]], figures: Iterable[Figure], measured_at: str
) -> list[dict[str, Any]]:
    """Existing entries with the new figures replacing those of the same name, sorted."""
    entries = dict(existing)
    for fig in figures:
        entries[fig.name] = to_entry(fig, measured_at)
    return [entries[name] for name in sorted(entries)]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def record(figures: Iterable[Figure], latest: Path = LATEST) -> list[dict[str, Any]]:
    """Merge figures into latest.json (atomically); returns the merged entries."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged = merge(load(latest), figures, stamp)
    _write_json(latest, merged)
    return merged


def begin(latest: Path = LATEST, previous: Path = PREVIOUS) -> bool:
    """Start a run: the last run's latest.json becomes previous.json. True if one existed."""
    if not latest.exists():
        return False
    if load(latest):
        os.replace(latest, previous)
        return True
    latest.unlink()
    return False


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def _goal_cell(entry: Mapping[str, Any]) -> str:
    goal = entry.get("goal")
    if not isinstance(goal, dict):
        return ""
    met = entry.get("goal_met")
    verdict = "met" if met is True else "MISSED" if met is False else "n/a"
    return f"{goal['op']} {goal['limit']:g} {verdict}"


def _peers_cell(entry: Mapping[str, Any]) -> str:
    parts = []
    ratios = entry.get("peer_ratios") or {}
    notes = entry.get("peer_notes") or {}
    for peer, value in (entry.get("peers") or {}).items():
        r = ratios.get(peer)
        if value is None:
            parts.append(f"{peer}: unavailable ({notes.get(peer, 'not measured')})")
        elif r is None:
            parts.append(f"{peer} {_fmt(value)}")
        else:
            parts.append(f"{peer} {_fmt(value)} (x{r:.2f})")
    for peer, note in notes.items():
        if peer not in (entry.get("peers") or {}):
            parts.append(f"{peer}: {note}")
    return "; ".join(parts)


def format_table(
    latest: Mapping[str, Mapping[str, Any]], previous: Mapping[str, Mapping[str, Any]]
) -> str:
    """One line per figure: value, unit, p99, goal and verdict, change vs previous, peers."""
    header = ("figure", "median", "unit", "p99", "goal", "vs prev", "peers (ours/peer)")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for name in sorted(latest):
        e = latest[name]
        med = e.get("median")
        if med is None:
            rows.append((name, "skipped", str(e.get("unit", "")), "", _goal_cell(e), "", ""))
            notes.append(f"{name}: {e.get('note', 'no reason recorded')}")
            continue
        before = previous.get(name, {}).get("median")
        delta = change_percent(med, before)
        rows.append((
            name,
            _fmt(med),
            str(e.get("unit", "")),
            _fmt(e.get("p99")),
            _goal_cell(e),
            "new" if before is None else f"{delta:+.1f}%" if delta is not None else "-",
            _peers_cell(e),
        ))
        if e.get("note"):
            notes.append(f"{name}: {e['note']}")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1,)]
        cells += [r[i].ljust(widths[i]) for i in range(2, len(header) - 1)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    missed = [n for n, e in latest.items() if e.get("goal_met") is False]
    met = [n for n, e in latest.items() if e.get("goal_met") is True]
    lines.append("")
    lines.append(f"goals: {len(met)} met, {len(missed)} missed"
                 + (f" ({', '.join(sorted(missed))})" if missed else ""))
    if notes:
        lines.append("notes:")
        lines.extend(f"  {n}" for n in notes)
    return "\n".join(lines)


def print_figures(figures: Sequence[Figure], previous: Path = PREVIOUS) -> None:
    """Print just these figures (a single bench run on its own)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entries = {f.name: to_entry(f, stamp) for f in figures}
    sys.stdout.write(format_table(entries, load(previous)) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("action", choices=("begin", "show"))
    p.add_argument("--latest", type=Path, default=LATEST)
    p.add_argument("--previous", type=Path, default=PREVIOUS)
    args = p.parse_args(argv)
    if args.action == "begin":
        kept = begin(args.latest, args.previous)
        sys.stdout.write(f"previous run kept as {args.previous}\n" if kept
                         else "no previous run\n")
        return 0
    latest = load(args.latest)
    if not latest:
        sys.stderr.write(f"no results in {args.latest}\n")
        return 1
    sys.stdout.write(format_table(latest, load(args.previous)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
