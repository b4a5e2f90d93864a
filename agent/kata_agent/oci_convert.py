"""agent.proto's ``grpc.Spec`` (and its parts) -> an OCI runtime-spec document (``dict``),
the input of ``engine.spec.Spec.from_oci``.

proto3 scalars have no presence: an OCI field the runtime left unset arrives as 0, "" or
false. Where the OCI meaning of zero is "not set" (memory limit, cpu shares, a device rule's
major/minor wildcard, ...) the field is left out of the document; where zero is a real
value (uid 0, an rlimit of 0) it is kept. Counts are bounded before anything is copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kata_agent.engine.errors import SpecError
from kata_agent.engine.spec import MAX_ITEMS, MAX_STR, Spec

OCI_VERSION_DEFAULT = "1.0.1"


def _count(items: Any, field: str, limit: int = MAX_ITEMS) -> list[Any]:
    seq = list(items)
    if len(seq) > limit:
        raise SpecError(f"{len(seq)} entries, at most {limit}", field=field)
    return seq


def _strings(items: Iterable[str], field: str) -> list[str]:
    out = _count(items, field)
    for i, s in enumerate(out):
        if len(s) > MAX_STR:
            raise SpecError(f"longer than {MAX_STR} characters", field=f"{field}[{i}]")
    return [str(s) for s in out]


def _map(m: Mapping[str, str], field: str) -> dict[str, str]:
    if len(m) > MAX_ITEMS:
        raise SpecError(f"{len(m)} entries, at most {MAX_ITEMS}", field=field)
    return {str(k): str(v) for k, v in m.items()}


def _set_nonzero(d: dict[str, Any], key: str, value: Any) -> None:
    if value:
        d[key] = value


# ------------------------------------------------------------------ process


def user_to_oci(u: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"uid": u.UID, "gid": u.GID}
    gids = _count(u.AdditionalGids, "process.user.additionalGids")
    if gids:
        d["additionalGids"] = [int(g) for g in gids]
    # Usernames cannot be resolved by the agent; the engine refuses them with a clear error.
    _set_nonzero(d, "username", u.Username)
    return d


def capabilities_to_oci(c: Any) -> dict[str, list[str]]:
    return {
        key: _strings(getattr(c, name), f"process.capabilities.{key}")
        for key, name in (("bounding", "Bounding"), ("effective", "Effective"),
                          ("inheritable", "Inheritable"), ("permitted", "Permitted"),
                          ("ambient", "Ambient"))
    }


def process_to_oci(p: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "terminal": p.Terminal,
        "user": user_to_oci(p.User),
        "args": _strings(p.Args, "process.args"),
        "env": _strings(p.Env, "process.env"),
        "cwd": p.Cwd or "/",
    }
    if p.HasField("ConsoleSize") and (p.ConsoleSize.Height or p.ConsoleSize.Width):
        d["consoleSize"] = {"height": p.ConsoleSize.Height, "width": p.ConsoleSize.Width}
    if p.HasField("Capabilities"):
        d["capabilities"] = capabilities_to_oci(p.Capabilities)
    rlimits = _count(p.Rlimits, "process.rlimits")
    if rlimits:
        d["rlimits"] = [{"type": r.Type, "hard": r.Hard, "soft": r.Soft} for r in rlimits]
    _set_nonzero(d, "noNewPrivileges", p.NoNewPrivileges)
    _set_nonzero(d, "apparmorProfile", p.ApparmorProfile)
    _set_nonzero(d, "selinuxLabel", p.SelinuxLabel)
    _set_nonzero(d, "oomScoreAdj", p.OOMScoreAdj)
    return d


# ------------------------------------------------------------------ resources


def _memory(m: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key, name in (("limit", "Limit"), ("reservation", "Reservation"), ("swap", "Swap"),
                      ("kernel", "Kernel"), ("kernelTCP", "KernelTCP"),
                      ("swappiness", "Swappiness")):
        _set_nonzero(d, key, getattr(m, name))
    _set_nonzero(d, "disableOOMKiller", m.DisableOOMKiller)
    return d


def _cpu(c: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key, name in (("shares", "Shares"), ("quota", "Quota"), ("period", "Period"),
                      ("realtimeRuntime", "RealtimeRuntime"),
                      ("realtimePeriod", "RealtimePeriod"), ("cpus", "Cpus"), ("mems", "Mems")):
        _set_nonzero(d, key, getattr(c, name))
    return d


def _throttle(items: Any, field: str) -> list[dict[str, int]]:
    return [{"major": t.Major, "minor": t.Minor, "rate": t.Rate}
            for t in _count(items, field)]


def _block_io(b: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    _set_nonzero(d, "weight", b.Weight)
    _set_nonzero(d, "leafWeight", b.LeafWeight)
    weights = []
    for w in _count(b.WeightDevice, "linux.resources.blockIO.weightDevice"):
        entry: dict[str, Any] = {"major": w.Major, "minor": w.Minor}
        _set_nonzero(entry, "weight", w.Weight)
        _set_nonzero(entry, "leafWeight", w.LeafWeight)
        weights.append(entry)
    if weights:
        d["weightDevice"] = weights
    for key, name in (("throttleReadBpsDevice", "ThrottleReadBpsDevice"),
                      ("throttleWriteBpsDevice", "ThrottleWriteBpsDevice"),
                      ("throttleReadIOPSDevice", "ThrottleReadIOPSDevice"),
                      ("throttleWriteIOPSDevice", "ThrottleWriteIOPSDevice")):
        rules = _throttle(getattr(b, name), f"linux.resources.blockIO.{key}")
        if rules:
            d[key] = rules
    return d


def device_rule_to_oci(r: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"allow": r.Allow, "access": r.Access or "rwm"}
    _set_nonzero(d, "type", r.Type)
    # No presence on the wire: a wildcard major/minor arrives as 0 (WIRE-FACTS).
    _set_nonzero(d, "major", r.Major)
    _set_nonzero(d, "minor", r.Minor)
    return d


def resources_to_oci(r: Any) -> dict[str, Any]:
    """``grpc.LinuxResources`` -> OCI ``linux.resources`` (also UpdateContainer's input)."""
    d: dict[str, Any] = {}
    devices = [device_rule_to_oci(x) for x in _count(r.Devices, "linux.resources.devices")]
    if devices:
        d["devices"] = devices
    if r.HasField("Memory"):
        mem = _memory(r.Memory)
        if mem:
            d["memory"] = mem
    if r.HasField("CPU"):
        cpu = _cpu(r.CPU)
        if cpu:
            d["cpu"] = cpu
    if r.HasField("Pids") and r.Pids.Limit:
        d["pids"] = {"limit": r.Pids.Limit}
    if r.HasField("BlockIO"):
        bio = _block_io(r.BlockIO)
        if bio:
            d["blockIO"] = bio
    huge = [{"pageSize": h.Pagesize, "limit": h.Limit}
            for h in _count(r.HugepageLimits, "linux.resources.hugepageLimits")]
    if huge:
        d["hugepageLimits"] = huge
    if r.HasField("Network"):
        net: dict[str, Any] = {}
        _set_nonzero(net, "classID", r.Network.ClassID)
        prios = [{"name": p.Name, "priority": p.Priority}
                 for p in _count(r.Network.Priorities, "linux.resources.network.priorities")]
        if prios:
            net["priorities"] = prios
        if net:
            d["network"] = net
    return d


# ------------------------------------------------------------------ linux


def _seccomp(s: Any) -> dict[str, Any]:
    syscalls = []
    for i, sc in enumerate(_count(s.Syscalls, "linux.seccomp.syscalls")):
        entry: dict[str, Any] = {
            "names": _strings(sc.Names, f"linux.seccomp.syscalls[{i}].names"),
            "action": sc.Action,
        }
        args = [{"index": a.Index, "value": a.Value, "valueTwo": a.ValueTwo, "op": a.Op}
                for a in _count(sc.Args, f"linux.seccomp.syscalls[{i}].args")]
        if args:
            entry["args"] = args
        syscalls.append(entry)
    d: dict[str, Any] = {"defaultAction": s.DefaultAction}
    arches = _strings(s.Architectures, "linux.seccomp.architectures")
    if arches:
        d["architectures"] = arches
    if syscalls:
        d["syscalls"] = syscalls
    return d


def _id_mappings(items: Any, field: str) -> list[dict[str, int]]:
    return [{"hostID": m.HostID, "containerID": m.ContainerID, "size": m.Size}
            for m in _count(items, field)]


def linux_to_oci(lx: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    uid_maps = _id_mappings(lx.UIDMappings, "linux.uidMappings")
    gid_maps = _id_mappings(lx.GIDMappings, "linux.gidMappings")
    if uid_maps:
        d["uidMappings"] = uid_maps
    if gid_maps:
        d["gidMappings"] = gid_maps
    sysctl = _map(lx.Sysctl, "linux.sysctl")
    if sysctl:
        d["sysctl"] = sysctl
    if lx.HasField("Resources"):
        d["resources"] = resources_to_oci(lx.Resources)
    _set_nonzero(d, "cgroupsPath", lx.CgroupsPath)
    d["namespaces"] = [
        {"type": n.Type, **({"path": n.Path} if n.Path else {})}
        for n in _count(lx.Namespaces, "linux.namespaces")
    ]
    devices = []
    for dev in _count(lx.Devices, "linux.devices"):
        entry: dict[str, Any] = {"path": dev.Path, "type": dev.Type, "major": dev.Major,
                                 "minor": dev.Minor, "uid": dev.UID, "gid": dev.GID}
        _set_nonzero(entry, "fileMode", dev.FileMode)
        devices.append(entry)
    if devices:
        d["devices"] = devices
    if lx.HasField("Seccomp") and (lx.Seccomp.DefaultAction or lx.Seccomp.Syscalls):
        d["seccomp"] = _seccomp(lx.Seccomp)
    _set_nonzero(d, "rootfsPropagation", lx.RootfsPropagation)
    masked = _strings(lx.MaskedPaths, "linux.maskedPaths")
    if masked:
        d["maskedPaths"] = masked
    readonly = _strings(lx.ReadonlyPaths, "linux.readonlyPaths")
    if readonly:
        d["readonlyPaths"] = readonly
    _set_nonzero(d, "mountLabel", lx.MountLabel)
    return d


# ------------------------------------------------------------------ spec


def _hooks(h: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in (("prestart", "Prestart"), ("poststart", "Poststart"),
                      ("poststop", "Poststop")):
        hooks = []
        for i, hook in enumerate(_count(getattr(h, name), f"hooks.{key}")):
            entry: dict[str, Any] = {"path": hook.Path}
            args = _strings(hook.Args, f"hooks.{key}[{i}].args")
            env = _strings(hook.Env, f"hooks.{key}[{i}].env")
            if args:
                entry["args"] = args
            if env:
                entry["env"] = env
            _set_nonzero(entry, "timeout", hook.Timeout)
            hooks.append(entry)
        if hooks:
            out[key] = hooks
    return out


def mount_to_oci(m: Any, field: str) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": m.destination}
    _set_nonzero(d, "source", m.source)
    _set_nonzero(d, "type", m.type)
    options = _strings(m.options, f"{field}.options")
    if options:
        d["options"] = options
    return d


def spec_to_oci(spec: Any) -> dict[str, Any]:
    """``grpc.Spec`` -> OCI document (a plain dict the agent may still adjust)."""
    d: dict[str, Any] = {"ociVersion": spec.Version or OCI_VERSION_DEFAULT}
    if spec.HasField("Process"):
        d["process"] = process_to_oci(spec.Process)
    if spec.HasField("Root"):
        d["root"] = {"path": spec.Root.Path, "readonly": spec.Root.Readonly}
    _set_nonzero(d, "hostname", spec.Hostname)
    d["mounts"] = [mount_to_oci(m, f"mounts[{i}]")
                   for i, m in enumerate(_count(spec.Mounts, "mounts"))]
    if spec.HasField("Hooks"):
        hooks = _hooks(spec.Hooks)
        if hooks:
            d["hooks"] = hooks
    annotations = _map(spec.Annotations, "annotations")
    if annotations:
        d["annotations"] = annotations
    d["linux"] = linux_to_oci(spec.Linux) if spec.HasField("Linux") else {}
    return d


def spec_from_pb(spec: Any) -> Spec:
    """``grpc.Spec`` -> the engine's typed spec (validated)."""
    return Spec.from_oci(spec_to_oci(spec))


# ------------------------------------------------------------------ OCI document -> grpc.Spec

# OCI keys whose protobuf field is not the same name up to letter case.
_RENAMED = {"ociVersion": "Version"}


def spec_to_proto(doc: Mapping[str, Any], message: Any) -> list[str]:
    """Fill ``message`` (an empty ``grpc.Spec``) from an OCI document (a bundle's config.json):
    the reverse of ``spec_to_oci``, what a host runtime sends. OCI and agent.proto differ only in
    letter case (``uidMappings``/``UIDMappings``) and ``ociVersion``. Returns the document's keys
    the protocol has no field for (``process.user.umask``, ``linux.seccomp.flags``...), which
    the caller may report; a value of the wrong type raises ``SpecError``."""
    dropped: list[str] = []
    _fill(doc, message, "", dropped)
    return dropped


def _fill(doc: Mapping[str, Any], message: Any, where: str, dropped: list[str]) -> None:
    if not isinstance(doc, Mapping):
        raise SpecError("expected an object", field=where or "spec")
    fields = {f.name.lower(): f for f in message.DESCRIPTOR.fields}
    for key, value in doc.items():
        path = f"{where}.{key}" if where else str(key)
        fd = fields.get(_RENAMED.get(key, str(key)).lower())
        if fd is None:
            dropped.append(path)
            continue
        if value is None:
            continue
        target = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target.update(_map(value, path) if isinstance(value, Mapping) else _bad(path))
        elif fd.is_repeated:
            if not isinstance(value, list):
                raise SpecError("expected a list", field=path)
            for i, item in enumerate(_count(value, path)):
                if fd.message_type is not None:
                    _fill(item, target.add(), f"{path}[{i}]", dropped)
                else:
                    target.append(_scalar(item, fd, f"{path}[{i}]"))
        elif fd.message_type is not None:
            _fill(value, target, path, dropped)
        else:
            setattr(message, fd.name, _scalar(value, fd, path))


def _bad(path: str) -> dict[str, str]:
    raise SpecError("expected an object", field=path)


def _scalar(value: Any, fd: Any, path: str) -> Any:
    kind = type(getattr(fd, "default_value", ""))
    if kind is bool:
        if not isinstance(value, bool):
            raise SpecError("expected true or false", field=path)
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError("expected an integer", field=path)
        return value
    if not isinstance(value, str):
        raise SpecError("expected a string", field=path)
    if len(value) > MAX_STR:
        raise SpecError(f"longer than {MAX_STR} characters", field=path)
    return value
