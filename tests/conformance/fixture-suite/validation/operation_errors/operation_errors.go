// Command operation_errors checks that operations not allowed in a container's current state
// fail and leave the container as it was: a second create with the same id, start of a
// running container, delete of a running container without --force.
package main

import (
	"fmt"
	"os"
	"time"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(10)
	bundle, err := oci.PrepareBundle(oci.Config("/bin/sh", "-c", "while :; do sleep 0.1; done"))
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "prepare the bundle", oci.Diag(err)) {
		t.SkipRest("no bundle")
		return
	}
	id := oci.NewID("fixture-errors")
	err = oci.Create(id, bundle)
	if !t.Check(err == nil, "create", oci.Diag(err)) {
		t.SkipRest("create failed")
		return
	}
	defer oci.ForceDelete(id)

	second, _ := oci.PrepareBundle(oci.Config("/runtimetest"))
	defer os.RemoveAll(second)
	t.Check(oci.Create(id, second) != nil, "create with an id in use fails", "second create succeeded")
	st, err := oci.GetState(id)
	t.Check(err == nil && st.Status == "created" && st.Bundle == bundle,
		"the first container is unchanged", fmt.Sprintf("state=%+v err=%v", st, err))

	_, err = oci.Run(nil, "start", id)
	if !t.Check(err == nil, "start", oci.Diag(err)) {
		t.SkipRest("start failed")
		return
	}
	_, err = oci.WaitStatus(id, "running", 10*time.Second)
	t.Check(err == nil, "state reaches running", oci.Diag(err))
	_, err = oci.Run(nil, "start", id)
	t.Check(err != nil, "start of a running container fails", "second start succeeded")
	_, err = oci.Run(nil, "delete", id)
	t.Check(err != nil, "delete of a running container without --force fails", "delete succeeded")
	st, err = oci.GetState(id)
	t.Check(err == nil && st.Status == "running", "the container is still running",
		fmt.Sprintf("state=%+v err=%v", st, err))

	_, err = oci.Run(nil, "delete", "--force", id)
	t.Check(err == nil, "delete --force of a running container", oci.Diag(err))
}
