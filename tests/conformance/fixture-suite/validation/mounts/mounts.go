// Command mounts checks configured mounts from inside the container: a tmpfs with its size
// option, a read-only bind mount of a host directory, and a writable bind mount.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `echo tmpfs=$(grep ' /data ' /proc/mounts | cut -d' ' -f3)
echo tmpfs_size=$(df -k /data | tail -n1 | tr -s ' ' | cut -d' ' -f2)
echo bound_read=$(cat /bound-ro/file)
if touch /bound-ro/new 2>/dev/null; then echo bound_ro_write=ok; else echo bound_ro_write=denied; fi
echo written > /bound-rw/from-container && echo bound_rw_write=ok`

func main() {
	t := oci.NewTAP(7)
	cfg := oci.Config("/bin/sh", "-c", script)
	host, err := os.MkdirTemp("", "fixture-host-dir")
	if err != nil {
		t.Check(false, "make the host directories", err.Error())
		t.SkipRest("no host directory")
		return
	}
	defer os.RemoveAll(host)
	roDir, rwDir := filepath.Join(host, "ro"), filepath.Join(host, "rw")
	for _, d := range []string{roDir, rwDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			panic(err)
		}
	}
	if err := os.WriteFile(filepath.Join(roDir, "file"), []byte("from host"), 0o644); err != nil {
		panic(err)
	}
	cfg["mounts"] = append(cfg["mounts"].([]map[string]any),
		map[string]any{"destination": "/data", "type": "tmpfs", "source": "tmpfs",
			"options": []string{"size=1024k", "mode=755"}},
		map[string]any{"destination": "/bound-ro", "type": "bind", "source": roDir,
			"options": []string{"rbind", "ro"}},
		map[string]any{"destination": "/bound-rw", "type": "bind", "source": rwDir,
			"options": []string{"rbind", "rw"}},
	)
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-mounts"), cfg, nil)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	for _, c := range []struct{ key, want, desc string }{
		{"tmpfs", "tmpfs", "/data is a tmpfs"},
		{"tmpfs_size", "1024", "the tmpfs has the configured size"},
		{"bound_read", "from host", "the bind mount shows the host directory"},
		{"bound_ro_write", "denied", "the read-only bind mount refuses writes"},
		{"bound_rw_write", "ok", "the writable bind mount accepts writes"},
	} {
		t.Check(got[c.key] == c.want, c.desc, fmt.Sprintf("%s=%q want %q; output %q", c.key, got[c.key], c.want, out))
	}
	data, _ := os.ReadFile(filepath.Join(rwDir, "from-container"))
	t.Check(strings.TrimSpace(string(data)) == "written", "the write reached the host directory",
		fmt.Sprintf("host file %q", data))
}
