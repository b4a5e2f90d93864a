"""`kata-vm-run`: boot the guest image under QEMU and run one OCI container in it.

The host side of a Kata 1.x sandbox with a single container, end to end: QEMU starts with a
9p share and the agent's virtio-serial port on a host socket; the runner waits for the
agent's health check over yamux, places the bundle's rootfs in the share, then sends what a
runtime sends (CreateSandbox with the 9p storage, CreateContainer, StartContainer), copies the
container's stdout and stderr to its own until EOF, waits for the exit status, removes the
container and the sandbox, powers the guest off and exits with the container's status.

    kata-vm-run --arch x86_64 -- echo hello from the guest
    kata-vm-run --bundle ./mybundle --mode init --root disk

Only the container's output goes to stdout; the runner's own messages go to stderr. A
failure of the runner itself (boot, agent, request) exits with status 125 after stopping
QEMU and printing the tail of the guest console.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import grpc

from kata_agent.engine.errors import SpecError
from kata_agent.engine.ids import validate_id
from kata_agent.host.client import AgentClient
from kata_agent.host.vm import ARCHES, VM, Arch, VMError, resolve_accel
from kata_agent.oci_convert import spec_to_proto
from kata_agent.protocol import agent_pb2, health_pb2, oci_pb2

log = logging.getLogger(__name__)

Mode = Literal["systemd", "init"]
Root = Literal["initrd", "disk", "nvdimm"]

MODES: tuple[Mode, ...] = ("systemd", "init")
ROOTS: tuple[Root, ...] = ("initrd", "disk", "nvdimm")
KERNEL_FILE = {"x86_64": "vmlinuz", "aarch64": "Image"}
SHARED_DIR = "/run/kata-containers/shared/containers"
SHARE_OPTIONS = ("trans=virtio,version=9p2000.L,cache=mmap", "nodev")
AGENT_BINARY = "/usr/bin/kata-agent"
SYSTEMD_BINARY = "/usr/lib/systemd/systemd"
RUNNER_FAILURE = 125
READ_CHUNK = 65536
RPC_TIMEOUT = 120.0
# Output still buffered in the guest when the process exits arrives within this time.
DRAIN_TIMEOUT = 30.0
_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class RunError(Exception):
    """The runner could not boot the guest or drive the agent."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    arch: Arch
    mode: Mode = "systemd"
    root: Root = "initrd"
    build_dir: Path = Path("build")
    bundle: Path | None = None
    command: tuple[str, ...] = ()
    container_id: str = "demo"
    console: bool = False
    keep: bool = False
    memory_mib: int = 1024
    cpus: int = 1
    boot_timeout: float = 300.0
    kernel_args: tuple[str, ...] = ()
    busybox: Path = Path("/bin/busybox")


@dataclass(slots=True)
class RunResult:
    """What one run produced (the CLI prints these; tests inspect them)."""

    exit_status: int
    ready_seconds: float
    qemu_status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- boot files


def boot_files(build_dir: Path, arch: Arch, root: Root) -> tuple[Path, Path | None, Path | None]:
    """Kernel, initrd and disk image of `make image ARCH=arch` for the chosen root."""
    arch_dir = build_dir / arch
    kernel = arch_dir / KERNEL_FILE[arch]
    initrd = arch_dir / "initrd.img" if root == "initrd" else None
    image = arch_dir / "rootfs.img" if root != "initrd" else None
    for path in (kernel, initrd, image):
        if path is not None and not path.is_file():
            raise RunError(f"{path} is missing: run `make image ARCH={arch}`")
    return kernel, initrd, image


def boot_arguments(mode: Mode, root: Root) -> list[str]:
    """The kernel command line that starts the agent: under systemd or as PID 1."""
    if root == "initrd":
        init = "rdinit=/init" if mode == "systemd" else f"rdinit={AGENT_BINARY}"
    else:
        init = f"init={SYSTEMD_BINARY}" if mode == "systemd" else f"init={AGENT_BINARY}"
    args = [init]
    if mode == "systemd":
        args.append("systemd.show_status=0")
    return args


