"""QEMU launcher for the guest: boots a kernel with an initrd or a disk image under TCG or KVM.

The guest gets its `agent.channel.0` virtio-serial port on a host unix socket (QEMU listens),
optionally a vhost-vsock device and a 9p share tagged `kataShared`, and a serial console written
to a log file. The QEMU command line is built by a pure function (`qemu_command`) so it can be
checked without starting QEMU; `VM` runs it and stops it through QMP, then by signals.

    python -m kata_agent.host.vm --arch x86_64 --kernel build/x86_64/vmlinuz \
        --initrd initrd.img --agent-socket /tmp/agent.sock --print-console --timeout 120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

log = logging.getLogger(__name__)

Arch = Literal["x86_64", "aarch64"]
Accel = Literal["tcg", "kvm", "auto"]
DiskMode = Literal["virtio-blk", "nvdimm"]

ARCHES: tuple[Arch, ...] = ("x86_64", "aarch64")
AGENT_PORT_NAME = "agent.channel.0"
SHARE_TAG = "kataShared"
_POLL_INTERVAL = 0.05


class VMError(Exception):
    """QEMU could not be started, did not come up in time, or was misconfigured."""


@dataclass(frozen=True, slots=True)
class VMConfig:
    """Everything that shapes the QEMU command line. Paths are used as given."""

    arch: Arch
    kernel: Path
    console_log: Path
    qmp_socket: Path
    initrd: Path | None = None
    image: Path | None = None
    disk_mode: DiskMode = "virtio-blk"
    # Mount an nvdimm root with DAX; needs the image's PFN (DAX) metadata block, a plain
    # partitioned image has none and its mount would fail.
    root_dax: bool = True
    machine: str | None = None  # x86_64: "q35" (default) or "microvm"; aarch64: "virt"
    accel: Accel = "tcg"
    memory_mib: int = 512
    cpus: int = 1
    max_memory_mib: int | None = None  # enables memory hotplug slots when set
    agent_socket: Path | None = None
    vsock_cid: int | None = None
    share_dir: Path | None = None
    share_tag: str = SHARE_TAG
    kernel_args: tuple[str, ...] = ()
    extra_qemu_args: tuple[str, ...] = ()
    # Also serve the console on this unix socket (typing into the guest's debug console);
    # the output still goes to console_log.
    console_socket: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise VMError(f"unknown arch {self.arch!r}; expected one of {ARCHES}")
        if self.initrd is None and self.image is None:
            raise VMError("need an initrd or a disk image to boot")
        if self.memory_mib < 64 or self.cpus < 1:
            raise VMError(f"memory_mib={self.memory_mib} cpus={self.cpus} are too small")
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise VMError("max_memory_mib is below memory_mib")
        if self.vsock_cid is not None and not 3 <= self.vsock_cid < 0xFFFFFFFF:
            # CIDs 0-2 are reserved (hypervisor, local, host).
            raise VMError(f"guest vsock cid {self.vsock_cid} is reserved or out of range")
        if self.machine_type not in _MACHINES[self.arch]:
            raise VMError(f"machine {self.machine_type!r} not supported for {self.arch}")
        if self.disk_mode == "nvdimm" and self.arch == "aarch64":
            # arm64 `virt` only describes NVDIMMs in ACPI tables, which need UEFI firmware;
            # a direct kernel boot gets a device tree without them.
            raise VMError("nvdimm root disk needs ACPI, unavailable on aarch64 direct kernel boot")
        if self.disk_mode == "nvdimm" and self.machine_type == "microvm":
            raise VMError("microvm has no nvdimm support")
        for arg in self.kernel_args:
            if not arg or any(ch.isspace() for ch in arg):
                raise VMError(f"kernel argument {arg!r} is empty or contains whitespace")

    @property
    def machine_type(self) -> str:
        return self.machine or _MACHINES[self.arch][0]


_MACHINES: dict[str, tuple[str, ...]] = {"x86_64": ("q35", "microvm"), "aarch64": ("virt",)}
_QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
_CONSOLE = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def kvm_usable(arch: Arch) -> bool:
    """KVM only helps for the host's own architecture and needs a writable /dev/kvm."""
    host = _HOST_ARCH.get(platform.machine())
    return host == arch and os.access("/dev/kvm", os.R_OK | os.W_OK)


def resolve_accel(config: VMConfig) -> Literal["tcg", "kvm"]:
    if config.accel == "auto":
        return "kvm" if kvm_usable(config.arch) else "tcg"
    return config.accel


