"""Guest operations against fake sysfs trees and a temporary shared directory."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from kata_agent import __version__, guest
from kata_agent.engine.errors import HostError, SpecError, StateError
from kata_agent.guest import GuestDetailsRequest, GuestOps, OnlineCPUMemRequest


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    cpu = root / "devices/system/cpu"
    cpu.joinpath("cpu0").mkdir(parents=True)  # the boot CPU has no online file
    _write(cpu / "cpu1/online", "0\n")
    _write(cpu / "cpu2/online", "0\n")
    _write(cpu / "cpu3/online", "1\n")
    _write(cpu / "cpu10/online", "0\n")
    (cpu / "cpufreq").mkdir()
    _write(cpu / "online", "0-3\n")
    mem = root / "devices/system/memory"
    _write(mem / "memory0/online", "1\n")
    _write(mem / "memory1/online", "0\n")
    _write(mem / "memory2/online", "0\n")
    _write(mem / "block_size_bytes", "8000000\n")
    _write(mem / "probe", "")
    return root


def _ops(sysfs: Path, tmp_path: Path, **kw: object) -> GuestOps:
    return GuestOps(sysfs=sysfs, shared_dir=tmp_path / "shared",
                    online_retry_interval=0.001, online_max_tries=5, **kw)  # type: ignore[arg-type]


def _online(sysfs: Path, rel: str) -> str:
    return (sysfs / "devices/system" / rel / "online").read_text().strip()


# ---------------------------------------------------------------- OnlineCPUMem


def test_online_cpus_and_memory_in_order_and_hooks_called(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    seen: list[str] = []
    ops.cpu_hooks.append(seen.append)
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=2, cpu_only=False))
    assert _online(sysfs, "cpu/cpu1") == "1"
    assert _online(sysfs, "cpu/cpu2") == "1"
    assert _online(sysfs, "cpu/cpu10") == "0"  # numeric order: cpu10 comes after cpu2
    assert _online(sysfs, "memory/memory1") == "1"
    assert _online(sysfs, "memory/memory2") == "1"
    assert seen == ["0-3"]


def test_memory_block_with_only_a_state_file(sysfs: Path, tmp_path: Path) -> None:
    block = sysfs / "devices/system/memory/memory7"
    _write(block / "state", "offline\n")
    _write(sysfs / "devices/system/memory/memory8/state", "online\n")
    _ops(sysfs, tmp_path).online_cpu_mem(OnlineCPUMemRequest(True, 0, False))
    assert (block / "state").read_text() == "online"
    assert (sysfs / "devices/system/memory/memory8/state").read_text() == "online\n"


def test_online_cpu_only_leaves_memory(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=1, cpu_only=True))
    assert _online(sysfs, "cpu/cpu1") == "1"
    assert _online(sysfs, "cpu/cpu2") == "0"
    assert _online(sysfs, "memory/memory1") == "0"


def test_online_memory_only_calls_no_hook(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    seen: list[str] = []
    ops.cpu_hooks.append(seen.append)
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=0, cpu_only=False))
    assert _online(sysfs, "memory/memory2") == "1"
    assert _online(sysfs, "cpu/cpu1") == "0"
    assert seen == []


def test_online_rejects_zero_cpus_with_cpu_only(sysfs: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        _ops(sysfs, tmp_path).online_cpu_mem(OnlineCPUMemRequest(True, 0, True))
    with pytest.raises(SpecError):
        _ops(sysfs, tmp_path).online_cpu_mem(OnlineCPUMemRequest(True, 100_000, False))


def test_online_gives_up_after_bounded_retries(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    started = time.monotonic()
    with pytest.raises(HostError, match="only 3 of 5"):
        ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=5, cpu_only=True))
    assert time.monotonic() - started < 5


def test_online_picks_up_cpus_appearing_between_retries(sysfs: Path, tmp_path: Path) -> None:
    ops = GuestOps(sysfs=sysfs, shared_dir=tmp_path / "s", online_retry_interval=0.01,
                   online_max_tries=1000)
    cpu = sysfs / "devices/system/cpu"
    done = threading.Event()

    def plug() -> None:
        # The new vCPU shows up once the agent onlined the existing ones.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _online(sysfs, "cpu/cpu10") != "1":
            time.sleep(0.005)
        _write(cpu / "cpu11/online", "0\n")
        done.set()

    t = threading.Thread(target=plug)
    t.start()
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=4, cpu_only=True))
    t.join()
    assert done.is_set()
    assert _online(sysfs, "cpu/cpu11") == "1"


def test_online_without_wait_returns_at_once_and_finishes(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    gate = threading.Event()

    def hook(_cpus: str) -> None:
        gate.wait(10)

    ops.cpu_hooks.append(hook)
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=False, nb_cpus=1, cpu_only=True))
    # The reply came back while the hook still blocks the background work.
    assert not ops.wait_background(0.0)
    gate.set()
    assert ops.wait_background(10)
    assert _online(sysfs, "cpu/cpu1") == "1"


def test_online_background_failure_is_logged(
    sysfs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ops = _ops(sysfs, tmp_path)
    ops.online_cpu_mem(OnlineCPUMemRequest(wait=False, nb_cpus=50, cpu_only=True))
    assert ops.wait_background(10)
    assert "online cpu/mem failed" in caplog.text


def test_online_missing_sysfs_is_failed_precondition(tmp_path: Path) -> None:
    ops = _ops(tmp_path / "nosys", tmp_path)
    with pytest.raises(StateError):
        ops.online_cpu_mem(OnlineCPUMemRequest(wait=True, nb_cpus=1, cpu_only=True))


# ---------------------------------------------------------------- probe, details


def test_mem_hotplug_by_probe_writes_hex(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    ops.mem_hotplug_by_probe([0x1_0000_0000])
    assert (sysfs / "devices/system/memory/probe").read_text() == "0x100000000"


def test_mem_hotplug_by_probe_one_write_per_address(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[str, bytes]] = []
    monkeypatch.setattr(guest, "_write_existing", lambda p, d: writes.append((p.name, d)))
    _ops(sysfs, tmp_path).mem_hotplug_by_probe([0x10, 0xABC0000])
    assert writes == [("probe", b"0x10"), ("probe", b"0xabc0000")]


def test_mem_hotplug_by_probe_bounds_and_support(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path)
    with pytest.raises(SpecError):
        ops.mem_hotplug_by_probe([0] * (guest.MAX_PROBE_ADDRESSES + 1))
    with pytest.raises(SpecError):
        ops.mem_hotplug_by_probe([-1])
    (sysfs / "devices/system/memory/probe").unlink()
    with pytest.raises(StateError):
        ops.mem_hotplug_by_probe([0x10])


def test_guest_details(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path, device_handlers=["scsi", "blk"], storage_handlers=["9p"],
               supports_seccomp=True)
    d = ops.guest_details(GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True))
    assert d.mem_block_size_bytes == 0x8000000
    assert d.support_mem_hotplug_probe is True
    assert d.agent_details.version == __version__
    assert d.agent_details.init_daemon is (os.getpid() == 1)
    assert d.agent_details.device_handlers == ("blk", "scsi")
    assert d.agent_details.storage_handlers == ("9p",)
    assert d.agent_details.supports_seccomp is True
    nothing = ops.guest_details(GuestDetailsRequest(False, False))
    assert nothing.mem_block_size_bytes == 0 and nothing.support_mem_hotplug_probe is False


def test_guest_details_acpi_hotplug_disables_probe(sysfs: Path, tmp_path: Path) -> None:
    _write(sysfs / "firmware/acpi/hotplug/memory/enabled", "1\n")
    d = _ops(sysfs, tmp_path).guest_details(GuestDetailsRequest(True, True))
    assert d.support_mem_hotplug_probe is False


def test_guest_details_without_hotplug_and_with_garbage(sysfs: Path, tmp_path: Path) -> None:
    mem = sysfs / "devices/system/memory"
    (mem / "block_size_bytes").unlink()
    (mem / "probe").unlink()
    d = _ops(sysfs, tmp_path).guest_details(GuestDetailsRequest(True, True))
    assert d.mem_block_size_bytes == 0 and d.support_mem_hotplug_probe is False
    _write(mem / "block_size_bytes", "zz\n")
    with pytest.raises(HostError):
        _ops(sysfs, tmp_path).guest_details(GuestDetailsRequest(True, False))


# ---------------------------------------------------------------- random, clock


def test_reseed_writes_data_to_the_device(sysfs: Path, tmp_path: Path) -> None:
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    ops = _ops(sysfs, tmp_path, random_device=dev)
    ops.reseed_random_dev(b"\x01\x02" * 100)
    assert dev.read_bytes() == b"\x01\x02" * 100


def test_reseed_bounds(sysfs: Path, tmp_path: Path) -> None:
    ops = _ops(sysfs, tmp_path, random_device=tmp_path / "random")
    with pytest.raises(SpecError):
        ops.reseed_random_dev(b"")
    with pytest.raises(SpecError):
        ops.reseed_random_dev(b"x" * (guest.MAX_RANDOM_BYTES + 1))
    with pytest.raises(HostError):
        ops.reseed_random_dev(b"x")  # the device does not exist


def test_set_guest_datetime_passes_nanoseconds(sysfs: Path, tmp_path: Path) -> None:
    calls: list[int] = []
    ops = _ops(sysfs, tmp_path, set_clock_ns=calls.append)
    ops.set_guest_datetime(1_700_000_000, 250_000)
    assert calls == [1_700_000_000_250_000_000]


@pytest.mark.parametrize("sec,usec", [(-1, 0), (0, -1), (0, 1_000_000),
                                      (guest.MAX_EPOCH_SECONDS + 1, 0)])
def test_set_guest_datetime_rejects(sysfs: Path, tmp_path: Path, sec: int, usec: int) -> None:
    calls: list[int] = []
    with pytest.raises(SpecError):
        _ops(sysfs, tmp_path, set_clock_ns=calls.append).set_guest_datetime(sec, usec)
    assert calls == []


def test_set_guest_datetime_failure_keeps_errno(sysfs: Path, tmp_path: Path) -> None:
    def refuse(ns: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with pytest.raises(HostError) as info:
        _ops(sysfs, tmp_path, set_clock_ns=refuse).set_guest_datetime(1, 0)
    assert info.value.errno == errno.EPERM
