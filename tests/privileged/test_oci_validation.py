"""The OCI runtime-tools validation suite, driven against kata-oci with a ratchet.

The suite is built outside the repository by tests/conformance/build-validation.sh; the
harness's own two-program suite (tests/conformance/fixture-suite) checks the build, run and
TAP accounting path end to end against runc, and is run against kata-oci too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance import run_validation as rv

HERE = Path(__file__).resolve().parent
CONFORMANCE = HERE.parent / "conformance"
RATCHET = CONFORMANCE / "kata-oci-passing.txt"
KATA_OCI = CONFORMANCE / "kata-oci"
CACHE = (
    Path(os.environ.get("KATA_CACHE", Path.home() / ".cache" / "kata-agent-py")) / "runtime-tools"
)
PER_PROGRAM_TIMEOUT_S = 60.0
SUITE_BUDGET_S = 600.0


def _build(*args: str) -> Path:
    """Build (or reuse) a suite; skip when this host cannot provide it."""
    if shutil.which("go") is None:
        pytest.skip("host capability missing: Go toolchain (apt-get install golang-go)")
    proc = subprocess.run(
        [str(CONFORMANCE / "build-validation.sh"), *args],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if proc.returncode == 3:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        pytest.skip(f"host capability missing: OCI runtime-tools validation sources ({reason})")
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def _report(
    capsys: pytest.CaptureFixture[str],
    title: str,
    doc: dict[str, Any],
    ratchet: list[str] | None = None,
) -> None:
    with capsys.disabled():
        print(f"\n--- {title}")
        for line in rv.report_lines(doc):
            print(line)
        if ratchet is not None:
            new = sorted(rv.passing(doc) - set(ratchet))
            print(f"validation: passing but not yet in {RATCHET.name}: {' '.join(new) or 'none'}")


def _ratchet(fixture: bool = False) -> list[str]:
    return rv.ratchet_names(RATCHET, fixture)


def _save(doc: dict[str, Any], name: str) -> Path:
    out = CACHE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


# --- TAP accounting ----------------------------------------------------------------------


def test_tap_counts_plan_skips_todo_and_first_failure() -> None:
    tap = rv.parse_tap(
        textwrap.dedent(
            """\
            TAP version 13
            ok 1 - root.readonly is set
            not ok 2 - hostname matches
              ---
              {
                "actual": "runc",
                "expected": "hostname-specific"
              }
              ...
            ok 3 # SKIP apparmor is not enabled
            not ok 4 - later failure
            not ok 5 - known gap # TODO not implemented
            ok 6 - \\# not a directive
            1..6
            """
        )
    )
    assert (tap.plan, tap.ok, tap.not_ok, tap.skipped, tap.todo) == (6, 2, 2, 1, 1)
    assert tap.first_failure is not None
    assert tap.first_failure.startswith("not ok 2 - hostname matches | --- | {")
    assert '"expected": "hostname-specific"' in tap.first_failure
    assert "later failure" not in tap.first_failure


def test_classify_requires_a_complete_clean_plan_and_exit_zero() -> None:
    clean = rv.parse_tap("1..2\nok 1 - a\nok 2 - b\n")
    assert rv.classify(clean, 0, False) == ("passed", "")
    assert rv.classify(clean, 1, False)[0] == "failed"
    assert rv.classify(clean, None, True)[0] == "timeout"
    short = rv.parse_tap("1..3\nok 1 - a\nok 2 - b\n")
    assert rv.classify(short, 0, False) == ("failed", "plan 1..3 but 2 tests reported")
    assert rv.classify(rv.parse_tap(""), 1, False) == ("failed", "no TAP plan (exit status 1)")
    skipped_all = rv.parse_tap("1..1\nok 1 # SKIP cgroup v2 only\n")
    assert rv.classify(skipped_all, 0, False)[0] == "skipped"
    bailed = rv.parse_tap("1..2\nok 1\nBail out! runtime missing\n")
    assert rv.classify(bailed, 0, False) == ("failed", "bail out: runtime missing")


def test_ratchet_file_names_only_known_programs() -> None:
    names = rv.read_program_list(RATCHET)
    assert len(names) == len(set(names)), "duplicate names in kata-oci-passing.txt"
    for name in names:
        assert name.removeprefix(rv.FIXTURE_PREFIX).replace("_", "").isalnum(), name


# --- the runner with real processes ------------------------------------------------------


@pytest.fixture
def hanging_suite(tmp_path: Path) -> Iterator[Path]:
    """A suite whose one program reports a test, starts a child and never exits."""
    programs = tmp_path / "programs"
    programs.mkdir()
    prog = programs / "hangs"
    prog.write_text(
        "#!/bin/sh\n"
        'echo "1..2"; echo "ok 1 - started"\n'
        'sh -c \'echo $$ > "$0"; exec tail -f /dev/null\' "$PWD/child.pid" &\n'
        "exec tail -f /dev/null\n",
        encoding="utf-8",
    )
    prog.chmod(0o755)
    yield tmp_path


def test_require_list_fails_the_run_when_a_listed_program_fails(tmp_path: Path) -> None:
    programs = tmp_path / "suite" / "programs"
    programs.mkdir(parents=True)
    for name, body in (
        ("good", 'echo "1..1"; echo "ok 1 - fine"'),
        ("bad", 'echo "1..2"; echo "ok 1"; echo "not ok 2 - broken"'),
    ):
        (programs / name).write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        (programs / name).chmod(0o755)
    ratchet = tmp_path / "passing.txt"
    common = ["--suite", str(tmp_path / "suite"), "--runtime", "runc", "--require", str(ratchet)]
    ratchet.write_text("# comment\ngood\nfixture/bad\n", encoding="utf-8")
    assert rv.main([*common, "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["summary"]["fully_passed"] == 1
    assert doc["programs"]["bad"]["first_failure"] == "not ok 2 - broken"
    ratchet.write_text("good\nbad\n", encoding="utf-8")
    assert rv.main(common) == 1


def test_timeout_kills_the_program_and_its_children(hanging_suite: Path) -> None:
    started = time.monotonic()
    doc = rv.run_suite(hanging_suite, "runc", timeout_s=2.0, budget_s=30.0, echo=False)
    assert time.monotonic() - started < 25
    result = doc["programs"]["hangs"]
    assert result["status"] == "timeout"
    assert (result["ok"], result["plan"]) == (1, 2)
    child = int((hanging_suite / "child.pid").read_text(encoding="utf-8"))
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the program's child survived the timeout"


def _fixture_programs() -> set[str]:
    return {d.name for d in (CONFORMANCE / "fixture-suite" / "validation").iterdir() if d.is_dir()}


def test_scratch_removal_detaches_leaked_mounts_first(tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "keep").write_text("must survive", encoding="utf-8")
    scratch = tmp_path / "scratch"
    (scratch / "bundle" / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(host_dir), str(scratch / "bundle" / "mnt")], check=True)
    try:
        assert rv.remove_scratch(scratch)
    finally:
        subprocess.run(
            ["umount", "-l", str(scratch / "bundle" / "mnt")], check=False, capture_output=True
        )
    assert not scratch.exists()
    assert (host_dir / "keep").read_text(encoding="utf-8") == "must survive"


def test_fixture_suite_passes_under_runc(capsys: pytest.CaptureFixture[str]) -> None:
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("host capability missing: runc (apt-get install runc)")
    suite = _build("--fixture")
    doc = rv.run_suite(suite, runc, timeout_s=60, budget_s=300, echo=False)
    _report(capsys, "fixture suite against runc", doc)
    assert set(doc["programs"]) == _fixture_programs()
    summary = doc["summary"]
    assert summary["fully_passed"] == summary["programs"] == len(_fixture_programs())
    planned = sum(r["plan"] for r in doc["programs"].values())
    assert (summary["assertions_ok"], summary["assertions_not_ok"]) == (planned, 0)
    assert summary["assertions_skipped"] == 0


@pytest.mark.timeout(600)
def test_fixture_suite_against_kata_oci(capsys: pytest.CaptureFixture[str]) -> None:
    suite = _build("--fixture")
    doc = rv.run_suite(
        suite, str(KATA_OCI), first=_ratchet(fixture=True), timeout_s=60, budget_s=420, echo=False
    )
    _save(doc, "kata-oci-fixture")
    _report(capsys, "fixture suite against kata-oci", doc, _ratchet(fixture=True))
    programs = doc["programs"]
    assert set(programs) == _fixture_programs()
    for name in _ratchet(fixture=True):
        assert programs[name]["status"] == "passed", (name, programs[name])


# --- the runtime-tools suite -------------------------------------------------------------


@pytest.mark.timeout(int(SUITE_BUDGET_S + 2 * PER_PROGRAM_TIMEOUT_S + 600))
def test_validation_suite_against_kata_oci(capsys: pytest.CaptureFixture[str]) -> None:
    suite = _build()
    required = _ratchet()
    doc = rv.run_suite(
        suite,
        str(KATA_OCI),
        first=required,
        timeout_s=PER_PROGRAM_TIMEOUT_S,
        budget_s=SUITE_BUDGET_S,
        log_dir=CACHE / "results" / "kata-oci-logs",
        echo=False,
    )
    out = _save(doc, "kata-oci")
    _report(capsys, f"runtime-tools validation against kata-oci (results: {out})", doc, required)
    programs = doc["programs"]
    built = {p.name for p in (suite / "programs").iterdir()}
    assert built <= set(programs), "programs missing from the results"
    assert doc["duration_s"] <= SUITE_BUDGET_S + 2 * PER_PROGRAM_TIMEOUT_S
    regressed = [n for n in required if programs.get(n, {}).get("status") != "passed"]
    assert not regressed, f"ratchet: these programs passed before and fail now: {regressed}"
