// Command linux_capabilities checks that the process gets exactly the configured capability
// sets, as /proc/self/status shows them inside the container.
package main

import (
	"fmt"
	"os"
	"strings"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(5)
	caps := []string{"CAP_CHOWN", "CAP_NET_BIND_SERVICE"} // bits 0 and 10
	want := fmt.Sprintf("%016x", uint64(1)|uint64(1)<<10)
	cfg := oci.Config("/bin/sh", "-c", "grep -E '^Cap(Bnd|Eff|Prm|Inh|Amb):' /proc/self/status | tr -d ' \t' | tr : =")
	cfg["process"].(map[string]any)["capabilities"] = map[string]any{
		"bounding": caps, "effective": caps, "permitted": caps,
	}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-caps"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	for _, c := range []struct{ key, want, desc string }{
		{"CapBnd", want, "the bounding set is the configured one"},
		{"CapEff", want, "the effective set is the configured one"},
		{"CapPrm", want, "the permitted set is the configured one"},
		{"CapAmb", strings.Repeat("0", 16), "the ambient set is empty when not configured"},
	} {
		t.Check(got[c.key] == c.want, c.desc, fmt.Sprintf("%s=%q want %q", c.key, got[c.key], c.want))
	}
}
