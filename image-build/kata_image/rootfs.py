"""Root filesystem: Debian bookworm by mkosi, plus the agent, its pinned wheels and units.

Python packages are staged on the build host (wheels unpacked, bytecode compiled for 3.11)
and handed to mkosi as an extra tree, so no target code runs for them. Debian's package
scripts do run in the target; for a foreign architecture that needs qemu-user-static and a
binfmt_misc entry with the F flag (registered here when missing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .common import REPO, Arch, hash_inputs, host_arch, run

log = logging.getLogger(__name__)

MKOSI_VERSION = "24.3"
MKOSI_SUITE = "bookworm-backports"
MKOSI_MIRROR = "http://deb.debian.org/debian"
GUEST_PYTHON = "3.11"
SITE_PACKAGES = f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"
SYSTEMD_UNIT_DIR = "usr/lib/systemd/system"
AGENT_LAUNCHER = "usr/bin/kata-agent"
DEFAULT_TARGET = "kata-containers.target"

# Pinned requirements taken from Debian instead of PyPI, with the reason.
FROM_DEBIAN = {"python-prctl": "python3-prctl (Debian 1.8.1, no wheels on PyPI)"}
# Pinned requirements the guest does without, with the reason (a test checks that the
# agent never imports them).
HOST_ONLY = {"grpcio": "the host-side client and tools; the agent serves with h2server"}


def wheel_project(wheel: Path) -> str:
    """The normalized project name of a wheel file (``grpcio-1.2-cp311-...whl`` -> grpcio)."""
    return wheel.name.split("-", 1)[0].lower().replace("_", "-")


def guest_pins() -> list[str]:
    """``name==version`` of every pin the guest gets from PyPI."""
    return [f"{name}=={version}" for name, version in sorted(pinned_requirements().items())
            if name not in FROM_DEBIAN and name not in HOST_ONLY]

# Units a Kata guest does not need; masked so nothing pulls them in.
MASKED_UNITS = (
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
    "systemd-journal-flush.service",
    "systemd-random-seed.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-logind.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "ldconfig.service",
    "systemd-pstore.service",
    "systemd-tmpfiles-clean.timer",
    "fstrim.timer",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
)


@dataclass(frozen=True, slots=True)
class RootfsPaths:
    work: Path  # build/<arch>/work
    wheels: Path
    stage: Path
    mkosi_out: Path
    mkosi_cache: Path
    stamp: Path

    @property
    def rootfs(self) -> Path:
        return self.mkosi_out / "rootfs"

    @property
    def mkosi_manifest(self) -> Path:
        return self.mkosi_out / "rootfs.manifest"

    @classmethod
    def for_build(cls, build_dir: Path) -> RootfsPaths:
        work = build_dir / "work"
        return cls(work, work / "wheels", work / "stage", work / "mkosi-out",
                   work / "mkosi-cache", work / "rootfs.inputs")


def pinned_requirements() -> dict[str, str]:
    """name -> exact version from requirements.txt."""
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"requirements.txt: {line!r} is not an exact pin")
        pins[name.strip().lower()] = version.strip()
    return pins


def project_metadata() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert isinstance(project, dict)
    return project


def inputs_hash(arch: Arch, epoch: int) -> str:
    """Everything the rootfs is made from; an unchanged hash means no rebuild."""
    return hash_inputs(
        [REPO / "rootfs", REPO / "systemd", REPO / "agent" / "kata_agent",
         REPO / "pyproject.toml", REPO / "requirements.txt",
         Path(__file__).resolve(), Path(__file__).resolve().parent / "common.py"],
        [arch.name, str(epoch), MKOSI_VERSION],
    )


def ensure_mkosi(cache: Path) -> Path:
    """mkosi from bookworm-backports, unpacked (not installed) under cache; returns its site dir."""
    site = cache / "root" / "usr" / "lib" / "python3" / "dist-packages"
    if (site / "mkosi" / "__main__.py").exists():
        return site
    log.info("step=fetch-mkosi version=%s suite=%s", MKOSI_VERSION, MKOSI_SUITE)
    cache.mkdir(parents=True, exist_ok=True)
    lists = cache / "apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    sources = cache / "sources.list"
    sources.write_text(f"deb {MKOSI_MIRROR} {MKOSI_SUITE} main\n")
    # A private source list and lists folder: the host's apt configuration stays untouched.
    apt_opts = [f"-oDir::Etc::sourcelist={sources}", "-oDir::Etc::sourceparts=-",
                f"-oDir::State::Lists={lists}", "-oAPT::Sandbox::User=root"]
    run(["apt-get", *apt_opts, "update"])
    run(["apt-get", *apt_opts, "download", f"mkosi={MKOSI_VERSION}-1~bpo12+1"], cwd=cache)
    debs = sorted(cache.glob("mkosi_*.deb"))
    if not debs:
        raise RuntimeError("apt-get download produced no mkosi package")
    run(["dpkg-deb", "-x", debs[-1], cache / "root"])
    return site


def ensure_binfmt(arch: Arch) -> None:
    """Register qemu-user for a foreign target so Debian's package scripts can run."""
    if arch == host_arch():
        return
    misc = Path("/proc/sys/fs/binfmt_misc")
    if (misc / arch.qemu_user).exists():
        return
    conf = Path("/usr/lib/binfmt.d") / f"{arch.qemu_user}.conf"
    if not conf.exists():
        raise RuntimeError(
            f"host capability missing: {conf} (apt-get install qemu-user-static) "
            f"to build an {arch.name} rootfs on {host_arch().name}")
    if not (misc / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)])
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    log.info("step=binfmt register=%s", arch.qemu_user)
    (misc / "register").write_text(line)


