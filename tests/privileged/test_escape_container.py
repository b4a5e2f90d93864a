"""Escape attempts from inside a container, and hostile ids, through the real engine:
``kata-oci`` (python -m kata_agent.oci_cli) with busybox bundles, and ``Engine`` directly.

The bundle helpers come from tests/privileged/test_oci_cli.py; the attacks there (the
waiting init's /proc/1/exe, a cwd symlink, fds of a detached init) are not repeated.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kata_agent.engine.container import Engine, Stdio
from kata_agent.engine.errors import SpecError
from kata_agent.engine.spec import Spec, default_spec

from tests.privileged.test_oci_cli import Runtime, host_mounts_mention

STRONG_CAPS = ["CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
               "CAP_KILL", "CAP_CHOWN"]


def with_caps(caps: list[str]) -> Any:
    def mutate(spec: dict[str, Any]) -> None:
        spec["process"]["capabilities"] = {k: list(caps) for k in
                                           ("bounding", "effective", "permitted")}
    return mutate


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------- file descriptors


def test_exec_process_sees_exactly_stdio(rt: Runtime) -> None:
    """Attack: an fd of the engine (or of whoever ran it) leaks into an exec'd process
    and gives it a handle on the host (CVE-2016-9962, CVE-2024-21626 class)."""
    b = rt.bundle(["sleep", "1000"])
    cid = rt.new_id("execfds")
    assert rt.cli("run", "-d", "--bundle", str(b), cid, input="").returncode == 0
    leak = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.set_inheritable(leak, True)
        r = rt.cli("exec", cid, "sh", "-c", "ls /proc/$$/fd; readlink /proc/$$/cwd",
                   pass_fds=(leak,))
    finally:
        os.close(leak)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:-1] == ["0", "1", "2"]
    assert lines[-1] == "/"


def test_foreground_init_sees_exactly_stdio(rt: Runtime) -> None:
    """Attack: as above, for the container's first process run in the foreground."""
    # Two commands, so the shell (pid 1) forks ls instead of becoming it.
    b = rt.bundle(["sh", "-c", "ls /proc/$$/fd; echo $$"])
    leak = os.open("/etc/hostname", os.O_RDONLY)
    try:
        os.set_inheritable(leak, True)
        r = rt.cli("run", "--bundle", str(b), rt.new_id("runfds"), pass_fds=(leak,))
    finally:
        os.close(leak)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1", "2", "1"]


# ---------------------------------------------------------------------- masked / read-only


