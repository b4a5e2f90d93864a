// Command hooks_prestart_fail checks that a failing prestart hook makes the runtime report an
// error and leaves no container running: the specification stops the container and goes on
// to delete it.
package main

import (
	"fmt"
	"os"
	"time"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(3)
	cfg := oci.Config("/bin/sh", "-c", "echo started; while :; do sleep 0.1; done")
	cfg["hooks"] = map[string]any{
		"prestart": []map[string]any{{"path": "/bin/sh", "args": []string{"sh", "-c", "exit 3"}}},
	}
	bundle, err := oci.PrepareBundle(cfg)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "prepare the bundle", oci.Diag(err)) {
		t.SkipRest("no bundle")
		return
	}
	id := oci.NewID("fixture-prestart-fail")
	defer oci.ForceDelete(id)
	// The hook may run during create or during start: either one must fail.
	err = oci.Create(id, bundle)
	if err == nil {
		_, err = oci.Run(nil, "start", id)
	}
	t.Check(err != nil, "create or start reports the failed hook", "both succeeded")

	st, stateErr := oci.GetState(id)
	if stateErr == nil && st.Status != "stopped" {
		st, stateErr = oci.WaitStatus(id, "stopped", 10*time.Second)
	}
	gone := stateErr != nil || st.Status == "stopped"
	t.Check(gone && oci.Output(bundle) == "", "the container process never ran and nothing is left running",
		fmt.Sprintf("state=%+v err=%v stdout=%q", st, stateErr, oci.Output(bundle)))
}