def kernel_command_line(config: VMConfig) -> str:
    args = [f"console={_CONSOLE[config.arch]}", "panic=-1"]
    if config.image is not None and config.initrd is None:
        if config.disk_mode == "nvdimm":
            flags = (
                "dax,data=ordered,errors=remount-ro"
                if config.root_dax
                else ("data=ordered,errors=remount-ro")
            )
            args += ["root=/dev/pmem0p1", f"rootflags={flags}", "ro", "rootfstype=ext4"]
        else:
            args += ["root=/dev/vda1", "ro", "rootfstype=ext4", "rootwait"]
    args += list(config.kernel_args)
    return " ".join(args)


def _opt(path: Path) -> str:
    """A path inside a QEMU option list, where a literal comma is written twice."""
    return str(path).replace(",", ",,")


def _transport(config: VMConfig) -> str:
    # microvm has only virtio-mmio; q35 and arm64 virt have PCI(e).
    return "device" if config.machine_type == "microvm" else "pci"


def qemu_command(config: VMConfig, qemu_binary: str | None = None) -> list[str]:
    """The full QEMU argv for config (pure: reads no files, starts nothing)."""
    accel = resolve_accel(config)
    tr = _transport(config)
    machine = config.machine_type
    if config.disk_mode == "nvdimm" and config.image is not None:
        machine += ",nvdimm=on"
    if config.machine_type == "microvm" and accel == "tcg":
        # Under TCG a microvm guest with ACPI finds no timer to calibrate the TSC against and
        # stalls; without ACPI it boots (virtio-mmio devices then come from the command line
        # QEMU appends). Guest power-off only halts there: end such a VM with stop().
        machine += ",acpi=off"
    memory = f"{config.memory_mib}M"
    needs_slots = config.max_memory_mib is not None or (
        config.disk_mode == "nvdimm" and config.image is not None
    )
    if needs_slots:
        max_mib = config.max_memory_mib or config.memory_mib
        if config.disk_mode == "nvdimm" and config.image is not None:
            max_mib += _image_mib(config.image)
        memory += f",slots=2,maxmem={max_mib}M"

    cpu = "host" if accel == "kvm" else "max"
    if config.arch == "aarch64" and accel == "tcg":
        # The implementation-defined pointer-auth algorithm is much cheaper to emulate.
        cpu = "max,pauth-impdef=on"

    cmd = [
        qemu_binary or _QEMU_BINARY[config.arch],
        "-machine",
        machine,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        memory,
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        f"file,id=console,path={_opt(config.console_log)}" if config.console_socket is None
        else f"socket,id=console,path={_opt(config.console_socket)},server=on,wait=off,"
        f"logfile={_opt(config.console_log)}",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{_opt(config.qmp_socket)},server=on,wait=off",
        "-kernel",
        str(config.kernel),
        "-append",
        kernel_command_line(config),
    ]
    if config.initrd is not None:
        cmd += ["-initrd", str(config.initrd)]
    if config.image is not None:
        if config.disk_mode == "nvdimm":
            size = _image_mib(config.image)
            cmd += [
                # share=off: guest writes stay private, the image file is never modified.
                "-object",
                f"memory-backend-file,id=rootmem,mem-path={_opt(config.image)},size={size}M,share=off",
                "-device",
                "nvdimm,id=rootnv,memdev=rootmem,unarmed=on",
            ]
        else:
            cmd += [
                "-drive",
                f"file={_opt(config.image)},if=none,id=rootdisk,format=raw,readonly=on",
                "-device",
                f"virtio-blk-{tr},drive=rootdisk",
            ]
    if config.agent_socket is not None:
        cmd += [
            "-device",
            f"virtio-serial-{tr},id=vser0",
            "-chardev",
            f"socket,id=agentch,path={_opt(config.agent_socket)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=agentch,name={AGENT_PORT_NAME}",
        ]
    if config.vsock_cid is not None:
        cmd += ["-device", f"vhost-vsock-{tr},guest-cid={config.vsock_cid}"]
    if config.share_dir is not None:
        cmd += [
            "-fsdev",
            f"local,id=share9p,path={_opt(config.share_dir)},security_model=none",
            "-device",
            f"virtio-9p-{tr},fsdev=share9p,mount_tag={config.share_tag}",
        ]
    cmd += ["-device", f"virtio-rng-{tr}"]
    cmd += list(config.extra_qemu_args)
    return cmd


def _image_mib(image: Path) -> int:
    """NVDIMM backends are sized in whole MiB; the image must already be MiB-aligned."""
    size = image.stat().st_size
    if size == 0 or size % (1 << 20):
        raise VMError(f"nvdimm image {image} size {size} is not a positive multiple of 1 MiB")
    return size >> 20


