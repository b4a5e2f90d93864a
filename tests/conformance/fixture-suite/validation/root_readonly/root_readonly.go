// Command root_readonly checks root.readonly: the root filesystem refuses writes while a
// tmpfs mounted on it stays writable.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `if touch /written 2>/dev/null; then echo root_write=ok; else echo root_write=denied; fi
if touch /dev/written 2>/dev/null; then echo dev_write=ok; else echo dev_write=denied; fi`

func main() {
	t := oci.NewTAP(3)
	cfg := oci.Config("/bin/sh", "-c", script)
	cfg["root"] = map[string]any{"path": ".", "readonly": true}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-rootro"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	t.Check(got["root_write"] == "denied", "the read-only root refuses writes", fmt.Sprintf("output %q", out))
	t.Check(got["dev_write"] == "ok", "the tmpfs on /dev stays writable", fmt.Sprintf("output %q", out))
}
