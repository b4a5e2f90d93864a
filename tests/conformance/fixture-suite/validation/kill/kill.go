// Command kill checks signal delivery: a handled SIGTERM (the default signal) stops the
// container, SIGKILL stops one that ignores SIGTERM, and signalling a stopped container fails.
package main

import (
	"fmt"
	"os"
	"time"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

// started creates and starts a container running a shell script that prints "ready" once set
// up; it returns the bundle (for removal) and whether the script got that far.
func started(t *oci.TAP, id, script string) (string, bool) {
	bundle, err := oci.PrepareBundle(oci.Config("/bin/sh", "-c", script))
	if err == nil {
		err = oci.Create(id, bundle)
	}
	if err == nil {
		_, err = oci.Run(nil, "start", id)
	}
	if err == nil {
		_, err = oci.WaitStatus(id, "running", 10*time.Second)
	}
	// A signal sent before the shell has installed its trap would meet pid 1's default
	// disposition and be dropped: wait for the script to say it is ready.
	deadline := time.Now().Add(10 * time.Second)
	for err == nil && oci.Output(bundle) != "ready" {
		if time.Now().After(deadline) {
			err = fmt.Errorf("no \"ready\" from the container; stdout %q", oci.Output(bundle))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return bundle, t.Check(err == nil, "the container runs its script", oci.Diag(err))
}

func main() {
	t := oci.NewTAP(7)

	termID := oci.NewID("fixture-kill-term")
	bundle, ok := started(t, termID, "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done")
	defer os.RemoveAll(bundle)
	defer oci.ForceDelete(termID)
	if ok {
		_, err := oci.Run(nil, "kill", termID)
		t.Check(err == nil, "kill with the default signal", oci.Diag(err))
		_, err = oci.WaitStatus(termID, "stopped", 20*time.Second)
		t.Check(err == nil, "a handled SIGTERM stops the container", oci.Diag(err))
		_, err = oci.Run(nil, "kill", termID, "KILL")
		t.Check(err != nil, "kill of a stopped container fails", "kill succeeded")
	} else {
		t.Check(false, "kill with the default signal", "not running")
		t.Check(false, "a handled SIGTERM stops the container", "not running")
		t.Check(false, "kill of a stopped container fails", "not running")
	}

	// The script is pid 1 of its pid namespace: without a handler it never sees SIGTERM.
	killID := oci.NewID("fixture-kill-9")
	bundle2, ok := started(t, killID, "echo ready; while :; do sleep 0.1; done")
	defer os.RemoveAll(bundle2)
	defer oci.ForceDelete(killID)
	if !ok {
		t.SkipRest("container not running")
		return
	}
	_, err := oci.Run(nil, "kill", killID, "SIGKILL")
	t.Check(err == nil, "kill SIGKILL", oci.Diag(err))
	_, err = oci.WaitStatus(killID, "stopped", 20*time.Second)
	t.Check(err == nil, "SIGKILL stops the container", oci.Diag(err))
}
