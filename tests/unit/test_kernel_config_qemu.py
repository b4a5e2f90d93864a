"""QEMU command lines built by kata_agent.host.vm for each arch and boot mode (nothing started).

The same code path is exercised against a real QEMU in tests/vm/test_kernel_boot.py.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from kata_agent.host import vm as vmmod
from kata_agent.host.vm import QMP, VM, VMConfig, VMError, kernel_command_line, qemu_command


def _config(tmp_path: Path, **kw: object) -> VMConfig:
    base: dict[str, object] = {
        "arch": "x86_64",
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.img",
        "console_log": tmp_path / "console.log",
        "qmp_socket": tmp_path / "qmp.sock",
        "agent_socket": tmp_path / "agent.sock",
    }
    base.update(kw)
    return VMConfig(**base)  # type: ignore[arg-type]


def _arg_after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, word in enumerate(cmd[:-1]) if word == flag]


def test_x86_64_q35_initrd(tmp_path: Path) -> None:
    cmd = qemu_command(_config(tmp_path))
    assert cmd[0] == "qemu-system-x86_64"
    assert _arg_after(cmd, "-machine") == ["q35"]
    assert _arg_after(cmd, "-accel") == ["tcg"]
    assert _arg_after(cmd, "-cpu") == ["max"]
    assert "-no-reboot" in cmd and "-nodefaults" in cmd
    assert _arg_after(cmd, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert _arg_after(cmd, "-initrd") == [str(tmp_path / "initrd.img")]
    append = _arg_after(cmd, "-append")[0]
    assert "console=ttyS0" in append.split() and "root=" not in append
    assert f"file,id=console,path={tmp_path / 'console.log'}" in _arg_after(cmd, "-chardev")
    assert _arg_after(cmd, "-serial") == ["chardev:console"]
    assert _arg_after(cmd, "-qmp") == [f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"]
    devices = _arg_after(cmd, "-device")
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=agentch,name=agent.channel.0" in devices
    assert f"socket,id=agentch,path={tmp_path / 'agent.sock'},server=on,wait=off" in _arg_after(
        cmd, "-chardev"
    )
    assert _arg_after(cmd, "-m") == ["512M"] and _arg_after(cmd, "-smp") == ["1"]


def test_aarch64_virt(tmp_path: Path) -> None:
    cmd = qemu_command(
        _config(tmp_path, arch="aarch64", memory_mib=1024, cpus=2, kernel=tmp_path / "Image")
    )
    assert cmd[0] == "qemu-system-aarch64"
    assert _arg_after(cmd, "-machine") == ["virt"]
    assert _arg_after(cmd, "-cpu")[0].startswith("max")
    assert _arg_after(cmd, "-accel") == ["tcg"]
    assert "console=ttyAMA0" in _arg_after(cmd, "-append")[0].split()
    assert _arg_after(cmd, "-m") == ["1024M"] and _arg_after(cmd, "-smp") == ["2"]
    assert "virtio-serial-pci,id=vser0" in _arg_after(cmd, "-device")


def test_microvm_uses_mmio_devices(tmp_path: Path) -> None:
    share = tmp_path / "share"
    cmd = qemu_command(_config(tmp_path, machine="microvm", vsock_cid=5, share_dir=share))
    assert _arg_after(cmd, "-machine") == ["microvm,acpi=off"]
    devices = _arg_after(cmd, "-device")
    assert "virtio-serial-device,id=vser0" in devices
    assert "vhost-vsock-device,guest-cid=5" in devices
    assert "virtio-9p-device,fsdev=share9p,mount_tag=kataShared" in devices
    assert not [d for d in devices if "-pci" in d]


def test_virtio_blk_disk(tmp_path: Path) -> None:
    cmd = qemu_command(_config(tmp_path, initrd=None, image=tmp_path / "root.img"))
    assert "-initrd" not in cmd
    assert f"file={tmp_path / 'root.img'},if=none,id=rootdisk,format=raw,readonly=on" in _arg_after(
        cmd, "-drive"
    )
    assert "virtio-blk-pci,drive=rootdisk" in _arg_after(cmd, "-device")
    append = _arg_after(cmd, "-append")[0].split()
    assert "root=/dev/vda1" in append and "ro" in append


def test_nvdimm_dax_disk(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * (4 << 20))
    cmd = qemu_command(_config(tmp_path, initrd=None, image=image, disk_mode="nvdimm"))
    assert _arg_after(cmd, "-machine") == ["q35,nvdimm=on"]
    assert _arg_after(cmd, "-m") == ["512M,slots=2,maxmem=516M"]
    assert f"memory-backend-file,id=rootmem,mem-path={image},size=4M,share=off" in _arg_after(
        cmd, "-object"
    )
    assert "nvdimm,id=rootnv,memdev=rootmem,unarmed=on" in _arg_after(cmd, "-device")
    append = _arg_after(cmd, "-append")[0].split()
    assert "root=/dev/pmem0p1" in append
    assert "rootflags=dax,data=ordered,errors=remount-ro" in append
    assert "-drive" not in cmd


def test_nvdimm_without_dax(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * (2 << 20))
    append = kernel_command_line(
        _config(tmp_path, initrd=None, image=image, disk_mode="nvdimm", root_dax=False)
    ).split()
    assert "rootflags=data=ordered,errors=remount-ro" in append
    assert not [a for a in append if "dax" in a]


def test_nvdimm_image_must_be_mib_aligned(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * 1000)
    with pytest.raises(VMError, match="multiple of 1 MiB"):
        qemu_command(_config(tmp_path, initrd=None, image=image, disk_mode="nvdimm"))


def test_vsock_share_hotplug_and_extra_kernel_args(tmp_path: Path) -> None:
    cmd = qemu_command(
        _config(
            tmp_path,
            vsock_cid=42,
            share_dir=tmp_path,
            max_memory_mib=2048,
            kernel_args=("agent.log=debug", "quiet"),
        )
    )
    devices = _arg_after(cmd, "-device")
    assert "vhost-vsock-pci,guest-cid=42" in devices
    assert "virtio-9p-pci,fsdev=share9p,mount_tag=kataShared" in devices
    assert f"local,id=share9p,path={tmp_path},security_model=none" in _arg_after(cmd, "-fsdev")
    assert _arg_after(cmd, "-m") == ["512M,slots=2,maxmem=2048M"]
    append = _arg_after(cmd, "-append")[0].split()
    assert append[-2:] == ["agent.log=debug", "quiet"]


def test_kvm_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = qemu_command(_config(tmp_path, accel="kvm"))
    assert _arg_after(cmd, "-accel") == ["kvm"] and _arg_after(cmd, "-cpu") == ["host"]
    cmd = qemu_command(_config(tmp_path, accel="kvm", machine="microvm"))
    assert _arg_after(cmd, "-machine") == ["microvm"]
    monkeypatch.setattr(vmmod, "kvm_usable", lambda arch: False)
    assert _arg_after(qemu_command(_config(tmp_path, accel="auto")), "-accel") == ["tcg"]
    monkeypatch.setattr(vmmod, "kvm_usable", lambda arch: True)
    assert _arg_after(qemu_command(_config(tmp_path, accel="auto")), "-accel") == ["kvm"]


def test_no_agent_socket_means_no_virtio_serial(tmp_path: Path) -> None:
    cmd = qemu_command(_config(tmp_path, agent_socket=None))
    assert not [d for d in _arg_after(cmd, "-device") if "virtserial" in d or "vser" in d]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "riscv64"}, "unknown arch"),
        ({"initrd": None}, "need an initrd or a disk image"),
        ({"vsock_cid": 2}, "reserved"),
        ({"machine": "virt"}, "not supported"),
        ({"arch": "aarch64", "machine": "microvm"}, "not supported"),
        ({"arch": "aarch64", "image": Path("/x"), "disk_mode": "nvdimm"}, "needs ACPI"),
        ({"kernel_args": ("a b",)}, "whitespace"),
        ({"memory_mib": 16}, "too small"),
        ({"max_memory_mib": 100}, "below"),
    ],
)
def test_bad_configs_are_refused(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(VMError, match=message):
        _config(tmp_path, **overrides)


def test_kernel_command_line_initrd_wins_over_root(tmp_path: Path) -> None:
    line = kernel_command_line(_config(tmp_path, image=tmp_path / "root.img"))
    assert "root=" not in line and "panic=-1" in line.split()


def test_vm_uses_its_workdir_and_refuses_missing_files(tmp_path: Path) -> None:
    vm = VM(
        arch="x86_64",
        kernel=tmp_path / "missing",
        initrd=tmp_path / "missing.img",
        workdir=tmp_path,
        qemu_binary="true",
    )
    assert vm.config.console_log == tmp_path / "console.log"
    assert vm.command()[0] == "true"
    with pytest.raises(VMError, match="does not exist"):
        vm.start()
    assert vm.pid is None


def test_qmp_client_skips_events_and_reports_errors(tmp_path: Path) -> None:
    """A fake QMP server; the real one is driven by VM.stop() in the vm tests."""
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(2)
    received: list[dict[str, object]] = []

    def serve() -> None:
        replies: list[dict[str, object]] = [
            {"return": {"status": "running"}},
            {"error": {"desc": "nope"}},
        ]
        for reply in replies:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                stream.write(b'{"QMP": {"version": {}}}\n')
                stream.flush()
                answers: list[dict[str, object]] = [{"return": {}}, reply]
                for answer in answers:
                    received.append(json.loads(stream.readline()))
                    stream.write(b'{"event": "SOMETHING"}\n')
                    stream.write(json.dumps(answer).encode() + b"\n")
                    stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = QMP(path, timeout=5.0)
        assert client.command("query-status") == {"return": {"status": "running"}}
        with pytest.raises(VMError, match="nope"):
            client.command("quit")
    finally:
        thread.join(timeout=5.0)
        server.close()
    assert [m["execute"] for m in received] == [
        "qmp_capabilities",
        "query-status",
        "qmp_capabilities",
        "quit",
    ]


def test_console_socket_keeps_the_console_log(tmp_path: Path) -> None:
    cmd = qemu_command(_config(tmp_path, console_socket=tmp_path / "console.sock"))
    chardevs = _arg_after(cmd, "-chardev")
    assert (f"socket,id=console,path={tmp_path / 'console.sock'},server=on,wait=off,"
            f"logfile={tmp_path / 'console.log'}") in chardevs
    assert not any(c.startswith("file,id=console") for c in chardevs)
    assert _arg_after(cmd, "-serial") == ["chardev:console"]
