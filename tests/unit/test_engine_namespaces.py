"""Which namespaces a container creates and joins, and in what order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kata_agent.engine import namespaces
from kata_agent.engine import syscalls as sc
from kata_agent.engine.errors import HostError, SpecError
from kata_agent.engine.spec import IDMapping, Linux


def _linux(nss: list[dict[str, str]], **extra: object) -> Linux:
    return Linux.from_oci({"namespaces": nss, **extra}, "linux")


def test_create_plan_new_namespaces() -> None:
    plan = namespaces.NamespacePlan.for_create(_linux(
        [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]))
    assert plan.join == ()
    assert not plan.new_user
    assert plan.new_flags == (sc.CLONE_NEWPID | sc.CLONE_NEWNET | sc.CLONE_NEWIPC
                              | sc.CLONE_NEWUTS | sc.CLONE_NEWNS | sc.CLONE_NEWCGROUP)
    assert plan.new_pid


def test_create_plan_joins_by_path_user_first_mount_last() -> None:
    plan = namespaces.NamespacePlan.for_create(_linux([
        {"type": "mount", "path": "/proc/1/ns/mnt"}, {"type": "network", "path": "/x/net"},
        {"type": "user", "path": "/proc/1/ns/user"}, {"type": "pid"}]))
    assert [t for t, _ in plan.join] == ["user", "network", "mount"]
    assert plan.new_flags == sc.CLONE_NEWPID
    assert not plan.new_user


def test_new_user_namespace_is_separate_from_other_flags() -> None:
    plan = namespaces.NamespacePlan.for_create(_linux(
        [{"type": "user"}, {"type": "mount"}],
        uidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}]))
    assert plan.new_user
    assert plan.new_flags == sc.CLONE_NEWNS


def test_exec_plan_skips_namespaces_we_share() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        plan = namespaces.NamespacePlan.for_exec(child.pid, ["pid", "mount", "network"])
        assert plan.join == ()  # same namespaces as ours: nothing to join
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def test_open_join_fds_names_the_namespace_field() -> None:
    plan = namespaces.NamespacePlan(join=(("network", "/no/such/ns"),), new_user=False,
                                    new_flags=0)
    with pytest.raises(SpecError) as ei:
        namespaces.open_join_fds(plan)
    assert ei.value.field == "linux.namespaces[network].path"


class RecordingSyscalls(sc.Syscalls):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def setns(self, fd: int, nstype: int) -> None:
        self.calls.append(("setns", nstype))
        if self.fail:
            raise PermissionError(1, "setns")

    def unshare(self, flags: int) -> None:
        self.calls.append(("unshare", flags))


def test_join_calls_setns_in_order_and_closes_fds() -> None:
    rec = RecordingSyscalls()
    fds = [("user", os.open("/dev/null", os.O_RDONLY)), ("mount", os.open("/dev/null",
                                                                            os.O_RDONLY))]
    namespaces.join(rec, fds)
    assert rec.calls == [("setns", sc.CLONE_NEWUSER), ("setns", sc.CLONE_NEWNS)]
    for _, fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_join_failure_is_host_error() -> None:
    with pytest.raises(HostError, match="setns into uts"):
        namespaces.join(RecordingSyscalls(fail=True), [("uts", os.open("/dev/null",
                                                                        os.O_RDONLY))])


def test_unshare_skips_zero_flags() -> None:
    rec = RecordingSyscalls()
    namespaces.unshare(rec, 0)
    namespaces.unshare(rec, sc.CLONE_NEWUTS)
    assert rec.calls == [("unshare", sc.CLONE_NEWUTS)]


def test_id_map_text() -> None:
    assert namespaces.id_map_text([IDMapping(0, 1000, 1), IDMapping(1, 100000, 65536)]) == \
        "0 1000 1\n1 100000 65536\n"
