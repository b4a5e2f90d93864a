// Command linux_sysctl checks namespaced sysctls (UTS and IPC) set from the configuration.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(3)
	cfg := oci.Config("/bin/sh", "-c",
		"echo domainname=$(cat /proc/sys/kernel/domainname); echo msgmax=$(cat /proc/sys/kernel/msgmax)")
	cfg["linux"].(map[string]any)["sysctl"] = map[string]string{
		"kernel.domainname": "fixture.example", "kernel.msgmax": "4096",
	}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-sysctl"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	t.Check(got["domainname"] == "fixture.example", "kernel.domainname is set", fmt.Sprintf("output %q", out))
	t.Check(got["msgmax"] == "4096", "kernel.msgmax is set", fmt.Sprintf("output %q", out))
}
