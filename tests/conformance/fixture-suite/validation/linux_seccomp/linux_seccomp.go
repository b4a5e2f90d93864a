// Command linux_seccomp checks a seccomp filter that denies mkdir and mkdirat with EPERM
// while allowing everything else.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `if mkdir /tmp/denied 2>/dev/null; then echo mkdir=ok; else echo mkdir=denied; fi
if touch /tmp/allowed 2>/dev/null; then echo touch=ok; else echo touch=denied; fi`

func main() {
	t := oci.NewTAP(3)
	cfg := oci.Config("/bin/sh", "-c", script)
	cfg["linux"].(map[string]any)["seccomp"] = map[string]any{
		"defaultAction": "SCMP_ACT_ALLOW",
		"syscalls": []map[string]any{
			{"names": []string{"mkdir", "mkdirat"}, "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
		},
	}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-seccomp"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	t.Check(got["mkdir"] == "denied", "the filtered syscall fails", fmt.Sprintf("output %q", out))
	t.Check(got["touch"] == "ok", "other syscalls work", fmt.Sprintf("output %q", out))
}
