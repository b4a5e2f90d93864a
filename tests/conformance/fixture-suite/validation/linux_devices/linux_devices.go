// Command linux_devices checks the default devices and symbolic links of the runtime
// specification and a device listed in linux.devices.
package main

import (
	"fmt"
	"os"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `for d in null zero full random urandom tty; do
  [ -c /dev/$d ] && echo $d=$(stat -c '%t:%T' /dev/$d) || echo $d=missing
done
echo custom=$(stat -c '%F %t:%T %a' /dev/fixture-null)
echo fd=$(readlink /dev/fd)
echo stdin=$(readlink /dev/stdin)
echo ptmx=$(readlink /dev/ptmx | sed 's|^/dev/||')`

func main() {
	t := oci.NewTAP(11)
	cfg := oci.Config("/bin/sh", "-c", script)
	cfg["linux"].(map[string]any)["devices"] = []map[string]any{
		{"path": "/dev/fixture-null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o620},
	}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-devices"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	for _, c := range [][2]string{
		{"null", "1:3"}, {"zero", "1:5"}, {"full", "1:7"}, {"random", "1:8"}, {"urandom", "1:9"}, {"tty", "5:0"},
		{"custom", "character special file 1:3 620"},
		{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"ptmx", "pts/ptmx"},
	} {
		t.Check(got[c[0]] == c[1], fmt.Sprintf("/dev %s is %s", c[0], c[1]),
			fmt.Sprintf("%s=%q; output %q", c[0], got[c[0]], out))
	}
}
