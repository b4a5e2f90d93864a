"""favordynmods on the cgroup2 root: the mount found in mountinfo, the remount that keeps
its per-mount flags and other options, and the undo (syscall layer faked; the privileged
test does it for real)."""

from __future__ import annotations

from pathlib import Path

from kata_agent import cgroup_tuning
from kata_agent.engine import syscalls as sc

SYSTEMD_V2 = ("35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 "
              "cgroup2 rw,nsdelegate,memory_recursiveprot\n")
HYBRID = ("30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
          "31 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")


class FakeSyscalls(sc.Syscalls):
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int, str | None]] = []
        self.fail = fail

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        if self.fail:
            raise OSError(22, "Invalid argument")
        self.calls.append((target, flags, data))


def test_find_cgroup2_keeps_mount_flags_and_options() -> None:
    m = cgroup_tuning.find_cgroup2(SYSTEMD_V2)
    assert m is not None and m.path == "/sys/fs/cgroup"
    assert m.mount_flags == sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RELATIME
    assert m.super_options == ("nsdelegate", "memory_recursiveprot")
    hybrid = cgroup_tuning.find_cgroup2(HYBRID)
    assert hybrid is not None and hybrid.path == "/sys/fs/cgroup/unified"
    assert cgroup_tuning.find_cgroup2("30 25 0:26 / /x rw - cgroup cgroup rw,memory\n") is None


def test_remount_adds_the_option_and_undo_restores(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(SYSTEMD_V2)
    fake = FakeSyscalls()
    undo = cgroup_tuning.favor_dynamic_changes(fake, str(info))
    flags = sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RELATIME
    assert fake.calls == [("/sys/fs/cgroup", flags, "nsdelegate,memory_recursiveprot,favordynmods")]
    assert undo is not None
    undo()
    assert fake.calls[-1] == ("/sys/fs/cgroup", flags, "nsdelegate,memory_recursiveprot")


def test_nothing_to_do_or_refused(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(SYSTEMD_V2.replace("memory_recursiveprot", "favordynmods"))
    fake = FakeSyscalls()
    assert cgroup_tuning.favor_dynamic_changes(fake, str(info)) is None and fake.calls == []
    info.write_text(HYBRID.replace("cgroup2", "cgroupX"))
    assert cgroup_tuning.favor_dynamic_changes(fake, str(info)) is None
    info.write_text(HYBRID)
    assert cgroup_tuning.favor_dynamic_changes(FakeSyscalls(fail=True), str(info)) is None
    assert cgroup_tuning.favor_dynamic_changes(fake, str(tmp_path / "missing")) is None
