"""Sandbox state without root: the reaper on real children, parsers, request checks.

The engine and storage are fakes here; tests/privileged/test_agent_lifecycle.py runs the
same paths against the real ones.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from kata_agent import sandbox as sb
from kata_agent.engine.errors import AlreadyExistsError, NotFoundError, SpecError, StateError
from kata_agent.iostreams import Cancelled, Canceller
from kata_agent.storage.spec import MountHandle, StorageSpec


def spawn(script: str) -> int:
    return os.posix_spawn("/bin/sh", ["sh", "-c", script], dict(os.environ))


def test_reaper_collects_exit_codes_and_signals() -> None:
    reaper = sb.Reaper()
    try:
        w1 = reaper.watch(spawn("exit 7"))
        w2 = reaper.watch(spawn("sleep 1000"))
        assert w1.wait(timeout=30) == 7
        assert w2.send_signal(signal.SIGKILL)
        assert w2.wait(timeout=30) == 128 + signal.SIGKILL
        # Once reaped, the pidfd refuses signals instead of hitting a recycled pid.
        assert not w2.send_signal(signal.SIGTERM)
        with pytest.raises(ChildProcessError):
            os.waitpid(w1.pid, os.WNOHANG)  # reaped by the reaper, nothing left
        w1.release()
        w2.release()
    finally:
        reaper.close()


def test_exit_wait_honours_cancel_and_timeout() -> None:
    reaper = sb.Reaper()
    w = reaper.watch(spawn("sleep 1000"))
    try:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                w.wait(timeout=0.01)
        assert w._wakers == []  # short polls leave nothing registered
        cancel = Canceller()
        t = threading.Thread(target=cancel.set)
        t.start()
        with pytest.raises(Cancelled):
            w.wait(cancel)
        t.join()
        cancel.close()
        calls: list[int] = []
        w.on_exit(lambda: calls.append(1))
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=30)
        assert calls == [1]
    finally:
        w.send_signal(signal.SIGKILL)
        reaper.close()
        w.release()


def test_parsers() -> None:
    text = ("Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame "
            "compressed multicast|bytes packets errs drop fifo colls carrier compressed\n"
            "  eth0: 100 2 0 1 0 0 0 0 200 3 0 0 0 0 0 0\n"
            "    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n")
    stats = sb.parse_net_dev(text)
    assert stats[0] == sb.NetworkStats(name="eth0", rx_bytes=100, rx_packets=2, rx_dropped=1,
                                       tx_bytes=200, tx_packets=3)
    assert [s.name for s in stats] == ["eth0", "lo"]
    ps = b"UID PID PPID C STIME TTY TIME CMD\nroot 1 0 0 00:00 ? 0:00 init\n" \
         b"root 42 1 0 00:00 ? 0:00 sleep\nroot 43 1 0 00:00 ? 0:00 other\n"
    assert sb.filter_ps(ps, {42}) == b"UID PID PPID C STIME TTY TIME CMD\n" \
                                     b"root 42 1 0 00:00 ? 0:00 sleep\n"


def test_signal_handled_reads_sigcgt() -> None:
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert sb.signal_handled(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not sb.signal_handled(os.getpid(), signal.SIGUSR1)
    assert not sb.signal_handled(2**22 + 12345, signal.SIGTERM)  # no such pid


class FakeStorage:
    def __init__(self) -> None:
        self.mounted: list[str] = []

    def add(self, spec: StorageSpec) -> MountHandle:
        if not spec.mount_point.startswith("/run/kata-containers/"):
            raise SpecError("outside", field="mount_point")
        self.mounted.append(spec.mount_point)
        return MountHandle(spec.mount_point, spec.driver, spec.source)

    def remove(self, h: MountHandle) -> None:
        self.mounted.remove(h.mount_point)

    def adopt(self, saved: list[dict[str, object]]) -> None:
        self.mounted += [str(item["mount_point"]) for item in saved]

    def snapshot(self) -> list[dict[str, object]]:
        return [{"mount_point": m} for m in self.mounted]


class FakePause:
    pid = 4242

    def ns_path(self, kind: str) -> str:
        return f"/proc/4242/ns/{kind}"

    def alive(self) -> bool:
        return True


class FakeEngine:
    def __init__(self) -> None:
        self.created: list[Any] = []

    def create(self, cid: str, bundle: Any, spec: Any, **kw: Any) -> Any:
        self.created.append(spec)
        raise StateError("refused by the fake engine")


def sandbox_with_fakes(tmp_path: Path) -> tuple[sb.Sandbox, FakeStorage, FakeEngine]:
    storage, engine = FakeStorage(), FakeEngine()
    s = sb.Sandbox(engine, storage, paths=sb.SandboxPaths(  # type: ignore[arg-type]
        shared_dir=str(tmp_path / "shared"), rootfs_roots=(str(tmp_path / "shared"),)))
    return s, storage, engine


def oci(root: str) -> dict[str, Any]:
    return {"ociVersion": "1.0.1", "root": {"path": root}, "process": {"args": ["sh"]},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "network",
                                                         "path": "/host/netns"},
                                     {"type": "uts", "path": "/host/uts"}]}}


def test_create_container_needs_a_sandbox(tmp_path: Path) -> None:
    s, _, _ = sandbox_with_fakes(tmp_path)
    with pytest.raises(StateError):
        s.create_container(sb.ContainerRequest("c1", "c1", oci("rootfs")))
    with pytest.raises(SpecError):
        s.create_container(sb.ContainerRequest("../c1", "c1", oci("rootfs")))


def test_container_spec_is_rewritten_for_the_sandbox(tmp_path: Path) -> None:
    s, storage, engine = sandbox_with_fakes(tmp_path)
    (tmp_path / "shared" / "c1" / "rootfs").mkdir(parents=True)
    s.created, s._pause = True, FakePause()  # type: ignore[assignment]
    s._guest_hooks = {"prestart": [{"path": "/usr/share/oci/hooks/prestart/x"}]}
    req = sb.ContainerRequest("c1", "", oci("rootfs"), sandbox_pidns=True, storages=(
        StorageSpec(driver="local", source="local", mount_point="/run/kata-containers/v"),))
    with pytest.raises(StateError, match="fake engine"):
        s.create_container(req)
    spec = engine.created[0]
    assert spec.root.path == str(tmp_path / "shared" / "c1" / "rootfs")
    nss = {n.type: n.path for n in spec.linux.namespaces}
    # Host paths dropped; ipc/uts/pid are the pause process's.
    assert nss == {"mount": "", "network": "", "ipc": "/proc/4242/ns/ipc",
                   "uts": "/proc/4242/ns/uts", "pid": "/proc/4242/ns/pid"}
    assert spec.hooks.prestart[0].path == "/usr/share/oci/hooks/prestart/x"
    # The failed create left nothing: storage released, id free again.
    assert storage.mounted == []
    assert s.container_ids() == []


def test_rootfs_outside_the_shared_dirs_is_refused(tmp_path: Path) -> None:
    s, _, engine = sandbox_with_fakes(tmp_path)
    s.created, s._pause = True, FakePause()  # type: ignore[assignment]
    for root in ("/", "/etc", "../../..", str(tmp_path)):
        with pytest.raises(SpecError) as err:
            s.create_container(sb.ContainerRequest("c1", "c1", oci(root)))
        assert err.value.field == "OCI.Root.Path"
    assert engine.created == []


def test_duplicate_and_second_sandbox(tmp_path: Path) -> None:
    s, _, _ = sandbox_with_fakes(tmp_path)
    s.created = True
    with pytest.raises(AlreadyExistsError):
        s.create_sandbox(sb.SandboxRequest(hostname="x"))
    s._containers["c1"] = sb.ContainerEntry(id="c1", init_exec_id="c1")
    with pytest.raises(AlreadyExistsError):
        s.create_container(sb.ContainerRequest("c1", "c1", oci("rootfs")))


@pytest.mark.parametrize("module", [
    sb.KernelModule("../evil"), sb.KernelModule("ok", ("--force",)),
    sb.KernelModule("ok", ("a b",)), sb.KernelModule(""),
])
def test_kernel_module_requests_are_checked(tmp_path: Path, module: sb.KernelModule) -> None:
    s, _, _ = sandbox_with_fakes(tmp_path)
    with pytest.raises(SpecError):
        s._load_modules([module])


def test_guest_hooks_are_found(tmp_path: Path) -> None:
    s, _, _ = sandbox_with_fakes(tmp_path)
    (tmp_path / "hooks" / "prestart").mkdir(parents=True)
    hook = tmp_path / "hooks" / "prestart" / "h1"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    (tmp_path / "hooks" / "prestart" / "not-executable").write_text("")
    found = s._load_guest_hooks(str(tmp_path / "hooks"))
    assert found == {"prestart": [{"path": str(hook), "args": [str(hook), "prestart"]}]}
    with pytest.raises(SpecError):
        s._load_guest_hooks("relative/hooks")


def test_oom_wait_is_cancellable() -> None:
    w = sb.OOMWatcher()
    cancel = Canceller()
    t = threading.Thread(target=cancel.set)
    t.start()
    with pytest.raises(Cancelled):
        w.next_event(cancel)
    t.join()
    cancel.close()
    w.close()


def test_release_while_running_keeps_the_reaper_working() -> None:
    reaper = sb.Reaper()
    try:
        w1 = reaper.watch(spawn("sleep 1000"))
        w1.release()  # the host forgot the process; the reaper still owns its pidfd
        os.kill(w1.pid, signal.SIGKILL)
        assert w1.wait(timeout=30) == 128 + signal.SIGKILL
        w2 = reaper.watch(spawn("exit 4"))
        assert w2.wait(timeout=30) == 4
        w2.release()
    finally:
        reaper.close()


class RestoreEngine:
    """What restore asks of the engine: the ids it has state for, state, delete."""

    def __init__(self, ids: list[str]) -> None:
        self._ids = ids
        self.deleted: list[str] = []
        self.store = self

    def ids(self) -> list[str]:
        return list(self._ids)

    def state(self, cid: str) -> Any:
        raise NotFoundError(f"no state for {cid}")

    def delete(self, cid: str, force: bool = False) -> None:
        assert force
        self.deleted.append(cid)
        self._ids.remove(cid)


def restore_with(tmp_path: Path, doc: dict[str, Any] | None, ids: list[str]
                 ) -> tuple[sb.Sandbox, RestoreEngine]:
    from kata_agent.persist import Keeper
    from kata_agent.sdnotify import Notifier

    keeper = Keeper(str(tmp_path / "sandbox.json"), Notifier(None))
    if doc is not None:
        keeper.save(doc)
    engine = RestoreEngine(ids)
    s = sb.Sandbox(engine, FakeStorage(), keeper=keeper)  # type: ignore[arg-type]
    s.restore({})
    return s, engine


GONE_PID = 2**22 + 12345  # above pid_max: never a live process


def test_restore_deletes_containers_the_journal_does_not_name(tmp_path: Path) -> None:
    doc = {"sandbox": {"id": "sb", "hostname": "h", "pidns": False, "pause_pid": GONE_PID,
                       "pause_start": 1, "guest_hooks": {}, "storages": []},
           "storage": [],
           "containers": [{"id": "c1", "init": "c1", "storages": [], "processes": [
               {"exec_id": "c1", "pid": GONE_PID, "start": 1, "init": True, "key": "",
                "tty": False, "stdin_closed": False}]}]}
    s, engine = restore_with(tmp_path, doc, ["c1", "half-created"])
    try:
        assert s.container_ids() == ["c1"] and s.sandbox_id == "sb"
        # The half-created one (no journal entry) went; the journaled one stayed.
        assert engine.deleted == ["half-created"]
        # Its init ended while no agent ran: the status is lost, reported as 255.
        assert s.process("c1", "c1").watch.wait(timeout=5) == 255
    finally:
        s.reaper.close()
        s.oom.close()


def test_restore_without_a_journal_leaves_the_engine_alone(tmp_path: Path) -> None:
    s, engine = restore_with(tmp_path, None, ["unknown"])
    try:
        assert engine.deleted == [] and s.container_ids() == [] and not s.created
    finally:
        s.reaper.close()
        s.oom.close()