def fetch_wheels(arch: Arch, wheels: Path) -> None:
    """Target-platform wheels for every pin not taken from Debian (with their dependencies)."""
    wanted = guest_pins()
    wheels.mkdir(parents=True, exist_ok=True)
    run([Path(sys.executable).parent / "pip", "download", "--quiet", "--only-binary=:all:",
         "--platform", arch.wheel_platform, "--python-version", GUEST_PYTHON,
         "--implementation", "cp", "--abi", "cp" + GUEST_PYTHON.replace(".", ""),
         "--dest", wheels, *wanted])


def build_agent_wheel(out: Path) -> Path:
    """Wheel of the agent built from a private copy of the sources (the tree stays clean)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kata-agent-src-") as tmp:
        src = Path(tmp)
        shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
        shutil.copytree(REPO / "agent" / "kata_agent", src / "agent" / "kata_agent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run([Path(sys.executable).parent / "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "--wheel-dir", out, src])
    built = sorted(out.glob("*.whl"))
    if len(built) != 1:
        raise RuntimeError(f"expected one agent wheel in {out}, found {built}")
    return built[0]


def launcher_text() -> str:
    """/usr/bin/kata-agent: the console script for the guest's python3, shell-free for init=.

    As PID 1 it first makes the bare kernel environment usable (initmode) and guarantees a
    power-off instead of a kernel panic whenever the agent returns or fails. initmode's
    ``waitpid(-1)`` reaper stays off: the agent forks its zygote single-threaded and collects
    container exit statuses through pidfds (sandbox.Reaper) and its subprocesses' through
    ``subprocess``; a catch-all reaper would take those statuses first. Orphans reach the
    agent as they do in systemd mode, where it is the child subreaper of its tree.
    """
    scripts = project_metadata().get("scripts")
    assert isinstance(scripts, dict)
    target = str(scripts["kata-agent"])
    module, _, func = target.partition(":")
    # -I: no environment or current-directory influence on imports; -u: unbuffered logs.
    return (
        "#!/usr/bin/python3 -Iu\n"
        "import os\n"
        "import sys\n"
        "if os.getpid() == 1:\n"
        "    from kata_agent import initmode\n"
        "    initmode.setup_pid1(start_reaper=False)\n"
        f"    from {module} import {func}\n"
        f"    initmode.run_as_init({func})\n"
        f"from {module} import {func}\n"
        f"sys.exit({func}())\n"
    )


def stage_tree(arch: Arch, paths: RootfsPaths, agent_wheel: Path) -> None:
    """The extra tree mkosi copies into the image last."""
    stage = paths.stage
    if stage.exists():
        shutil.rmtree(stage)
    site = stage / SITE_PACKAGES
    site.mkdir(parents=True)
    # A wheel directory kept from an earlier build may still hold a host-only one.
    wheels = [*sorted(w for w in paths.wheels.glob("*.whl") if wheel_project(w) not in HOST_ONLY),
              agent_wheel]
    run([Path(sys.executable).parent / "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-compile", "--target", site, "--platform", arch.wheel_platform,
         "--python-version", GUEST_PYTHON, "--implementation", "cp",
         "--abi", "cp" + GUEST_PYTHON.replace(".", ""), "--only-binary=:all:", *wheels])
    # Console scripts pip wrote name the build host's interpreter; the guest gets its own.
    shutil.rmtree(site / "bin", ignore_errors=True)
    compile_bytecode(stage, site)

    launcher = stage / AGENT_LAUNCHER
    launcher.parent.mkdir(parents=True)
    launcher.write_text(launcher_text())
    launcher.chmod(0o755)

    units = stage / SYSTEMD_UNIT_DIR
    units.mkdir(parents=True)
    for unit in sorted((REPO / "systemd").iterdir()):
        if unit.suffix in (".service", ".target", ".socket", ".mount"):
            shutil.copy2(unit, units / unit.name)
            (units / unit.name).chmod(0o644)

    etc_units = stage / "etc" / "systemd" / "system"
    etc_units.mkdir(parents=True)
    (etc_units / "default.target").symlink_to(f"/{SYSTEMD_UNIT_DIR}/{DEFAULT_TARGET}")
    for name in MASKED_UNITS:
        (etc_units / name).symlink_to("/dev/null")

    # The kernel runs /init from an initramfs; systemd then boots the normal (non-initrd) way.
    (stage / "init").symlink_to("/usr/lib/systemd/systemd")

    extra = REPO / "rootfs" / "extra"
    if extra.is_dir():
        shutil.copytree(extra, stage, symlinks=True, dirs_exist_ok=True)


def compile_bytecode(stage: Path, site: Path) -> None:
    """Bytecode compiled on the host (same 3.11 magic), recorded with guest paths."""
    result = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode",
         "unchecked-hash", "-s", str(stage), "-p", "/", str(site)],
        check=False, capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("step=compileall rc=%d output=%s", result.returncode,
                    result.stdout[-2000:] + result.stderr[-2000:])


def run_mkosi(arch: Arch, paths: RootfsPaths, epoch: int, mkosi_site: Path) -> None:
    paths.mkosi_out.mkdir(parents=True, exist_ok=True)
    paths.mkosi_cache.mkdir(parents=True, exist_ok=True)
    workspace = paths.work / "mkosi-workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    run(["/usr/bin/python3", "-m", "mkosi",
         "--directory", REPO / "rootfs",
         "--architecture", arch.mkosi,
         "--output-dir", paths.mkosi_out,
         "--cache-dir", paths.mkosi_cache,
         "--workspace-dir", workspace,
         "--source-date-epoch", str(epoch),
         "--incremental", "yes",
         "--extra-tree", paths.stage,
         "--force", "build"],
        env={"PYTHONPATH": str(mkosi_site), "SOURCE_DATE_EPOCH": str(epoch)})


def finalize(rootfs: Path, epoch: int) -> None:
    """Touches mkosi does not make: empty machine-id (systemd mounts a transient one)."""
    machine_id = rootfs / "etc" / "machine-id"
    machine_id.write_text("")
    os.utime(machine_id, (epoch, epoch))


def build_rootfs(arch: Arch, build_dir: Path, epoch: int, cache: Path,
                 force: bool = False) -> Path:
    paths = RootfsPaths.for_build(build_dir)
    digest = inputs_hash(arch, epoch)
    if (not force and paths.rootfs.is_dir() and paths.stamp.exists()
            and paths.stamp.read_text().strip() == digest):
        log.info("step=rootfs status=up-to-date hash=%s", digest[:12])
        return paths.rootfs
    log.info("step=rootfs status=building arch=%s hash=%s", arch.name, digest[:12])
    paths.stamp.unlink(missing_ok=True)
    mkosi_site = ensure_mkosi(cache / "mkosi")
    ensure_binfmt(arch)
    log.info("step=wheels arch=%s", arch.name)
    fetch_wheels(arch, paths.wheels)
    log.info("step=agent-wheel")
    agent_wheel = build_agent_wheel(paths.work / "agent-wheel")
    log.info("step=stage")
    stage_tree(arch, paths, agent_wheel)
    log.info("step=mkosi (slow: package download and install)")
    run_mkosi(arch, paths, epoch, mkosi_site)
    finalize(paths.rootfs, epoch)
    paths.stamp.write_text(digest + "\n")
    log.info("step=rootfs status=done path=%s", paths.rootfs)
    return paths.rootfs


def package_versions(manifest: Path) -> dict[str, str]:
    """Debian package -> version from mkosi's JSON manifest."""
    data = json.loads(manifest.read_text())
    out: dict[str, str] = {}
    for pkg in data.get("packages", []):
        out[str(pkg["name"])] = str(pkg["version"])
    return out
