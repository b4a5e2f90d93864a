"""Run OCI runtime-tools validation programs against a runtime and summarise their TAP output.

Each program is an executable producing TAP on stdout. It is run from the suite directory
(where it finds ``runtimetest`` and ``rootfs-<arch>.tar.gz``) with ``RUNTIME`` naming the
runtime executable, under a per-program timeout and a total time budget. One line per program
and a summary line are printed; a JSON file keeps every count and the first failing assertion.

usage: run_validation.py --suite DIR --runtime RUNTIME [options] [PROGRAM...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "skipped", "timeout", "build-failed", "not-run")

_PLAN = re.compile(r"^1\.\.(\d+)\s*(?:#\s*(.*))?$")
_TEST = re.compile(
    r"^(?P<not>not )?ok\b(?:\s+(?P<num>\d+))?\s*(?:-\s*)?(?P<desc>.*?)"
    r"(?:\s*(?<!\\)#\s*(?P<dir>skip|todo)\S*\s*(?P<reason>.*))?$",
    re.IGNORECASE,
)
_DIAG_LINES = 8


@dataclasses.dataclass(frozen=True, slots=True)
class TapResult:
    """Counts from one TAP stream."""

    plan: int | None = None
    plan_directive: str = ""
    ok: int = 0
    not_ok: int = 0
    skipped: int = 0
    todo: int = 0
    bailed_out: str | None = None
    first_failure: str | None = None

    @property
    def tests(self) -> int:
        return self.ok + self.not_ok + self.skipped + self.todo


def parse_tap(text: str) -> TapResult:
    """Count the test lines of a TAP stream; the first ``not ok`` keeps its YAML diagnostic."""
    plan: int | None = None
    plan_directive = ""
    ok = not_ok = skipped = todo = 0
    bailed: str | None = None
    first_failure: list[str] | None = None
    in_failure_yaml = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if in_failure_yaml and first_failure is not None:
            if raw.startswith((" ", "\t")):
                if len(first_failure) < _DIAG_LINES:
                    first_failure.append(line.strip())
                if line.strip() == "...":
                    in_failure_yaml = False
                continue
            in_failure_yaml = False
        if m := _PLAN.match(line):
            plan = int(m.group(1))
            plan_directive = (m.group(2) or "").strip()
            continue
        if line.startswith("Bail out!"):
            bailed = line[len("Bail out!") :].strip() or "bail out"
            continue
        m = _TEST.match(line)
        if m is None:
            continue
        directive = (m.group("dir") or "").lower()
        if directive == "todo":
            todo += 1
        elif directive == "skip":
            skipped += 1
        elif m.group("not"):
            not_ok += 1
            if first_failure is None:
                first_failure = [line]
                in_failure_yaml = True
        else:
            ok += 1
    return TapResult(
        plan=plan,
        plan_directive=plan_directive,
        ok=ok,
        not_ok=not_ok,
        skipped=skipped,
        todo=todo,
        bailed_out=bailed,
        first_failure=" | ".join(first_failure) if first_failure else None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramResult:
    name: str
    status: str
    tap: TapResult
    exit_code: int | None
    duration_s: float
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "plan": self.tap.plan,
            "ok": self.tap.ok,
            "not_ok": self.tap.not_ok,
            "skipped": self.tap.skipped,
            "todo": self.tap.todo,
            "exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 2),
            "reason": self.reason,
            "first_failure": self.tap.first_failure,
        }


def classify(tap: TapResult, exit_code: int | None, timed_out: bool) -> tuple[str, str]:
    """A program fully passes when its plan ran completely, nothing failed and it exited 0."""
    if timed_out:
        return "timeout", f"killed after the per-program timeout; {tap.tests} tests reported"
    if tap.bailed_out is not None:
        return "failed", f"bail out: {tap.bailed_out}"
    if tap.plan is None:
        return "failed", f"no TAP plan (exit status {exit_code})"
    if tap.tests != tap.plan:
        return "failed", f"plan 1..{tap.plan} but {tap.tests} tests reported"
    if tap.not_ok:
        return "failed", f"{tap.not_ok} not ok"
    if exit_code != 0:
        return "failed", f"exit status {exit_code}"
    if tap.ok == 0:
        return "skipped", tap.plan_directive or "every test skipped"
    return "passed", ""


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            # mountinfo writes space, tab, newline and backslash in paths as \ooo.
            target = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if target.startswith(prefix) or target == str(path):
                found.append(target)
    return found


def remove_scratch(path: Path) -> bool:
    """Delete a program's scratch directory, never through a mount that leaked into it."""
    # A bind mount leaked into the scratch tree (propagation tests) would make a recursive
    # delete reach the files it shows: detach such mounts first, and keep the tree if one stays.
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    if _mounts_under(path):
        print(f"warning: mounts remain under {path}; left in place", file=sys.stderr)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