def _wait_until(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], str | None]
) -> None:
    """Poll check() until true; fail early with alive()'s reason when QEMU is gone."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        reason = alive()
        if reason is not None:
            raise VMError(f"{what}: {reason}")
        if time.monotonic() >= deadline:
            raise VMError(f"{what}: not reached within {timeout:.1f}s")
        time.sleep(_POLL_INTERVAL)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


class QMP:
    """Minimal QMP client: one command per connection is all the launcher needs."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            self._read(reader)  # greeting
            self._send(sock, {"execute": "qmp_capabilities"})
            self._reply(reader)
            message: dict[str, Any] = {"execute": name}
            if arguments:
                message["arguments"] = arguments
            self._send(sock, message)
            return self._reply(reader)

    @staticmethod
    def _send(sock: socket.socket, message: dict[str, Any]) -> None:
        sock.sendall(json.dumps(message).encode() + b"\n")

    @staticmethod
    def _read(reader: Any) -> dict[str, Any]:
        line = reader.readline()
        if not line:
            raise VMError("QMP connection closed")
        decoded: dict[str, Any] = json.loads(line)
        return decoded

    def _reply(self, reader: Any) -> dict[str, Any]:
        while True:
            message = self._read(reader)
            if "event" in message:
                continue  # asynchronous events interleave with replies
            if "error" in message:
                raise VMError(f"QMP error: {message['error']}")
            if "return" in message:
                result: dict[str, Any] = message
                return result