# ----------------------------------------------------------------------------- bundles


def default_spec(args: Sequence[str], hostname: str = "kata-demo") -> dict[str, Any]:
    """A runtime-spec document like `runc spec` makes, without a network namespace (a Kata
    container shares the guest's network)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


ELF_MACHINE = {62: "x86_64", 183: "aarch64"}


def elf_arch(path: Path) -> str | None:
    """The architecture an ELF executable is built for (None when not ELF or unknown)."""
    with path.open("rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[5] != 1:
        return None  # not ELF, or big-endian
    return ELF_MACHINE.get(int.from_bytes(header[18:20], "little"))


def busybox_bundle(dest: Path, args: Sequence[str], busybox: Path = Path("/bin/busybox"),
                   arch: str | None = None) -> Path:
    """A bundle whose rootfs is a static busybox (the host's by default) with a link per
    applet. With arch given, the binary must be built for it: the guest runs it."""
    if not busybox.is_file():
        raise RunError(f"{busybox} is missing (install busybox-static) or pass --bundle")
    if arch is not None and elf_arch(busybox) != arch:
        raise RunError(f"{busybox} is not an {arch} executable: pass --busybox with a static "
                       f"{arch} busybox, or --bundle")
    # The applet list comes from the host's busybox, which can run here; the copied binary
    # (possibly another architecture's) serves the same applets.
    host_busybox = shutil.which("busybox") or str(busybox)
    listing = subprocess.run([host_busybox, "--list"], capture_output=True, text=True,
                             check=False)
    if listing.returncode != 0:
        raise RunError(f"{host_busybox} --list failed: {listing.stderr.strip()}")
    rootfs = dest / "rootfs"
    for sub in ("bin", "dev", "etc", "proc", "sys", "tmp", "root"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in listing.stdout.split():
        if "/" in applet or applet in (".", "..", "busybox"):
            continue
        with contextlib.suppress(FileExistsError):
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (dest / "config.json").write_text(json.dumps(default_spec(args), indent=2) + "\n")
    return dest


def guest_tree(build_dir: Path, arch: str) -> Path:
    """The guest image's root directory as `make image` left it."""
    return build_dir / arch / "work" / "mkosi-out" / "rootfs"


def _foreign(busybox: Path, arch: str) -> bool:
    return not busybox.is_file() or elf_arch(busybox) != arch


def load_bundle(bundle: Path) -> tuple[dict[str, Any], Path]:
    """The bundle's config.json and its rootfs directory (root.path, relative to the bundle)."""
    try:
        doc = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read {bundle / 'config.json'}: {err}") from err
    if not isinstance(doc, dict):
        raise RunError(f"{bundle / 'config.json'} is not a JSON object")
    root = doc.get("root", {}).get("path", "rootfs") if isinstance(doc.get("root"), dict) \
        else "rootfs"
    rootfs = (bundle / str(root)).resolve()
    if not rootfs.is_dir():
        raise RunError(f"bundle rootfs {rootfs} is not a directory")
    return doc, rootfs


def guest_spec(doc: dict[str, Any], container_id: str) -> Any:
    """The bundle's spec as the agent receives it from a Kata 1.x runtime."""
    spec = oci_pb2.Spec()
    try:
        dropped = spec_to_proto(doc, spec)
    except SpecError as err:
        raise RunError(f"config.json: {err}") from err
    if dropped:
        log.warning("config.json fields the agent protocol cannot carry fields=%s",
                    ",".join(dropped))
    spec.Root.Path = f"{SHARED_DIR}/{container_id}/rootfs"
    if spec.Process.Terminal:
        # Output is copied as two plain streams; a terminal would merge them.
        log.warning("process.terminal ignored: the runner copies stdout and stderr")
        spec.Process.Terminal = False
    # The container shares the guest's network, and namespace paths name host files.
    kept = [ns for ns in spec.Linux.Namespaces if ns.Type != "network"]
    del spec.Linux.Namespaces[:]
    for ns in kept:
        spec.Linux.Namespaces.add(Type=ns.Type)
    if not spec.Linux.CgroupsPath:
        spec.Linux.CgroupsPath = f"/kata/{container_id}"
    return spec


def share_rootfs(rootfs: Path, share: Path, container_id: str) -> Path:
    """Copy the rootfs to <share>/<id>/rootfs, where the guest sees it over 9p."""
    dest = share / container_id / "rootfs"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(rootfs, dest, symlinks=True)
    return dest


# ----------------------------------------------------------------------------- the agent


def wait_for_agent(vm: VM, socket_path: Path, started: float, timeout: float) -> AgentClient:
    """Health.Check through the serial socket until it answers SERVING."""
    deadline = started + timeout
    vm.wait_for_socket(timeout=max(1.0, deadline - time.monotonic()))
    while True:
        # The socket file exists from QEMU's bind(); connections succeed after its listen().
        try:
            client = AgentClient(f"unix-serial:{socket_path}")
            break
        except ConnectionRefusedError:
            if time.monotonic() >= deadline or not vm.running():
                raise
            time.sleep(0.05)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"the agent did not answer within {timeout:.0f}s")
            if not vm.running():
                raise RunError(f"QEMU exited with status {vm.returncode()} before the agent "
                               "answered")
            try:
                reply = client.health.Check(health_pb2.CheckRequest(), timeout=min(5.0, left))
            except grpc.RpcError as err:
                log.debug("agent not answering yet code=%s", err.code())
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return client
            time.sleep(0.2)
    except BaseException:
        client.close()
        raise


