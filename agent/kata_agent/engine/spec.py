"""Typed, validated view of an OCI runtime spec (config.json, runtime-spec 1.x, Linux).

The host is untrusted: every field is type-checked, every repeated field is bounded and every
error names the offending field path. Capabilities, rlimits, resources, seccomp and hooks
are parsed by their own modules (caps, rlimits, resources, seccomp, hooks), imported when a
spec actually uses them.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kata_agent.engine.errors import SpecError
from kata_agent.engine.ids import ID_RE as ID_RE
from kata_agent.engine.ids import MAX_ID as MAX_ID
from kata_agent.engine.ids import validate_id as validate_id

MAX_ITEMS = 4096  # bound for every repeated field (mounts, env, args, devices...)
MAX_STR = 65536  # bound for any single string
MAX_PATH = 4096

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
MOUNT_TYPES = frozenset({
    "bind", "rbind", "none", "tmpfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2",
    "ramfs", "overlay", "securityfs", "debugfs", "tracefs", "hugetlbfs", "binfmt_misc",
    "fusectl", "configfs", "pstore", "bpf", "efivarfs", "ext4", "xfs", "btrfs", "vfat",
    "9p", "virtiofs", "squashfs", "iso9660", "fuse",
})
DEVICE_TYPES = ("c", "b", "u", "p")


def _f(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _obj(d: object, field_name: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise SpecError("must be an object", field=field_name)
    return d


def _str(d: Mapping[str, Any], key: str, prefix: str, default: str | None = None,
         *, max_len: int = MAX_STR) -> str:
    v = d.get(key, default)
    if v is None:
        raise SpecError("is required", field=_f(prefix, key))
    if not isinstance(v, str):
        raise SpecError("must be a string", field=_f(prefix, key))
    if len(v) > max_len or "\x00" in v:
        raise SpecError("too long or contains NUL", field=_f(prefix, key))
    return v


def _int(d: Mapping[str, Any], key: str, prefix: str, default: int | None = None, *,
         lo: int = -(2**63), hi: int = 2**64 - 1) -> int:
    v = d.get(key, default)
    if v is None:
        raise SpecError("is required", field=_f(prefix, key))
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError("must be an integer", field=_f(prefix, key))
    if not lo <= v <= hi:
        raise SpecError(f"out of range [{lo}, {hi}]", field=_f(prefix, key))
    return v


def _bool(d: Mapping[str, Any], key: str, prefix: str, default: bool = False) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise SpecError("must be a boolean", field=_f(prefix, key))
    return v


def _list(d: Mapping[str, Any], key: str, prefix: str) -> Sequence[Any]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise SpecError("must be an array", field=_f(prefix, key))
    if len(v) > MAX_ITEMS:
        raise SpecError(f"more than {MAX_ITEMS} entries", field=_f(prefix, key))
    return v


def _str_list(d: Mapping[str, Any], key: str, prefix: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(_list(d, key, prefix)):
        if not isinstance(v, str) or len(v) > MAX_STR or "\x00" in v:
            raise SpecError("must be a string without NUL", field=f"{_f(prefix, key)}[{i}]")
        out.append(v)
    return tuple(out)


def _str_map(d: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, str]:
    v = d.get(key)
    if v is None:
        return {}
    m = _obj(v, _f(prefix, key))
    if len(m) > MAX_ITEMS:
        raise SpecError(f"more than {MAX_ITEMS} entries", field=_f(prefix, key))
    for k, val in m.items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise SpecError("keys and values must be strings", field=f"{_f(prefix, key)}.{k}")
    return dict(m)


def _abs_path(d: Mapping[str, Any], key: str, prefix: str, default: str | None = None) -> str:
    p = _str(d, key, prefix, default, max_len=MAX_PATH)
    if not p.startswith("/"):
        raise SpecError(f"{p!r} must be an absolute path", field=_f(prefix, key))
    return p


def _leaf(module: str, cls: str, d: object, field_name: str) -> Any:
    """Parse a sub-tree with the module that owns it (caps, rlimits, resources...)."""
    try:
        mod = importlib.import_module(f"kata_agent.engine.{module}")
    except ImportError as e:
        raise SpecError(f"not supported by this engine build ({e})", field=field_name) from e
    return getattr(mod, cls).from_oci(d, field_name)


@dataclass(frozen=True, slots=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> User:
        d = _obj(d, field)
        gids = []
        for i, g in enumerate(_list(d, "additionalGids", field)):
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 2**32 - 1:
                raise SpecError("must be a gid", field=f"{field}.additionalGids[{i}]")
            gids.append(g)
        umask = d.get("umask")
        if umask is not None:
            umask = _int(d, "umask", field, lo=0, hi=0o777)
        if "username" in d:
            raise SpecError("not supported on Linux", field=f"{field}.username")
        return cls(uid=_int(d, "uid", field, 0, lo=0, hi=2**32 - 2),
                   gid=_int(d, "gid", field, 0, lo=0, hi=2**32 - 2),
                   umask=umask, additional_gids=tuple(gids))


@dataclass(frozen=True, slots=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: User = field(default_factory=User)
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    capabilities: Any = None  # engine.caps.Capabilities
    rlimits: tuple[Any, ...] = ()  # engine.rlimits.Rlimit
    no_new_privileges: bool = False
    apparmor_profile: str = ""
    selinux_label: str = ""
    oom_score_adj: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Process:
        d = _obj(d, field)
        args = _str_list(d, "args", field)
        if not args or not args[0]:
            raise SpecError("must name a program to run", field=f"{field}.args")
        env = _str_list(d, "env", field)
        for i, e in enumerate(env):
            if "=" not in e or e.startswith("="):
                raise SpecError(f"{e!r} is not NAME=value", field=f"{field}.env[{i}]")
        cs = d.get("consoleSize")
        console_size = None
        if cs is not None:
            cs = _obj(cs, f"{field}.consoleSize")
            console_size = (_int(cs, "height", f"{field}.consoleSize", lo=0, hi=65535),
                            _int(cs, "width", f"{field}.consoleSize", lo=0, hi=65535))
        caps = d.get("capabilities")
        rlimits = tuple(_leaf("rlimits", "Rlimit", r, f"{field}.rlimits[{i}]")
                        for i, r in enumerate(_list(d, "rlimits", field)))
        oom = d.get("oomScoreAdj")
        return cls(
            args=args,
            env=env,
            cwd=_abs_path(d, "cwd", field, "/"),
            user=User.from_oci(d.get("user", {}), f"{field}.user"),
            terminal=_bool(d, "terminal", field),
            console_size=console_size,
            capabilities=None if caps is None else _leaf("caps", "Capabilities", caps,
                                                         f"{field}.capabilities"),
            rlimits=rlimits,
            no_new_privileges=_bool(d, "noNewPrivileges", field),
            apparmor_profile=_str(d, "apparmorProfile", field, ""),
            selinux_label=_str(d, "selinuxLabel", field, ""),
            oom_score_adj=None if oom is None else _int(d, "oomScoreAdj", field, lo=-1000,
                                                         hi=1000),
            raw=dict(d),
        )

    def env_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.env:
            k, _, v = e.partition("=")
            out[k] = v
        return out


@dataclass(frozen=True, slots=True)
class Root:
    path: str
    readonly: bool = False

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Root:
        d = _obj(d, field)
        path = _str(d, "path", field, max_len=MAX_PATH)
        if not path:
            raise SpecError("is required", field=f"{field}.path")
        return cls(path=path, readonly=_bool(d, "readonly", field))


@dataclass(frozen=True, slots=True)
class Mount:
    destination: str
    type: str = "none"
    source: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Mount:
        d = _obj(d, field)
        dest = _abs_path(d, "destination", field)
        options = _str_list(d, "options", field)
        mtype = _str(d, "type", field, "none")
        is_bind = "bind" in options or "rbind" in options
        if mtype not in MOUNT_TYPES:
            raise SpecError(f"unknown mount type {mtype!r}", field=f"{field}.type")
        if mtype in ("bind", "rbind", "none") and not is_bind and mtype != "none":
            options = (*options, "rbind" if mtype == "rbind" else "bind")
        if mtype == "none" and not is_bind:
            raise SpecError("type none needs a bind or rbind option", field=f"{field}.type")
        return cls(destination=dest, type=mtype, source=_str(d, "source", field, ""),
                   options=options)

    @property
    def is_bind(self) -> bool:
        return "bind" in self.options or "rbind" in self.options


@dataclass(frozen=True, slots=True)
class Namespace:
    type: str
    path: str = ""

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Namespace:
        d = _obj(d, field)
        t = _str(d, "type", field)
        if t not in NAMESPACE_TYPES:
            raise SpecError(f"unknown namespace type {t!r}", field=f"{field}.type")
        path = _str(d, "path", field, "", max_len=MAX_PATH)
        if path and not path.startswith("/"):
            raise SpecError("must be an absolute path", field=f"{field}.path")
        return cls(type=t, path=path)


@dataclass(frozen=True, slots=True)
class IDMapping:
    container_id: int
    host_id: int
    size: int

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> IDMapping:
        d = _obj(d, field)
        return cls(container_id=_int(d, "containerID", field, lo=0, hi=2**32 - 1),
                   host_id=_int(d, "hostID", field, lo=0, hi=2**32 - 1),
                   size=_int(d, "size", field, lo=1, hi=2**32 - 1))


@dataclass(frozen=True, slots=True)
class Device:
    path: str
    type: str
    major: int = 0
    minor: int = 0
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Device:
        d = _obj(d, field)
        path = _abs_path(d, "path", field)
        if not os.path.normpath(path).startswith("/dev/"):
            raise SpecError("devices must live under /dev", field=f"{field}.path")
        t = _str(d, "type", field)
        if t not in DEVICE_TYPES:
            raise SpecError(f"unknown device type {t!r}", field=f"{field}.type")
        needs_numbers = t != "p"
        return cls(path=path, type=t,
                   major=_int(d, "major", field, None if needs_numbers else 0, lo=0,
                              hi=2**32 - 1),
                   minor=_int(d, "minor", field, None if needs_numbers else 0, lo=0,
                              hi=2**32 - 1),
                   file_mode=_int(d, "fileMode", field, 0o666, lo=0, hi=0o7777),
                   uid=_int(d, "uid", field, 0, lo=0, hi=2**32 - 2),
                   gid=_int(d, "gid", field, 0, lo=0, hi=2**32 - 2))


@dataclass(frozen=True, slots=True)
class Linux:
    namespaces: tuple[Namespace, ...] = ()
    uid_mappings: tuple[IDMapping, ...] = ()
    gid_mappings: tuple[IDMapping, ...] = ()
    devices: tuple[Device, ...] = ()
    cgroups_path: str = ""
    resources: Any = None  # engine.resources.LinuxResources
    rootfs_propagation: str = ""
    seccomp: Any = None  # engine.seccomp.Seccomp
    sysctl: Mapping[str, str] = field(default_factory=dict)
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    mount_label: str = ""

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str) -> Linux:
        d = _obj(d, field)
        nss = tuple(Namespace.from_oci(n, f"{field}.namespaces[{i}]")
                    for i, n in enumerate(_list(d, "namespaces", field)))
        seen: set[str] = set()
        for i, n in enumerate(nss):
            if n.type in seen:
                raise SpecError(f"duplicate namespace {n.type!r}",
                                field=f"{field}.namespaces[{i}].type")
            seen.add(n.type)
        prop = _str(d, "rootfsPropagation", field, "")
        if prop not in ("", "private", "rprivate", "slave", "rslave", "shared", "rshared",
                        "unbindable", "runbindable"):
            raise SpecError(f"unknown propagation {prop!r}", field=f"{field}.rootfsPropagation")
        res = d.get("resources")
        sec = d.get("seccomp")
        masked = _str_list(d, "maskedPaths", field)
        ro = _str_list(d, "readonlyPaths", field)
        for name, paths in (("maskedPaths", masked), ("readonlyPaths", ro)):
            for i, p in enumerate(paths):
                if not p.startswith("/"):
                    raise SpecError("must be an absolute path", field=f"{field}.{name}[{i}]")
        uid_maps = tuple(IDMapping.from_oci(m, f"{field}.uidMappings[{i}]")
                         for i, m in enumerate(_list(d, "uidMappings", field)))
        gid_maps = tuple(IDMapping.from_oci(m, f"{field}.gidMappings[{i}]")
                         for i, m in enumerate(_list(d, "gidMappings", field)))
        if (uid_maps or gid_maps) and "user" not in seen:
            raise SpecError("id mappings need a user namespace", field=f"{field}.uidMappings")
        return cls(
            namespaces=nss,
            uid_mappings=uid_maps,
            gid_mappings=gid_maps,
            devices=tuple(Device.from_oci(x, f"{field}.devices[{i}]")
                          for i, x in enumerate(_list(d, "devices", field))),
            cgroups_path=_str(d, "cgroupsPath", field, "", max_len=MAX_PATH),
            resources=None if res is None else _leaf("resources", "LinuxResources", res,
                                                     f"{field}.resources"),
            rootfs_propagation=prop,
            seccomp=None if sec is None else _leaf("seccomp", "Seccomp", sec, f"{field}.seccomp"),
            sysctl=_str_map(d, "sysctl", field),
            masked_paths=masked,
            readonly_paths=ro,
            mount_label=_str(d, "mountLabel", field, ""),
        )

    def namespace(self, t: str) -> Namespace | None:
        for n in self.namespaces:
            if n.type == t:
                return n
        return None


# Sysctls a container may set, and the namespace that must be private for it (what runc
# allows): anything else would change the host kernel for everyone.
_SYSCTL_IPC = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
               "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")


def sysctl_path(key: str) -> str:
    """``net.ipv4.conf.eth0/100.forwarding`` -> ``net/ipv4/conf/eth0.100/forwarding``
    (sysctl(8) notation: a "/" in a key stands for a "." in a name)."""
    parts = key.replace("/", "\0").split(".")
    comps = [p.replace("\0", ".") for p in parts]
    # No component may walk the path: a key like "net.x//.." must not reach other /proc files.
    if len(comps) < 2 or any(c in ("", ".", "..") for c in comps):
        raise SpecError(f"invalid sysctl key {key!r}", field=f"linux.sysctl.{key}")
    return "/".join(comps)


def sysctl_namespace(key: str) -> str | None:
    if key in _SYSCTL_IPC or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net."):
        return "network"
    if key in ("kernel.hostname", "kernel.domainname"):
        return "uts"
    return None


@dataclass(frozen=True, slots=True)
class Spec:
    oci_version: str
    root: Root
    process: Process | None = None
    mounts: tuple[Mount, ...] = ()
    hostname: str = ""
    domainname: str = ""
    linux: Linux = field(default_factory=Linux)
    hooks: Any = None  # engine.hooks.Hooks
    annotations: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_oci(cls, d: Mapping[str, Any], field: str = "") -> Spec:
        d = _obj(d, field or "config")
        if "root" not in d:
            raise SpecError("is required", field=_f(field, "root"))
        proc = d.get("process")
        linux = Linux.from_oci(d.get("linux", {}), _f(field, "linux"))
        hooks = d.get("hooks")
        hostname = _str(d, "hostname", field, "", max_len=64)
        if hostname and linux.namespace("uts") is None:
            raise SpecError("setting a hostname needs a uts namespace",
                            field=_f(field, "hostname"))
        for key in linux.sysctl:
            sysctl_path(key)
            ns = sysctl_namespace(key)
            if ns is None:
                raise SpecError(f"sysctl {key!r} is not namespaced",
                                field=_f(field, f"linux.sysctl.{key}"))
            if linux.namespace(ns) is None:
                raise SpecError(f"sysctl {key!r} needs a {ns} namespace",
                                field=_f(field, f"linux.sysctl.{key}"))
        return cls(
            oci_version=_str(d, "ociVersion", field, ""),
            root=Root.from_oci(d["root"], _f(field, "root")),
            process=None if proc is None else Process.from_oci(proc, _f(field, "process")),
            mounts=tuple(Mount.from_oci(m, f"{_f(field, 'mounts')}[{i}]")
                         for i, m in enumerate(_list(d, "mounts", field))),
            hostname=hostname,
            domainname=_str(d, "domainname", field, "", max_len=64),
            linux=linux,
            hooks=None if hooks is None else _leaf("hooks", "Hooks", hooks, _f(field, "hooks")),
            annotations=_str_map(d, "annotations", field),
            raw=dict(d),
        )

    @classmethod
    def load(cls, bundle_dir: str) -> Spec:
        path = os.path.join(bundle_dir, "config.json")
        try:
            with open(path, "rb") as f:
                data = f.read(16 * 1024 * 1024 + 1)
        except FileNotFoundError as e:
            raise SpecError(f"no config.json in bundle {bundle_dir!r}", field="config") from e
        if len(data) > 16 * 1024 * 1024:
            raise SpecError("config.json larger than 16 MiB", field="config")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise SpecError(f"config.json is not JSON: {e}", field="config") from e
        return cls.from_oci(doc)

    def rootfs_path(self, bundle: str | None) -> str:
        if os.path.isabs(self.root.path) or bundle is None:
            return self.root.path
        return os.path.join(bundle, self.root.path)


def default_spec(*, rootless: bool = False) -> dict[str, Any]:
    """The config.json ``kata-oci spec`` writes (what ``runc spec`` writes)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: list(caps) for k in
                             ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount",
                                                 "cgroup")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if rootless:
        spec["linux"]["namespaces"].append({"type": "user"})
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": os.getuid(), "size": 1}]
        spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": os.getgid(), "size": 1}]
        del spec["linux"]["resources"]
    return spec
