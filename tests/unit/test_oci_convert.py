"""grpc.Spec (protobuf) -> OCI document -> engine Spec."""

from __future__ import annotations

import pytest
from kata_agent import oci_convert
from kata_agent.engine.errors import SpecError
from kata_agent.engine.resources import LinuxResources
from kata_agent.engine.spec import MAX_ITEMS
from kata_agent.protocol import oci_pb2


def full_spec() -> oci_pb2.Spec:
    s = oci_pb2.Spec(Version="1.0.1", Hostname="pod")
    s.Process.Terminal = True
    s.Process.ConsoleSize.Height = 24
    s.Process.ConsoleSize.Width = 80
    s.Process.User.UID = 1000
    s.Process.User.GID = 100
    s.Process.User.AdditionalGids.extend([5, 6])
    s.Process.Args.extend(["/bin/sh", "-c", "echo hi"])
    s.Process.Env.append("PATH=/bin")
    s.Process.Cwd = "/tmp"
    s.Process.Capabilities.Bounding.append("CAP_KILL")
    s.Process.Capabilities.Effective.append("CAP_KILL")
    s.Process.Rlimits.add(Type="RLIMIT_NOFILE", Hard=1024, Soft=512)
    s.Process.NoNewPrivileges = True
    s.Process.OOMScoreAdj = -5
    s.Root.Path = "/run/kata-containers/shared/containers/c1/rootfs"
    s.Root.Readonly = True
    s.Mounts.add(destination="/proc", source="proc", type="proc")
    s.Mounts.add(destination="/dev", source="tmpfs", type="tmpfs",
                 options=["nosuid", "mode=755"])
    s.Annotations["io.kubernetes.cri.container-type"] = "container"
    lx = s.Linux
    lx.Sysctl["net.ipv4.ip_forward"] = "1"
    lx.CgroupsPath = "/kubepods/c1"
    lx.Namespaces.add(Type="ipc")
    lx.Namespaces.add(Type="uts", Path="/host/ns/uts")
    lx.Namespaces.add(Type="mount")
    lx.Namespaces.add(Type="network")
    lx.Devices.add(Path="/dev/vda", Type="b", Major=254, Minor=0, FileMode=0o660)
    lx.Resources.Memory.Limit = 256 << 20
    lx.Resources.CPU.Shares = 512
    lx.Resources.CPU.Quota = 50000
    lx.Resources.CPU.Period = 100000
    lx.Resources.Pids.Limit = 100
    lx.Resources.Devices.add(Allow=False, Access="rwm")
    lx.Resources.Devices.add(Allow=True, Type="c", Major=1, Minor=3, Access="rw")
    lx.MaskedPaths.append("/proc/kcore")
    lx.ReadonlyPaths.append("/proc/sys")
    lx.Seccomp.DefaultAction = "SCMP_ACT_ALLOW"
    lx.Seccomp.Syscalls.add(Names=["mount"], Action="SCMP_ACT_ERRNO")
    s.Hooks.Prestart.add(Path="/bin/true", Args=["true"], Timeout=5)
    return s