def test_masked_paths_read_empty_and_hold(rt: Runtime) -> None:
    """Attack: read host data through masked paths (/proc/timer_list, /sys/firmware, a masked
    file and directory of the spec), write through them, or unmount the mask."""
    (rt.rootfs / "etc" / "secret").write_text("TOPSECRET\n")
    (rt.rootfs / "secretdir").mkdir()
    (rt.rootfs / "secretdir" / "inner").write_text("TOPSECRET\n")

    def masks(spec: dict[str, Any]) -> None:
        spec["linux"]["maskedPaths"] += ["/etc/secret", "/secretdir"]

    script = (
        "cat /etc/secret; echo x > /etc/secret; cat /etc/secret; "
        "ls -A /secretdir | wc -l; touch /secretdir/x 2>/dev/null || echo DIR-RO; "
        "stat -c '%t:%T %F' /proc/timer_list /etc/secret; "
        "head -c 16 /proc/timer_list | wc -c; ls -A /sys/firmware | wc -l; "
        "umount /etc/secret 2>/dev/null && echo UNMOUNTED; "
        "umount /secretdir 2>/dev/null && echo UNMOUNTED; cat /etc/secret; echo end")
    b = rt.bundle(["sh", "-c", script], masks)
    r = rt.cli("run", "--bundle", str(b), rt.new_id("masked"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "TOPSECRET" not in r.stdout, (out, r.stderr)
    assert "UNMOUNTED" not in r.stdout
    assert out == ["0", "DIR-RO", "1:3 character special file", "1:3 character special file",
                   "0", "0", "end"], out
    assert (rt.rootfs / "etc" / "secret").read_text() == "TOPSECRET\n"
    assert sorted(os.listdir(rt.rootfs / "secretdir")) == ["inner"]


def test_readonly_paths_reject_writes_and_remounts(rt: Runtime, tmp_path: Path) -> None:
    """Attack: write through read-only paths (/proc/sysrq-trigger, /proc/sys, a read-only
    bind of the spec), or remount them read-write."""
    data = tmp_path / "data"
    data.mkdir()
    (rt.rootfs / "data").mkdir()

    def ro(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                               "options": ["rbind", "rw"]})
        spec["linux"]["readonlyPaths"].append("/data")

    script = (
        "echo x > /data/f 2>/dev/null && echo WROTE-DATA; "
        "echo h > /proc/sysrq-trigger 2>/dev/null && echo WROTE-SYSRQ; "
        "echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo WROTE-SYSCTL; "
        "mount -o remount,rw /data 2>/dev/null && echo REMOUNTED; "
        "mount -o remount,rw /proc/sys 2>/dev/null && echo REMOUNTED; "
        "echo x > /data/f 2>/dev/null && echo WROTE-DATA; echo end")
    b = rt.bundle(["sh", "-c", script], ro)
    r = rt.cli("run", "--bundle", str(b), rt.new_id("ro"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["end"]
    assert list(data.iterdir()) == []


# ---------------------------------------------------------------------- the engine's binary


def test_container_cannot_write_engine_binaries_during_exec(rt: Runtime) -> None:
    """Attack (CVE-2019-5736 class): with CAP_SYS_PTRACE and CAP_DAC_OVERRIDE, a process
    in the container keeps trying to open /proc/PID/exe of every process it can see for
    writing while the engine execs into the container, including a program whose
    interpreter is ``#!/proc/self/exe`` (which makes the exec'ing process run its own
    binary). The host's interpreter must stay byte for byte the same."""
    evil = rt.rootfs / "evil"
    evil.write_text("#!/proc/self/exe\nimport os\nprint('EVIL-RAN')\n")
    evil.chmod(0o755)
    interpreter = os.path.realpath(sys.executable)
    before = digest(interpreter)
    b = rt.bundle(["sh", "-c",
                   "while :; do for p in /proc/[0-9]*; do "
                   "(echo pwned >> $p/exe) 2>/dev/null && echo WROTE $p >> /dev/shm/log; "
                   "done; echo t >> /dev/shm/sweeps; done"], with_caps(STRONG_CAPS))
    cid = rt.new_id("selfexe")
    assert rt.cli("run", "-d", "--bundle", str(b), cid, input="").returncode == 0
    for _ in range(3):
        rt.cli("exec", cid, "/evil")
        assert rt.cli("exec", cid, "true").returncode == 0
    log = rt.cli("exec", cid, "sh", "-c",
                 "cat /dev/shm/log 2>/dev/null; echo end; wc -l < /dev/shm/sweeps")
    assert log.returncode == 0, log.stderr
    words = log.stdout.split()
    assert words[:-1] == ["end"], log.stdout
    assert int(words[-1]) > 0  # the attacker really ran while the execs happened
    assert digest(interpreter) == before


# ---------------------------------------------------------------------- mount destinations


def test_mount_destinations_through_symlinks_stay_inside(rt: Runtime, tmp_path: Path) -> None:
    """Attack: the image makes a mount destination's parent a symlink to a host directory
    (absolute, or relative with many ``..``), so the engine would mount on the host."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), rt.rootfs / "lnk-abs")
    os.symlink("../" * 12 + str(outside).lstrip("/"), rt.rootfs / "lnk-rel")

    def mounts(spec: dict[str, Any]) -> None:
        spec["mounts"] += [{"destination": "/lnk-abs/m1", "type": "tmpfs", "source": "tmpfs"},
                           {"destination": "/lnk-rel/m2", "type": "tmpfs", "source": "tmpfs"}]

    b = rt.bundle(["sh", "-c", "stat -f -c %T /lnk-abs/m1 /lnk-rel/m2"], mounts)
    r = rt.cli("run", "--bundle", str(b), rt.new_id("mntlnk"))
    # Refusing is safe too; mounting is only right inside the rootfs.
    if r.returncode == 0:
        assert r.stdout.split() == ["tmpfs", "tmpfs"]
    else:
        assert "mounts[" in r.stderr, r.stderr
    assert list(outside.iterdir()) == []
    assert not host_mounts_mention(outside)
    assert not host_mounts_mention(rt.rootfs)


def test_mount_destination_symlinked_to_proc_never_hides_procfs(rt: Runtime) -> None:
    """Attack: a mount destination that is a symlink to /proc (or below it) in the image,
    to cover the container's procfs (and its masks) with something else."""
    os.symlink("/proc", rt.rootfs / "lnk-proc")
    os.symlink("/proc/sys", rt.rootfs / "lnk-sys")

    def mounts(spec: dict[str, Any]) -> None:
        spec["mounts"] += [{"destination": "/lnk-proc", "type": "tmpfs", "source": "tmpfs"},
                           {"destination": "/lnk-sys", "type": "tmpfs", "source": "tmpfs"}]

    b = rt.bundle(["sh", "-c", "stat -f -c %T /proc /proc/sys; wc -c < /proc/timer_list"],
                  mounts)
    r = rt.cli("run", "--bundle", str(b), rt.new_id("mntproc"))
    if r.returncode == 0:
        assert r.stdout.split() == ["proc", "proc", "0"]
    else:
        assert "mounts[" in r.stderr, r.stderr
    assert not host_mounts_mention(rt.rootfs)


# ---------------------------------------------------------------------- ids

BAD_IDS = ["../x", "a/b", "", "x" * 300, "-x", ".", "..", "x\n", " x", "x y", "/abs", "\u00e9"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:12] for b in BAD_IDS])
def test_invalid_ids_rejected_by_kata_oci(rt: Runtime, tmp_path: Path, bad: str) -> None:
    """Attack: a container id that names a path (``../x``, ``a/b``, ``/abs``), an option
    (``-x``), or is empty, huge or odd: it must be refused by every verb before anything
    is created, and never touch a path outside the state root."""
    b = rt.bundle(["true"])
    before = sorted(os.listdir(tmp_path))
    for argv in (["create", "--bundle", str(b), "--", bad], ["state", bad], ["start", bad],
                 ["kill", bad, "KILL"], ["delete", "--force", bad], ["exec", bad, "true"]):
        r = rt.cli(*argv, input="")
        assert r.returncode != 0, (argv, r.stdout)
    assert not rt.root.exists() or list(rt.root.iterdir()) == []
    after = sorted(p for p in os.listdir(tmp_path) if not p.startswith(("out", "err")))
    assert after == [p for p in before if not p.startswith(("out", "err"))]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [*BAD_IDS, "a\0b"], ids=[repr(b)[:12] for b in
                                                       [*BAD_IDS, "a\0b"]])
