// Command process_props checks that the container process gets the configured cwd, user,
// environment, rlimits, hostname, oom_score_adj and no_new_privs, as seen from inside the container.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `echo cwd=$(pwd)
echo uid=$(id -u)
echo gid=$(id -g)
echo env=$FIXTURE_VAR
echo nofile=$(ulimit -n)
echo hostname=$(hostname)
echo oom=$(cat /proc/self/oom_score_adj)
echo nnp=$(grep NoNewPrivs /proc/self/status | tr -d ' \t' | cut -d: -f2)`

func main() {
	t := oci.NewTAP(9)
	cfg := oci.Config("/bin/sh", "-c", script)
	process := cfg["process"].(map[string]any)
	process["cwd"] = "/tmp"
	process["user"] = map[string]any{"uid": 1000, "gid": 1001}
	process["env"] = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FIXTURE_VAR=fixture value"}
	process["rlimits"] = []map[string]any{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}}
	process["noNewPrivileges"] = true
	process["oomScoreAdj"] = 500
	cfg["hostname"] = "props-host"

	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-props"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	for _, want := range [][2]string{
		{"cwd", "/tmp"}, {"uid", "1000"}, {"gid", "1001"}, {"env", "fixture value"},
		{"nofile", "512"}, {"hostname", "props-host"}, {"oom", "500"}, {"nnp", "1"},
	} {
		t.Check(got[want[0]] == want[1], fmt.Sprintf("%s is %q", want[0], want[1]),
			fmt.Sprintf("got %q; output %q", got[want[0]], out))
	}
}