def test_full_spec_maps_to_oci_names() -> None:
    d = oci_convert.spec_to_oci(full_spec())
    assert d["ociVersion"] == "1.0.1" and d["hostname"] == "pod"
    p = d["process"]
    assert p["terminal"] is True and p["consoleSize"] == {"height": 24, "width": 80}
    assert p["user"] == {"uid": 1000, "gid": 100, "additionalGids": [5, 6]}
    assert p["args"] == ["/bin/sh", "-c", "echo hi"] and p["cwd"] == "/tmp"
    assert p["capabilities"]["bounding"] == ["CAP_KILL"]
    assert p["capabilities"]["ambient"] == []
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]
    assert p["noNewPrivileges"] is True and p["oomScoreAdj"] == -5
    assert "username" not in p["user"] and "apparmorProfile" not in p
    assert d["root"] == {"path": "/run/kata-containers/shared/containers/c1/rootfs",
                         "readonly": True}
    assert d["mounts"][0] == {"destination": "/proc", "source": "proc", "type": "proc"}
    assert d["mounts"][1]["options"] == ["nosuid", "mode=755"]
    lx = d["linux"]
    assert lx["namespaces"] == [{"type": "ipc"}, {"type": "uts", "path": "/host/ns/uts"},
                                {"type": "mount"}, {"type": "network"}]
    assert lx["devices"][0] == {"path": "/dev/vda", "type": "b", "major": 254, "minor": 0,
                                "uid": 0, "gid": 0, "fileMode": 0o660}
    res = lx["resources"]
    assert res["memory"] == {"limit": 256 << 20}
    assert res["cpu"] == {"shares": 512, "quota": 50000, "period": 100000}
    assert res["pids"] == {"limit": 100}
    # Major/minor 0 on the wire is the OCI wildcard: left out.
    assert res["devices"][0] == {"allow": False, "access": "rwm"}
    assert res["devices"][1] == {"allow": True, "access": "rw", "type": "c", "major": 1,
                                 "minor": 3}
    assert lx["seccomp"]["syscalls"] == [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]
    assert d["hooks"]["prestart"] == [{"path": "/bin/true", "args": ["true"], "timeout": 5}]
    assert d["annotations"] == {"io.kubernetes.cri.container-type": "container"}


def test_zero_values_mean_unset() -> None:
    s = oci_pb2.Spec()
    s.Process.Args.append("sh")
    s.Root.Path = "/r"
    s.Linux.Resources.Memory.Limit = 0
    s.Linux.Resources.CPU.Shares = 0
    d = oci_convert.spec_to_oci(s)
    assert d["linux"]["resources"] == {}
    assert d["process"]["cwd"] == "/"
    assert "hostname" not in d and "hooks" not in d
    assert d["ociVersion"] == oci_convert.OCI_VERSION_DEFAULT


def test_converted_spec_is_accepted_by_the_engine() -> None:
    s = full_spec()
    del s.Linux.Namespaces[:]
    s.Linux.Namespaces.add(Type="uts")
    s.Linux.Namespaces.add(Type="network")
    s.Linux.Namespaces.add(Type="mount")
    spec = oci_convert.spec_from_pb(s)
    assert spec.process is not None
    assert spec.process.args == ("/bin/sh", "-c", "echo hi")
    assert spec.process.user.uid == 1000
    assert spec.linux.resources is not None
    assert spec.linux.resources.memory.limit == 256 << 20
    assert spec.hostname == "pod"


def test_resources_alone_convert_for_update() -> None:
    r = oci_pb2.LinuxResources()
    r.Memory.Limit = 64 << 20
    r.BlockIO.Weight = 500
    r.BlockIO.ThrottleReadBpsDevice.add(Major=8, Minor=0, Rate=1000)
    d = oci_convert.resources_to_oci(r)
    assert d == {"memory": {"limit": 64 << 20},
                 "blockIO": {"weight": 500,
                             "throttleReadBpsDevice": [{"major": 8, "minor": 0,
                                                        "rate": 1000}]}}
    parsed = LinuxResources.from_oci(d)
    assert parsed.memory is not None and parsed.memory.limit == 64 << 20


def test_bad_spec_names_the_field() -> None:
    s = oci_pb2.Spec()
    s.Root.Path = "/r"
    s.Process.Cwd = "/"  # no args
    with pytest.raises(SpecError) as err:
        oci_convert.spec_from_pb(s)
    assert err.value.field == "process.args"


def test_counts_are_bounded() -> None:
    s = oci_pb2.Spec()
    s.Process.Args.extend(["x"] * (MAX_ITEMS + 1))
    with pytest.raises(SpecError) as err:
        oci_convert.spec_to_oci(s)
    assert err.value.field == "process.args"
