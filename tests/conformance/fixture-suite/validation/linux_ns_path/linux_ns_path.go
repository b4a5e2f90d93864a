// Command linux_ns_path checks that a namespace given by path is joined, not created: the
// container's network namespace is the one a host tool made.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(3)
	name := fmt.Sprintf("fixture-ns-%d", os.Getpid())
	out, err := exec.Command("ip", "netns", "add", name).CombinedOutput()
	if !t.Check(err == nil, "ip netns add", fmt.Sprintf("%v: %s", err, out)) {
		t.SkipRest("no network namespace")
		return
	}
	defer exec.Command("ip", "netns", "delete", name).Run()
	path := "/run/netns/" + name
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Check(false, "stat the namespace", err.Error())
		t.SkipRest("no namespace inode")
		return
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)

	cfg := oci.Config("/bin/sh", "-c", "echo net=$(readlink /proc/self/ns/net)")
	linux := cfg["linux"].(map[string]any)
	linux["namespaces"] = append(linux["namespaces"].([]map[string]any),
		map[string]any{"type": "network", "path": path})
	bundle, output, err := oci.RunToCompletion(oci.NewID("fixture-nspath"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := strings.TrimSpace(oci.Lines(output)["net"])
	t.Check(got == want, "the container is in the namespace named by path",
		fmt.Sprintf("container %q, namespace file %q", got, want))
}
