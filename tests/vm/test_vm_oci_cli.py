"""kata-oci on pure cgroup v2, in the guest under systemd: the issue's acceptance run
(echo hello with every namespace, a memory and a pids limit) where the host's hybrid
layout cannot offer v2 controllers.

The bundle (the host's static busybox, so x86_64 only) comes through the sandbox's 9p
share; the guest's own python3 runs the CLI from the debug console; a script in the share
records the limits read from the cgroup files before start, the container's output and
what is left after delete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kata_agent.engine.spec import default_spec
from kata_agent.host import runner
from kata_agent.protocol import agent_pb2

from tests.vm.console import run_on_console
from tests.vm.test_vm_containers import BOOT_TIMEOUT, IMAGE_BUILD_TIMEOUT, boot, sandbox_storage

BUSYBOX = Path("/bin/busybox")
LIMIT, PIDS = 64 * 1024 * 1024, 12
CGROUP = "/kata-oci-v2"
# Inside: a subshell starts 30 sleepers and dies at the first fork the limit refuses; the
# processes of the container's PID namespace are then counted with builtins only.
INSIDE = ("echo hello; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; "
          "(i=0; while [ $i -lt 30 ]; do sleep 5 & i=$((i+1)); done) 2>/dev/null; "
          "set -- /proc/[0-9]*; echo $#; kill -9 -1")
SCRIPT = f"""#!/bin/sh
R={runner.SHARED_DIR}
K="python3 -Iu -m kata_agent.oci_cli --root /run/kata-oci-vmtest"
$K create --bundle $R/bundle v2 > $R/container.out 2> $R/create.err
echo "create=$?" > $R/result
cat /sys/fs/cgroup{CGROUP}/memory.max /sys/fs/cgroup{CGROUP}/pids.max >> $R/result
P=$($K state v2 | sed -n 's/.*"pid": *\\([0-9]*\\).*/\\1/p')
readlink /proc/self/ns/pid /proc/$P/ns/pid >> $R/result
$K start v2 >> $R/result 2>&1
i=0
while [ $i -lt 600 ] && ! $K state v2 | grep -q '"stopped"'; do sleep 0.1; i=$((i+1)); done
$K delete v2 >> $R/result 2>&1
echo "delete=$?" >> $R/result
[ -d /sys/fs/cgroup{CGROUP} ] && echo cgroup-left >> $R/result
echo finished >> $R/result
"""


@pytest.mark.timeout(IMAGE_BUILD_TIMEOUT)  # the first boot may build the image
def test_kata_oci_echo_hello_with_limits_on_cgroup_v2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not BUSYBOX.is_file() or shutil.which("busybox") is None:
        pytest.skip("host capability missing: busybox-static")
    console = tmp_path / "console.sock"
    with boot("x86_64", "systemd", "initrd", tmp_path, capsys,
              extra_args=("agent.debug_console",), console_socket=console) as guest:
        # The sandbox's storage mounts the share where the bundle is.
        guest.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname="ocivm", sandbox_id="sb-oci", storages=[sandbox_storage()]))
        bundle = runner.busybox_bundle(guest.share / "bundle", ["sh", "-c", INSIDE],
                                       busybox=BUSYBOX, arch="x86_64")
        spec = default_spec()
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["sh", "-c", INSIDE]
        spec["linux"]["namespaces"] = [{"type": t} for t in
                                       ("pid", "mount", "uts", "ipc", "network", "cgroup")]
        spec["linux"]["resources"] = {"memory": {"limit": LIMIT}, "pids": {"limit": PIDS}}
        spec["linux"]["cgroupsPath"] = CGROUP
        (bundle / "config.json").write_text(json.dumps(spec))
        (guest.share / "run.sh").write_text(SCRIPT)
        run_on_console(guest.vm, console, f"sh {runner.SHARED_DIR}/run.sh", BOOT_TIMEOUT,
                       what="kata-oci in the guest")
        result = (guest.share / "result").read_text().split("\n")
        assert result[0] == "create=0", (guest.share / "create.err").read_text()
        # Read from the cgroup files outside, before start.
        assert result[1:3] == [str(LIMIT), str(PIDS)], result
        # Its own PID namespace.
        assert result[3] != result[4] and result[3].startswith("pid:["), result
        assert "delete=0" in result and "finished" in result
        assert "cgroup-left" not in result
        out = (guest.share / "container.out").read_text().split()
        # Inside: the same limits through the cgroup namespace, and the pids limit felt.
        assert out[:3] == ["hello", str(LIMIT), str(PIDS)], out
        assert 1 < int(out[3]) <= PIDS, out
        guest.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
        assert runner.shut_down(guest.vm) == 0
