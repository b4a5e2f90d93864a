// Command state_fields checks the state document of a created container: the fields the OCI
// runtime specification requires, with the values this container must have.
package main

import (
	"fmt"
	"os"
	"path/filepath"

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
	id := oci.NewID("fixture-state")
	err = oci.Create(id, bundle)
	if !t.Check(err == nil, "create", oci.Diag(err)) {
		t.SkipRest("create failed")
		return
	}
	defer oci.ForceDelete(id)
	st, err := oci.GetState(id)
	if !t.Check(err == nil, "state returns a JSON document", oci.Diag(err)) {
		t.SkipRest("no state")
		return
	}
	t.Check(st.OCIVersion != "", "ociVersion is set", fmt.Sprintf("%+v", st))
	t.Check(st.ID == id, "id is the container id", fmt.Sprintf("id=%q want %q", st.ID, id))
	_, procErr := os.Stat(fmt.Sprintf("/proc/%d", st.Pid))
	t.Check(st.Pid > 0 && procErr == nil, "pid names a live process on the host",
		fmt.Sprintf("pid=%d stat=%v", st.Pid, procErr))
	abs, _ := filepath.Abs(bundle)
	t.Check(st.Bundle == abs, "bundle is the absolute bundle path",
		fmt.Sprintf("bundle=%q want %q", st.Bundle, abs))
}