def test_invalid_ids_rejected_by_the_engine(tmp_path: Path, bad: str) -> None:
    """Attack: the same ids given to the engine API directly (as the agent's services do):
    SpecError on the id field, and nothing created."""
    state = tmp_path / "state"
    engine = Engine(str(state), use_cgroups=False)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    doc = default_spec()
    doc["process"]["terminal"] = False
    doc["root"]["path"] = str(rootfs)
    spec = Spec.from_oci(doc)
    calls: list[Callable[[], object]] = [
        lambda: engine.create(bad, str(tmp_path), spec, stdio=Stdio.inherit()),
        lambda: engine.state(bad),
        lambda: engine.start(bad),
        lambda: engine.kill(bad, 9),
        lambda: engine.delete(bad, force=True),
    ]
    for call in calls:
        with pytest.raises(SpecError) as err:
            call()
        assert err.value.field == "id"
    assert not state.exists() or list(state.iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == ["rootfs"] + (["state"] if state.exists() else [])
    assert stat.S_ISDIR(os.stat(rootfs).st_mode) and list(rootfs.iterdir()) == []


def test_busybox_sees_the_procfs_it_should(rt: Runtime) -> None:
    """Sanity for the attacks above: the helpers really run commands in a container
    (its own pid namespace: the shell is pid 1), so a clean result means something."""
    b = rt.bundle(["sh", "-c", "echo $$; hostname"])
    r = rt.cli("run", "--bundle", str(b), rt.new_id("sanity"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "testhost"]
