// Command lifecycle drives the runtime through create, state, start, state, delete on a
// busybox bundle and checks from the process's own output that it ran as configured.
package main

import (
	"fmt"
	"os"
	"time"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(7)
	bundle, err := oci.PrepareBundle(oci.Config("/runtimetest"))
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "prepare the bundle", oci.Diag(err)) {
		t.SkipRest("no bundle")
		return
	}
	id := oci.NewID("fixture-lifecycle")
	err = oci.Create(id, bundle)
	if !t.Check(err == nil, "create", oci.Diag(err)) {
		t.SkipRest("create failed")
		return
	}
	defer oci.ForceDelete(id)

	st, err := oci.GetState(id)
	t.Check(err == nil && st.Status == "created", "state after create is created",
		fmt.Sprintf("state=%+v err=%v", st, err))

	_, err = oci.Run(nil, "start", id)
	if !t.Check(err == nil, "start", oci.Diag(err)) {
		t.SkipRest("start failed")
		return
	}
	_, err = oci.WaitStatus(id, "stopped", 20*time.Second)
	t.Check(err == nil, "state reaches stopped after the process exits", oci.Diag(err))

	want := "runtimetest pid=1 hostname=fixture-host"
	got := oci.Output(bundle)
	t.Check(got == want, "the process ran as pid 1 with the configured hostname",
		fmt.Sprintf("stdout=%q want %q", got, want))

	_, err = oci.Run(nil, "delete", id)
	t.Check(err == nil, "delete", oci.Diag(err))
}
