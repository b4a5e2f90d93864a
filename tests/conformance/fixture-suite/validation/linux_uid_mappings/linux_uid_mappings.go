// Command linux_uid_mappings checks a user namespace with uid and gid mappings: the process
// sees the configured maps and is root inside.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(4)
	cfg := oci.Config("/bin/sh", "-c",
		"echo uid_map=$(cat /proc/self/uid_map); echo gid_map=$(cat /proc/self/gid_map); echo uid=$(id -u)")
	linux := cfg["linux"].(map[string]any)
	linux["namespaces"] = append(linux["namespaces"].([]map[string]any), map[string]any{"type": "user"})
	mapping := []map[string]any{{"containerID": 0, "hostID": 200000, "size": 65536}}
	linux["uidMappings"] = mapping
	linux["gidMappings"] = mapping
	// The mapped root is an unprivileged uid on the host: it must be able to reach the rootfs.
	prepare := func(bundle string) error { return os.Chmod(bundle, 0o755) }
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-userns"), cfg, prepare)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	t.Check(got["uid_map"] == "0 200000 65536", "uid_map is the configured one", fmt.Sprintf("output %q", out))
	t.Check(got["gid_map"] == "0 200000 65536", "gid_map is the configured one", fmt.Sprintf("output %q", out))
	t.Check(got["uid"] == "0", "the process is root inside", fmt.Sprintf("output %q", out))
}