@dataclass(slots=True)
class VM:
    """A QEMU guest. Use as a context manager, or call start() and stop().

    workdir holds the console log, QMP socket and QEMU's own output unless the caller
    names paths; when omitted a private temporary directory is made (and removed on stop).
    """

    arch: Arch
    kernel: Path
    initrd: Path | None = None
    image: Path | None = None
    disk_mode: DiskMode = "virtio-blk"
    root_dax: bool = True
    machine: str | None = None
    accel: Accel = "tcg"
    memory_mib: int = 512
    cpus: int = 1
    max_memory_mib: int | None = None
    agent_socket: Path | None = None
    vsock_cid: int | None = None
    share_dir: Path | None = None
    kernel_args: Sequence[str] = ()
    extra_qemu_args: Sequence[str] = ()
    console_socket: Path | None = None
    workdir: Path | None = None
    qemu_binary: str | None = None
    config: VMConfig = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _own_workdir: bool = field(default=False, init=False)
    _qemu_output: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kata-vm-"))
            self._own_workdir = True
        self._qemu_output = self.workdir / "qemu.out"
        self.config = VMConfig(
            arch=self.arch,
            kernel=self.kernel,
            initrd=self.initrd,
            image=self.image,
            disk_mode=self.disk_mode,
            root_dax=self.root_dax,
            machine=self.machine,
            accel=self.accel,
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            max_memory_mib=self.max_memory_mib,
            agent_socket=self.agent_socket,
            vsock_cid=self.vsock_cid,
            share_dir=self.share_dir,
            kernel_args=tuple(self.kernel_args),
            extra_qemu_args=tuple(self.extra_qemu_args),
            console_log=self.workdir / "console.log",
            qmp_socket=self.workdir / "qmp.sock",
            console_socket=self.console_socket,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        return qemu_command(self.config, self.qemu_binary)

    def start(self) -> None:
        if self._proc is not None:
            raise VMError("VM already started")
        cmd = self.command()
        if shutil.which(cmd[0]) is None:
            raise VMError(f"QEMU binary {cmd[0]} not found")
        for path in (self.config.kernel, self.config.initrd, self.config.image):
            if path is not None and not path.is_file():
                raise VMError(f"boot file {path} does not exist")
        if self.config.share_dir is not None and not self.config.share_dir.is_dir():
            raise VMError(f"share directory {self.config.share_dir} does not exist")
        for sock in (self.config.agent_socket, self.config.qmp_socket,
                     self.config.console_socket):
            if sock is not None:
                # A stale socket from an earlier run would make QEMU fail to bind.
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
        self.config.console_log.write_bytes(b"")
        log.info(
            "starting qemu arch=%s machine=%s accel=%s kernel=%s",
            self.config.arch,
            self.config.machine_type,
            resolve_accel(self.config),
            self.config.kernel,
        )
        log.debug("qemu command line: %s", shlex.join(cmd))
        with self._qemu_output.open("wb") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("qemu started pid=%d", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _exit_reason(self) -> str | None:
        if self._proc is None:
            return "VM not started"
        code = self._proc.poll()
        if code is None:
            return None
        return f"qemu exited with status {code}: {self.qemu_output()[-2000:]}"

    def wait_for_socket(self, timeout: float = 30.0) -> Path:
        """Wait until QEMU has bound the agent port's host socket; returns its path.

        Only the socket file is checked, never connected to: a probe connection would show up
        in the guest as the host side of the port opening and closing.
        """
        sock = self.config.agent_socket
        if sock is None:
            raise VMError("no agent socket configured")
        _wait_until(
            lambda: _is_socket(sock),
            timeout,
            f"agent socket {sock}",
            self._exit_reason,
        )
        return sock

    def wait_for_console(self, text: str, timeout: float = 60.0) -> str:
        """Wait until text appears on the serial console; returns the console so far."""
        _wait_until(
            lambda: text in self.console_text(),
            timeout,
            f"console text {text!r}",
            self._exit_reason,
        )
        return self.console_text()

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit (guest power-off with -no-reboot); returns its status."""
        if self._proc is None:
            raise VMError("VM not started")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VMError(f"qemu still running after {timeout:.1f}s") from None

    def console_text(self) -> str:
        try:
            return self.config.console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def qemu_output(self) -> str:
        try:
            return self._qemu_output.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def qmp(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return QMP(self.config.qmp_socket).command(name, arguments)

    def stop(self, grace: float = 5.0) -> int | None:
        """Ask the guest to power off, then quit QEMU, then signal it; returns exit status."""
        proc = self._proc
        if proc is None:
            self._cleanup()
            return None
        steps: list[tuple[str, Callable[[], None]]] = [
            ("system_powerdown", lambda: self._qmp_quietly("system_powerdown")),
            ("quit", lambda: self._qmp_quietly("quit")),
            ("SIGTERM", lambda: self._signal(signal.SIGTERM)),
            ("SIGKILL", lambda: self._signal(signal.SIGKILL)),
        ]
        for name, action in steps:
            if proc.poll() is not None:
                break
            log.debug("stopping qemu pid=%d step=%s", proc.pid, name)
            action()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace if name != "SIGKILL" else 30.0)
        code = proc.poll()
        log.info("qemu stopped pid=%d status=%s", proc.pid, code)
        self._cleanup()
        return code

    def _qmp_quietly(self, name: str) -> None:
        try:
            self.qmp(name)
        except (OSError, VMError, ValueError) as err:
            log.debug("qmp command failed command=%s error=%s", name, err)

    def _signal(self, signum: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.config.qmp_socket.unlink()
        if (
            self._own_workdir
            and self.workdir is not None
            and os.environ.get("KATA_VM_KEEP_WORKDIR") is None
        ):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kata_agent.host.vm", description="Boot a guest kernel under QEMU."
    )
    parser.add_argument("--arch", choices=ARCHES, default=_HOST_ARCH.get(platform.machine()))
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--disk-mode", choices=("virtio-blk", "nvdimm"), default="virtio-blk")
    parser.add_argument(
        "--no-dax",
        action="store_true",
        help="nvdimm root without DAX (image lacks the DAX metadata block)",
    )
    parser.add_argument("--machine")
    parser.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg")
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    parser.add_argument("--max-memory", type=int, help="MiB; enables memory hotplug")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--agent-socket", type=Path)
    parser.add_argument("--vsock-cid", type=int)
    parser.add_argument("--share-dir", type=Path)
    parser.add_argument(
        "--append", action="append", default=[], help="extra kernel command line (may repeat)"
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the guest to power off before stopping it",
    )
    parser.add_argument("--print-console", action="store_true")
    parser.add_argument(
        "--print-command", action="store_true", help="print the QEMU command line and exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    extra = [word for chunk in args.append for word in chunk.split()]
    try:
        vm = VM(
            arch=args.arch,
            kernel=args.kernel,
            initrd=args.initrd,
            image=args.image,
            disk_mode=args.disk_mode,
            root_dax=not args.no_dax,
            machine=args.machine,
            accel=args.accel,
            memory_mib=args.memory,
            max_memory_mib=args.max_memory,
            cpus=args.cpus,
            agent_socket=args.agent_socket,
            vsock_cid=args.vsock_cid,
            share_dir=args.share_dir,
            kernel_args=extra,
            workdir=args.workdir,
        )
        if args.print_command:
            sys.stdout.write(shlex.join(vm.command()) + "\n")
            return 0
        with vm:
            try:
                code = vm.wait(args.timeout)
            except VMError as err:
                log.warning("guest did not power off: %s", err)
                code = 1
            if args.print_console:
                sys.stdout.write(vm.console_text())
        return code
    except VMError as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
