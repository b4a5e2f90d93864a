"""What the benches feed the systems under test and read from the build: manifests, the
container spec sent to the agent, the OCI bundle given to kata-oci, runc and crun."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from kata_agent.engine.spec import Spec
from kata_agent.oci_convert import spec_from_pb

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import agent_bench
import image_bench
import oci_bench


def write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def test_sizes_come_from_both_manifests(tmp_path: Path) -> None:
    write(tmp_path / "kernel.json", {"files": {"vmlinuz": {"size": 4_932_608},
                                               "vmlinux": {"size": 9}}})
    write(tmp_path / "manifest.json", {
        "files": [{"name": "initrd.img", "size": 45_880_478},
                  {"name": "rootfs.img", "size": 268_435_456}],
        "rootfs": {"bytes": 133_947_392, "entries": 3948}})
    figs = {f.name: f for f in image_bench.size_figures(tmp_path, "x86_64")}
    assert figs["image.kernel_size"].median == pytest.approx(4.932608)
    assert figs["image.initrd_size"].median == pytest.approx(45.880478)
    assert figs["image.image_size"].median == pytest.approx(268.435456)
    assert figs["image.rootfs_content"].median == pytest.approx(133.947392)
    ratio = figs["image.kernel_size"].median / figs["image.kernel_size"].peers[image_bench.KATA]
    assert ratio == pytest.approx(0.4932608)


def test_missing_artefacts_are_skipped_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("not json")
    figs = {f.name: f for f in image_bench.size_figures(tmp_path, "aarch64")}
    assert set(figs) == {"image.kernel_size", "image.initrd_size", "image.image_size"}
    assert all(f.median is None for f in figs.values())
    assert "no Image in" in figs["image.kernel_size"].note
    boot = image_bench.boot_figures(tmp_path, "x86_64", 1)
    assert boot[0].median is None and "is missing" in boot[0].note


def test_malformed_manifest_records_are_ignored() -> None:
    sizes = image_bench.file_sizes(
        {"files": [{"name": "a", "size": "big"}, "junk", {"name": "b", "size": 3}]},
        {"files": {"k": {"size": 1.5}, "v": {"size": 7}}})
    assert sizes == {"b": 3, "v": 7}


def test_agent_container_spec_is_valid_for_the_engine() -> None:
    spec = spec_from_pb(agent_bench.oci_spec("c1", ["/bin/true"]))
    assert isinstance(spec, Spec)
    doc = agent_bench.oci_spec("c1", ["/bin/true"])
    assert doc.Root.Path == "/run/kata-containers/shared/containers/c1/rootfs"
    assert [n.Type for n in doc.Linux.Namespaces] == ["mount", "pid", "uts", "ipc"]
    assert list(doc.Process.Args) == ["/bin/true"]
    assert {m.destination for m in doc.Mounts} == {"/proc", "/dev"}


def test_agent_rootfs_layout(tmp_path: Path) -> None:
    busybox = tmp_path / "bb"
    busybox.write_bytes(b"\x7fELF")
    agent_bench.make_rootfs(tmp_path, "c9", busybox)
    root = tmp_path / "c9" / "rootfs"
    assert (root / "bin" / "busybox").stat().st_ino == busybox.stat().st_ino
    assert (root / "bin" / "true").readlink() == Path("busybox")
    assert (root / "proc").is_dir() and (root / "dev").is_dir()


def test_unimplemented_becomes_a_skip_reason() -> None:
    class Err(agent_bench.grpc.RpcError):  # type: ignore[misc]
        def __init__(self, code: object) -> None:
            self._code = code

        def code(self) -> object:
            return self._code

    skip = agent_bench.unimplemented(Err(agent_bench.grpc.StatusCode.UNIMPLEMENTED),
                                     "CreateContainer")
    assert skip is not None and str(skip) == "agent does not implement CreateContainer yet"
    assert agent_bench.unimplemented(Err(agent_bench.grpc.StatusCode.INTERNAL), "X") is None


def test_oci_bundle_runs_true_from_busybox(tmp_path: Path) -> None:
    if not Path(oci_bench.BUSYBOX).exists() or shutil.which("busybox") is None:
        pytest.skip("host capability missing: busybox-static")
    bundle = oci_bench.make_bundle(tmp_path / "b")
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["args"] == ["/bin/true"]
    assert spec["process"]["terminal"] is False
    assert spec["root"]["path"] == "rootfs"
    assert (bundle / "rootfs" / "bin" / "true").readlink() == Path("busybox")
    assert Spec.from_oci(spec) is not None


def test_kata_oci_command_prefers_the_installed_script() -> None:
    argv = oci_bench.kata_oci_argv()
    assert argv[0].endswith("kata-oci") or argv[1:] == ("-m", "kata_agent.oci_cli")
