// Command pidfile checks that create --pid-file writes the pid of the container process,
// the same pid the state reports.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func main() {
	t := oci.NewTAP(4)
	bundle, err := oci.PrepareBundle(oci.Config("/runtimetest"))
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "prepare the bundle", oci.Diag(err)) {
		t.SkipRest("no bundle")
		return
	}
	id := oci.NewID("fixture-pidfile")
	pidFile := filepath.Join(bundle, "container.pid")
	err = oci.Create(id, bundle, "--pid-file", pidFile)
	if !t.Check(err == nil, "create --pid-file", oci.Diag(err)) {
		t.SkipRest("create failed")
		return
	}
	defer oci.ForceDelete(id)
	data, err := os.ReadFile(pidFile)
	pid, convErr := strconv.Atoi(strings.TrimSpace(string(data)))
	if !t.Check(err == nil && convErr == nil && pid > 0, "the pid file holds a pid",
		fmt.Sprintf("read=%v content=%q", err, data)) {
		t.SkipRest("no pid")
		return
	}
	st, err := oci.GetState(id)
	t.Check(err == nil && st.Pid == pid, "the pid file matches the state's pid",
		fmt.Sprintf("file=%d state=%+v err=%v", pid, st, err))
}
