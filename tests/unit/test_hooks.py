from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from kata_agent.engine.errors import EngineError, SpecError
from kata_agent.engine.hooks import Hook, Hooks, run_hooks

STATE = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42, "bundle": "/b"}


def script(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_hooks_from_oci() -> None:
    h = Hooks.from_oci({
        "prestart": [{"path": "/bin/true"}],
        "createRuntime": [{"path": "/bin/a", "args": ["a", "-x"], "env": ["K=V"], "timeout": 5}],
        "createContainer": [], "startContainer": [{"path": "/bin/b"}],
        "poststart": [{"path": "/bin/c"}], "poststop": [{"path": "/bin/d"}],
    })
    assert h.prestart == (Hook("/bin/true"),)
    assert h.create_runtime == (Hook("/bin/a", ("a", "-x"), ("K=V",), 5),)
    assert h.create_container == () and h.start_container[0].path == "/bin/b"
    assert h.poststart[0].path == "/bin/c" and h.poststop[0].path == "/bin/d"
    assert Hooks.from_oci(None) == Hooks()


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"prestart": [{"path": "relative"}]}, "hooks.prestart[0].path"),
        ({"poststop": [{"path": "/x", "timeout": 0}]}, "hooks.poststop[0].timeout"),
        ({"poststop": [{"path": "/x", "timeout": 1.5}]}, "hooks.poststop[0].timeout"),
        ({"poststart": [{"path": "/x", "env": ["NOEQUALS"]}]}, "hooks.poststart[0].env[0]"),
        ({"poststart": [{"path": "/x", "args": [1]}]}, "hooks.poststart[0].args[0]"),
        ({"createRuntime": {}}, "hooks.createRuntime"),
    ],
)
def test_invalid_hooks(doc: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as ei:
        Hooks.from_oci(doc)
    assert ei.value.field == field


def test_state_on_stdin_args_and_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = script(tmp_path, "h", f'cat > {out}.json; echo "$0|$1" > {out}.meta\n'
                  f"tr '\\0' '\\n' < /proc/$$/environ > {out}.env\n")
    run_hooks([Hook(path, ("myhook", "arg1"), ("FOO=bar",))], STATE, phase="prestart")
    assert json.loads(Path(f"{out}.json").read_text()) == STATE
    # argv[0] comes from args[0]; the environment is exactly the hook's env
    assert Path(f"{out}.meta").read_text().strip() == f"{path}|arg1"
    assert Path(f"{out}.env").read_text().split() == ["FOO=bar"]


def test_failure_names_phase_path_and_output(tmp_path: Path) -> None:
    ran = tmp_path / "second-ran"
    bad = script(tmp_path, "bad", "echo something broke >&2; exit 3\n")
    second = script(tmp_path, "second", f"touch {ran}\n")
    with pytest.raises(EngineError) as ei:
        run_hooks([Hook(bad), Hook(second)], STATE, phase="createRuntime")
    msg = str(ei.value)
    assert "createRuntime" in msg and bad in msg and "exit status 3" in msg
    assert "something broke" in msg
    assert not ran.exists()


def test_missing_executable(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as ei:
        run_hooks([Hook(str(tmp_path / "nope"))], STATE, phase="poststop")
    assert "poststop" in str(ei.value) and ei.value.errno == 2


def test_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    path = script(tmp_path, "slow", f"sleep 60 & echo $! > {pidfile}; wait\n")
    start = time.monotonic()
    with pytest.raises(EngineError) as ei:
        run_hooks([Hook(path, timeout=1)], STATE, phase="poststart")
    assert time.monotonic() - start < 30
    assert "timed out" in str(ei.value) and "poststart" in str(ei.value)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        stat = Path(f"/proc/{child}/stat").read_text() if Path(f"/proc/{child}").exists() else ""
        if stat.split(") ")[-1].startswith("Z"):
            break
        time.sleep(0.01)
    else:
        pytest.fail("the hook's child survived the timeout")