def copy_stream(client: AgentClient, method: str, cid: str, out: IO[bytes],
                captured: bytearray | None) -> None:
    """Read one of the container's streams until the agent reports EOF."""
    call: Callable[..., Any] = getattr(client.agent, method)
    while True:
        try:
            data = call(agent_pb2.ReadStreamRequest(container_id=cid, exec_id=cid,
                                                    len=READ_CHUNK)).data
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.OUT_OF_RANGE:
                return  # EOF
            log.error("stream read failed method=%s code=%s details=%s", method, err.code(),
                      err.details())
            return
        out.write(data)
        out.flush()
        if captured is not None:
            captured += data


def run_container(client: AgentClient, spec: Any, cid: str, *, capture: bool = False,
                  stdout: IO[bytes] | None = None,
                  stderr: IO[bytes] | None = None) -> tuple[int, bytes, bytes]:
    """Sandbox and container lifecycle; returns (exit status, stdout, stderr captured)."""
    agent = client.agent
    agent.CreateSandbox(agent_pb2.CreateSandboxRequest(
        hostname=spec.Hostname or "kata", sandbox_id=f"sandbox-{cid}",
        storages=[agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                                    options=list(SHARE_OPTIONS),
                                    mount_point=SHARED_DIR + "/")]), timeout=RPC_TIMEOUT)
    agent.CreateContainer(agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=spec), timeout=RPC_TIMEOUT)
    agent.StartContainer(agent_pb2.StartContainerRequest(container_id=cid),
                         timeout=RPC_TIMEOUT)
    # Nothing is written to the container's stdin: it reads EOF, as with `docker run`.
    try:
        agent.CloseStdin(agent_pb2.CloseStdinRequest(container_id=cid, exec_id=cid),
                         timeout=RPC_TIMEOUT)
    except grpc.RpcError as err:
        log.warning("CloseStdin failed code=%s details=%s", err.code(), err.details())
    out_buf = bytearray() if capture else None
    err_buf = bytearray() if capture else None
    readers = [
        threading.Thread(target=copy_stream, name=f"copy-{method}", daemon=True,
                         args=(client, method, cid, target, buf))
        for method, target, buf in (
            ("ReadStdout", stdout or sys.stdout.buffer, out_buf),
            ("ReadStderr", stderr or sys.stderr.buffer, err_buf),
        )
    ]
    for reader in readers:
        reader.start()
    status = agent.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid, exec_id=cid)).status
    drain_end = time.monotonic() + DRAIN_TIMEOUT
    for reader in readers:
        reader.join(max(0.0, drain_end - time.monotonic()))
        if reader.is_alive():
            log.warning("stream still open after the process exited thread=%s", reader.name)
    agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid),
                          timeout=RPC_TIMEOUT)
    agent.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=RPC_TIMEOUT)
    return int(status), bytes(out_buf or b""), bytes(err_buf or b"")


