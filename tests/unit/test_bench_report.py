"""The bench harness's own logic: statistics, ratios, goals, results files and the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import report
from report import Figure, Goal


def test_median_odd_even_and_unsorted() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        report.median([])


def test_percentile_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]  # 1..100
    assert report.percentile(samples, 99) == 99.0
    assert report.percentile(samples, 50) == 50.0
    assert report.percentile(samples, 100) == 100.0
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([5.0, 1.0], 0) == 1.0
    with pytest.raises(ValueError):
        report.percentile(samples, 101)
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_summarize_and_from_samples() -> None:
    fig = Figure.from_samples("x", "ms", [1.0, 2.0, 3.0, 100.0])
    assert fig.median == 2.5
    assert fig.p99 == 100.0
    assert fig.samples == 4


def test_ratio_and_change() -> None:
    assert report.ratio(2.0, 0.5) == 4.0
    assert report.ratio(None, 1.0) is None
    assert report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(float("nan"), 1.0) is None
    assert report.change_percent(110.0, 100.0) == pytest.approx(10.0)
    assert report.change_percent(90.0, 100.0) == pytest.approx(-10.0)
    assert report.change_percent(1.0, 0.0) is None
    assert report.change_percent(None, 1.0) is None


def test_goal_directions() -> None:
    at_most = Goal("<=", 12.0, "x")
    assert at_most.met(12.0) and at_most.met(3.0) and not at_most.met(12.01)
    at_least = Goal(">=", 200.0, "x")
    assert at_least.met(250.0) and not at_least.met(199.0)
    with pytest.raises(ValueError):
        Goal("<", 1.0, "x")


def test_every_issue_goal_is_declared() -> None:
    want = {
        "agent.health_check_yamux_p50": ("<=", 0.25),
        "agent.create_start_wait_true_p50": ("<=", 12.0),
        "agent.idle_rss": ("<=", 20.0),
        "agent.rss_growth_100_containers": ("<=", 24.0),
        "agent.start_to_first_health_check": ("<=", 150.0),
        "agent.stdout_throughput": (">=", 200.0),
        "oci.kata_oci_run_delete_true": ("<=", 21.0),
    }
    got = {name: (g.op, g.limit) for name, g in report.GOALS.items()}
    assert got == want


def test_entry_has_ratios_goal_and_verdict() -> None:
    fig = Figure("agent.health_check_yamux_p50", "ms", 0.5, p99=1.0, samples=300,
                 peers={"plain": 0.25, "gone": None}, peer_notes={"gone": "refused"})
    e = report.to_entry(fig, "T")
    assert e["name"] == "agent.health_check_yamux_p50"
    assert e["unit"] == "ms" and e["median"] == 0.5 and e["p99"] == 1.0
    assert e["peer_ratios"] == {"plain": 2.0, "gone": None}
    assert e["peers"] == {"plain": 0.25, "gone": None}
    assert e["goal"]["limit"] == 0.25 and e["goal_met"] is False
    assert e["measured_at"] == "T"
    met = report.to_entry(Figure("agent.stdout_throughput", "MB/s", 300.0), "T")
    assert met["goal_met"] is True


def test_skipped_entry_keeps_reason_and_no_verdict() -> None:
    e = report.to_entry(Figure.skipped("agent.idle_rss", "MiB", "needs root"), "T")
    assert e["median"] is None
    assert e["note"] == "needs root"
    assert e["goal_met"] is None
    assert "peer_ratios" not in e


def test_merge_replaces_by_name_and_keeps_others() -> None:
    old = {"a": {"name": "a", "median": 1.0}, "b": {"name": "b", "median": 2.0}}
    merged = report.merge(old, [Figure("b", "ms", 5.0), Figure("c", "ms", 6.0)], "T")
    assert [e["name"] for e in merged] == ["a", "b", "c"]
    assert merged[0] == {"name": "a", "median": 1.0}
    assert merged[1]["median"] == 5.0


def test_load_tolerates_missing_and_malformed(tmp_path: Path) -> None:
    assert report.load(tmp_path / "nope.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert report.load(bad) == {}
    bad.write_text('{"name": "x"}')
    assert report.load(bad) == {}
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"name": "ok", "median": 1}, {"median": 2}, "junk"]))
    assert list(report.load(mixed)) == ["ok"]


def test_record_merges_across_benches(tmp_path: Path) -> None:
    latest = tmp_path / "results" / "latest.json"
    report.record([Figure("yamux.x", "MB/s", 10.0)], latest)
    report.record([Figure("agent.y", "ms", 1.0)], latest)
    data = json.loads(latest.read_text())
    assert [e["name"] for e in data] == ["agent.y", "yamux.x"]
    assert not [p for p in latest.parent.iterdir() if p.name.startswith(".")]


def test_begin_keeps_last_run_as_previous(tmp_path: Path) -> None:
    latest, previous = tmp_path / "latest.json", tmp_path / "previous.json"
    assert report.begin(latest, previous) is False
    report.record([Figure("a", "ms", 1.0)], latest)
    assert report.begin(latest, previous) is True
    assert not latest.exists()
    assert list(report.load(previous)) == ["a"]
    # An empty latest (a run that recorded nothing) does not wipe the kept previous run.
    latest.write_text("[]")
    assert report.begin(latest, previous) is False
    assert list(report.load(previous)) == ["a"]


def test_table_shows_goal_change_peers_and_skips() -> None:
    latest = {
        "agent.idle_rss": report.to_entry(
            Figure("agent.idle_rss", "MiB", 40.0, peers={"bare": 20.0}), "T"),
        "oci.crun": report.to_entry(
            Figure("oci.kata_oci_run_delete_true", "ms", 30.0,
                   peers={"runc": 15.0, "crun": None}, peer_notes={"crun": "hybrid cgroups"}),
            "T"),
        "image.boot": report.to_entry(Figure.skipped("image.boot", "ms", "no kernel"), "T"),
    }
    previous = {"agent.idle_rss": {"name": "agent.idle_rss", "median": 50.0}}
    text = report.format_table(latest, previous)
    rss = next(line for line in text.splitlines() if line.startswith("agent.idle_rss"))
    assert "<= 20 MISSED" in rss
    assert "-20.0%" in rss
    assert "bare 20.0 (x2.00)" in rss
    oci = next(line for line in text.splitlines() if line.startswith("oci.crun"))
    assert "runc 15.0 (x2.00)" in oci and "new" in oci
    assert "crun: unavailable (hybrid cgroups)" in oci
    assert "image.boot: no kernel" in text
    assert "goals: 0 met, 2 missed" in text


def test_show_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latest, previous = tmp_path / "l.json", tmp_path / "p.json"
    assert report.main(["show", "--latest", str(latest), "--previous", str(previous)]) == 1
    report.record([Figure("agent.stdout_throughput", "MB/s", 250.0)], latest)
    assert report.main(["show", "--latest", str(latest), "--previous", str(previous)]) == 0
    assert ">= 200 met" in capsys.readouterr().out
    assert report.main(["begin", "--latest", str(latest), "--previous", str(previous)]) == 0
    assert previous.exists() and not latest.exists()