class Runtime:
    """The runtime as the programs call it, optionally confined to a private state root."""

    def __init__(self, command: str, work: Path, state_root: str) -> None:
        self.command = command
        self.state_dir: Path | None = None
        self.executable = command
        if state_root == "auto":
            state_root = str(work / "state") if self._supports_root() else "none"
        if state_root != "none":
            self.state_dir = Path(state_root)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            wrapper = work / "runtime"
            wrapper.write_text(
                f'#!/bin/sh\nexec "{command}" --root "{self.state_dir}" "$@"\n', encoding="utf-8"
            )
            wrapper.chmod(0o755)
            self.executable = str(wrapper)

    def _supports_root(self) -> bool:
        try:
            out = subprocess.run(
                [self.command, "--help"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "--root" in out.stdout + out.stderr

    def leftovers(self) -> list[str]:
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        return sorted(p.name for p in self.state_dir.iterdir() if p.is_dir())

    def remove_leftovers(self) -> list[str]:
        """Force-delete containers a program left behind (timeouts, failed cleanups)."""
        removed = self.leftovers()
        for cid in removed:
            subprocess.run(
                [self.executable, "delete", "--force", cid],
                capture_output=True,
                timeout=60,
                check=False,
            )
        return removed


def run_program(
    name: str, suite: Path, runtime: Runtime, timeout_s: float, log_dir: Path | None, work: Path
) -> ProgramResult:
    exe = suite / "programs" / name
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=work))
    # Searchable like /tmp: a container root mapped to an unprivileged host uid (user
    # namespaces) must still reach a bundle below here.
    scratch.chmod(0o711)
    env = dict(os.environ, RUNTIME=runtime.executable, TMPDIR=str(scratch))
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Its own session: a timeout kills the program and whatever it started.
        proc = subprocess.Popen(
            [str(exe)],
            cwd=suite,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            exit_code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            exit_code = None
        duration = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    left = runtime.remove_leftovers()
    remove_scratch(scratch)
    tap = parse_tap(stdout)
    status, reason = classify(tap, exit_code, timed_out)
    if status == "failed" and tap.first_failure is None and stderr.strip():
        tap = dataclasses.replace(tap, first_failure="stderr: " + stderr.strip().splitlines()[-1])
    if left:
        reason = (reason + "; " if reason else "") + f"removed leftover containers {left}"
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.tap").write_text(stdout, encoding="utf-8")
        (log_dir / f"{name}.stderr").write_text(stderr, encoding="utf-8")
    return ProgramResult(name, status, tap, exit_code, duration, reason)


def read_program_list(path: Path) -> list[str]:
    """Program names, one per line; ``#`` starts a comment."""
    if not path.is_file():
        return []
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


FIXTURE_PREFIX = "fixture/"


def ratchet_names(path: Path, fixture: bool) -> list[str]:
    """The ratchet entries for one suite: ``fixture/<name>`` lines belong to the fixture suite."""
    names = read_program_list(path)
    if fixture:
        return [n.removeprefix(FIXTURE_PREFIX) for n in names if n.startswith(FIXTURE_PREFIX)]
    return [n for n in names if not n.startswith(FIXTURE_PREFIX)]


def is_fixture_suite(suite: Path) -> bool:
    info = suite / "BUILD-INFO"
    return info.is_file() and "label=fixture" in info.read_text(encoding="utf-8").splitlines()


def read_build_failures(suite: Path) -> dict[str, str]:
    failures = {}
    path = suite / "build-failures.txt"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, why = line.partition("\t")
            if name:
                failures[name] = why
    return failures


def order_programs(
    available: Iterable[str], selected: Sequence[str], first: Sequence[str]
) -> list[str]:
    names = list(selected) if selected else sorted(available)
    head = [n for n in first if n in names]
    return head + [n for n in names if n not in head]


def format_entry(name: str, r: Mapping[str, Any]) -> str:
    """One line for one program, from its entry in the results document."""
    plan = f"1..{r['plan']}" if r["plan"] is not None else "no plan"
    line = (
        f"{str(r['status']).upper():12} {name:40} ok {r['ok']:4}  not ok {r['not_ok']:3}  "
        f"skip {r['skipped']:3}  {plan:9} {r['duration_s']:6.1f}s"
    )
    if r["status"] != "passed" and r["reason"]:
        line += f"  ({r['reason']})"
    return line


def format_line(r: ProgramResult) -> str:
    return format_entry(r.name, r.to_json())


def report_lines(doc: Mapping[str, Any], failure_width: int = 220) -> list[str]:
    """Every program's line, the first failing assertion of each failure, the summary."""
    lines = []
    for name, r in doc["programs"].items():
        lines.append(format_entry(name, r))
        if r["status"] != "passed" and r["first_failure"]:
            lines.append(f"{'':13}first failure: {str(r['first_failure'])[:failure_width]}")
    return lines + summary_lines(doc["summary"])


def summarize(results: Sequence[ProgramResult]) -> dict[str, int]:
    summary = {s: sum(1 for r in results if r.status == s) for s in STATUSES}
    summary.update(
        programs=len(results),
        fully_passed=summary["passed"],
        assertions_ok=sum(r.tap.ok for r in results),
        assertions_not_ok=sum(r.tap.not_ok for r in results),
        assertions_skipped=sum(r.tap.skipped for r in results),
    )
    return summary


def summary_lines(summary: Mapping[str, int]) -> list[str]:
    return [
        f"validation: {summary['fully_passed']} programs fully passed of {summary['programs']}; "
        f"{summary['assertions_ok']} assertions ok, {summary['assertions_not_ok']} not ok",
        f"validation: {summary['assertions_skipped']} assertions skipped; programs "
        + ", ".join(f"{summary[s]} {s}" for s in STATUSES),
    ]


def run_suite(
    suite: Path,
    runtime_command: str,
    programs: Sequence[str] = (),
    first: Sequence[str] = (),
    timeout_s: float = 60.0,
    budget_s: float = 600.0,
    log_dir: Path | None = None,
    state_root: str = "auto",
    echo: bool = True,
) -> dict[str, Any]:
    """Run the programs and return the JSON-ready results document."""
    build_failures = read_build_failures(suite)
    available = [p.name for p in (suite / "programs").iterdir() if os.access(p, os.X_OK)]
    names = order_programs([*available, *build_failures], programs, first)
    started_wall = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    results: list[ProgramResult] = []
    with tempfile.TemporaryDirectory(prefix="oci-validation.") as tmp:
        work = Path(tmp)
        work.chmod(0o711)
        runtime = Runtime(runtime_command, work, state_root)
        for name in names:
            if name in build_failures:
                result = ProgramResult(
                    name, "build-failed", TapResult(), None, 0.0, build_failures[name]
                )
            elif name not in available:
                result = ProgramResult(name, "not-run", TapResult(), None, 0.0, "no such program")
            elif time.monotonic() - started > budget_s:
                result = ProgramResult(
                    name,
                    "not-run",
                    TapResult(),
                    None,
                    0.0,
                    f"total budget of {budget_s:.0f}s used up",
                )
            else:
                remaining = budget_s - (time.monotonic() - started)
                result = run_program(
                    name, suite, runtime, max(1.0, min(timeout_s, remaining)), log_dir, work
                )
            results.append(result)
            if echo:
                print(format_line(result), flush=True)
    summary = summarize(results)
    if echo:
        for line in summary_lines(summary):
            print(line, flush=True)
    info_path = suite / "BUILD-INFO"
    info_lines = info_path.read_text(encoding="utf-8").splitlines() if info_path.is_file() else []
    build_info = dict(line.split("=", 1) for line in info_lines if "=" in line)
    return {
        "runtime": runtime_command,
        "suite": str(suite),
        "build_info": build_info,
        "started": started_wall.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "timeout_s": timeout_s,
        "budget_s": budget_s,
        "summary": summary,
        "programs": {r.name: r.to_json() for r in results},
    }


def passing(doc: Mapping[str, Any]) -> set[str]:
    return {name for name, r in doc["programs"].items() if r["status"] == "passed"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", type=Path, required=True, help="made by build-validation.sh")
    ap.add_argument("--runtime", required=True, help="runtime executable (name or path)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per program")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--json", type=Path, help="write the results document here")
    ap.add_argument("--log-dir", type=Path, help="keep each program's TAP and stderr here")
    ap.add_argument(
        "--state-root",
        default="auto",
        help="'auto' (private --root when the runtime has one), 'none', or a directory",
    )
    ap.add_argument("--first", type=Path, help="file of program names to run first")
    ap.add_argument("--require", type=Path, help="file of program names that must fully pass")
    ap.add_argument("--compare", type=Path, help="a baseline results JSON to compare with")
    ap.add_argument("programs", nargs="*")
    args = ap.parse_args(argv)

    runtime = args.runtime
    if "/" not in runtime:
        runtime = shutil.which(runtime) or runtime
    first = read_program_list(args.first) if args.first else []
    suite = args.suite.resolve()
    required = ratchet_names(args.require, is_fixture_suite(suite)) if args.require else []
    doc = run_suite(
        suite,
        runtime,
        args.programs,
        first + required,
        args.timeout,
        args.budget,
        args.log_dir,
        args.state_root,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"validation: results written to {args.json}")
    rc = 0
    now = passing(doc)
    if args.compare and args.compare.is_file():
        base = passing(json.loads(args.compare.read_text(encoding="utf-8")))
        print(
            f"validation: baseline {args.compare.name} passes {len(base)}; "
            f"missing here: {' '.join(sorted(base - now)) or 'none'}; "
            f"passing beyond it: {' '.join(sorted(now - base)) or 'none'}"
        )
    if args.require:
        beyond = sorted(now - set(required))
        print(
            f"validation: passing but not yet in {args.require.name}: {' '.join(beyond) or 'none'}"
        )
    missing = [n for n in required if n not in now]
    if missing:
        print(f"validation: required programs not fully passing: {' '.join(missing)}")
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