def shut_down(vm: VM, timeout: float = 60.0) -> int | None:
    """End the VM once its sandbox is gone, as the Kata runtime does: QMP ``quit``, after
    which QEMU exits 0. (The image has no ACPI power-button handler: systemd-logind needs
    D-Bus, which the image leaves out, and the agent as PID 1 does not watch input events.)"""
    try:
        vm.qmp("quit")
        vm.wait(timeout)
    except (OSError, VMError) as err:
        log.warning("qemu did not quit error=%s", err)
    return vm.stop()


class ConsoleTail:
    """Copies the guest console file to a stream while the VM runs (--console)."""

    def __init__(self, path: Path, out: IO[bytes]) -> None:
        self._path = path
        self._out = out
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _copy(self) -> None:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self._offset += len(data)
            self._out.write(data)
            self._out.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._copy()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._copy()


# ----------------------------------------------------------------------------- one run


def run(opts: RunOptions, *, workdir: Path | None = None, capture: bool = False,
        stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None) -> RunResult:
    """Boot, run the container, shut down. Raises RunError (QEMU stopped unless keep)."""
    try:
        validate_id(opts.container_id, "id")
    except SpecError as bad:
        raise RunError(f"container id {opts.container_id!r} is not valid: {bad}") from None
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="kata-vm-run-"))
    share = work / "share"
    share.mkdir(parents=True, exist_ok=True)
    err_out = stderr or sys.stderr.buffer
    kernel, initrd, image = boot_files(opts.build_dir, opts.arch, opts.root)
    if opts.bundle is not None:
        doc, rootfs = load_bundle(opts.bundle)
        if opts.command:
            doc.setdefault("process", {})["args"] = list(opts.command)
    elif _foreign(opts.busybox, opts.arch) and guest_tree(opts.build_dir, opts.arch).is_dir():
        # No busybox for the guest's architecture: the guest image's own root tree (Debian's
        # shell and coreutils for that architecture) serves as the container's rootfs.
        doc, rootfs = default_spec(opts.command or ("sh",)), guest_tree(opts.build_dir, opts.arch)
    else:
        bundle = busybox_bundle(work / "bundle", opts.command or ("sh",), opts.busybox,
                                opts.arch)
        doc, rootfs = load_bundle(bundle)
    spec = guest_spec(doc, opts.container_id)
    share_rootfs(rootfs, share, opts.container_id)
    if opts.bundle is None:
        shutil.rmtree(work / "bundle", ignore_errors=True)

    vm = VM(arch=opts.arch, kernel=kernel, initrd=initrd, image=image,
            disk_mode="nvdimm" if opts.root == "nvdimm" else "virtio-blk",
            memory_mib=opts.memory_mib, cpus=opts.cpus, agent_socket=work / "agent.sock",
            share_dir=share, kernel_args=[*boot_arguments(opts.mode, opts.root),
                                          *opts.kernel_args],
            workdir=work)
    tail = ConsoleTail(vm.config.console_log, err_out) if opts.console else None
    client: AgentClient | None = None
    started = time.monotonic()
    vm.start()
    if tail is not None:
        tail.start()
    try:
        client = wait_for_agent(vm, work / "agent.sock", started, opts.boot_timeout)
        ready = time.monotonic() - started
        accel = resolve_accel(vm.config)
        how = "TCG, emulated" if accel == "tcg" else "KVM"
        err_out.write(f"agent ready after {ready:.2f} s from QEMU start ({how})\n".encode())
        err_out.flush()
        status, out, err = run_container(client, spec, opts.container_id, capture=capture,
                                         stdout=stdout, stderr=stderr)
        client.close()
        client = None
        if opts.keep:
            err_out.write(f"VM kept: pid={vm.pid} workdir={work} agent=unix-serial:"
                          f"{work / 'agent.sock'} qmp={vm.config.qmp_socket}\n".encode())
            return RunResult(status, ready, None, out, err)
        qemu_status = shut_down(vm)
        return RunResult(status, ready, qemu_status, out, err)
    except BaseException as err:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if not opts.keep:
            vm.stop()
        console = vm.console_text()[-6000:]
        err_out.write(f"--- guest console (tail) ---\n{console}\n--- end of console ---\n"
                      .encode(errors="replace"))
        err_out.flush()
        if isinstance(err, (grpc.RpcError, VMError, OSError)):
            raise RunError(_describe(err)) from err
        raise
    finally:
        if tail is not None:
            tail.stop()
        if own_workdir and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else ""
        return f"agent request failed: {code} {details}"
    return str(err)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kata-vm-run",
        description="Boot the guest image under QEMU and run one container in it through the "
        "agent; exits with the container's status (125 when the runner itself fails).",
    )
    p.add_argument("--arch", choices=ARCHES, default=_HOST_ARCH.get(platform.machine(), "x86_64"))
    p.add_argument("--mode", choices=MODES, default="systemd",
                   help="agent started by systemd, or the agent as PID 1")
    p.add_argument("--root", choices=ROOTS, default="initrd",
                   help="root filesystem: the initrd, the disk image on virtio-blk or on NVDIMM")
    p.add_argument("--build-dir", type=Path,
                   default=Path(os.environ.get("KATA_BUILD_DIR", "build")),
                   help="output of `make image` (default: ./build or $KATA_BUILD_DIR)")
    p.add_argument("--bundle", type=Path, help="OCI bundle (config.json + rootfs)")
    p.add_argument("--busybox", type=Path, default=Path("/bin/busybox"),
                   help="static busybox for the default bundle; must match --arch")
    p.add_argument("--id", dest="container_id", default="demo", help="container id")
    p.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--boot-timeout", type=float, default=300.0,
                   help="seconds for the agent to answer")
    p.add_argument("--append", action="append", default=[],
                   help="extra kernel command line (may repeat)")
    p.add_argument("--console", action="store_true", help="copy the guest console to stderr")
    p.add_argument("--keep", action="store_true",
                   help="leave the VM running after the container (for debugging)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("command", nargs="*",
                   help="command for the default busybox bundle (after --), or to override the "
                   "bundle's process.args")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = RunOptions(
        arch=args.arch, mode=args.mode, root=args.root, build_dir=args.build_dir,
        bundle=args.bundle, command=tuple(args.command), container_id=args.container_id,
        console=args.console, keep=args.keep, memory_mib=args.memory, cpus=args.cpus,
        boot_timeout=args.boot_timeout,
        kernel_args=tuple(word for chunk in args.append for word in chunk.split()),
        busybox=args.busybox,
    )
    try:
        result = run(opts)
    except (RunError, VMError) as err:
        sys.stderr.write(f"kata-vm-run: {err}\n")
        return RUNNER_FAILURE
    except KeyboardInterrupt:
        return 130
    if result.qemu_status not in (None, 0):
        log.warning("qemu exited with status %s", result.qemu_status)
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main())
