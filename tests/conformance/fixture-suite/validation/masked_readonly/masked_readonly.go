// Command masked_readonly checks maskedPaths (a file and a directory read as empty) and
// readonlyPaths (writes fail) from inside the container.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const script = `echo masked_file_bytes=$(cat /etc/secret-file 2>/dev/null | wc -c)
echo masked_dir_entries=$(ls -A /mnt/secret-dir 2>/dev/null | wc -l)
if touch /home/ro-dir/x 2>/dev/null; then echo readonly_write=ok; else echo readonly_write=denied; fi
echo readonly_read=$(cat /home/ro-dir/kept)
if touch /tmp/x 2>/dev/null; then echo other_write=ok; else echo other_write=denied; fi`

func main() {
	t := oci.NewTAP(6)
	cfg := oci.Config("/bin/sh", "-c", script)
	linux := cfg["linux"].(map[string]any)
	linux["maskedPaths"] = []string{"/etc/secret-file", "/mnt/secret-dir"}
	linux["readonlyPaths"] = []string{"/home/ro-dir"}
	prepare := func(bundle string) error {
		files := map[string]string{
			"etc/secret-file":      "host secret\n",
			"mnt/secret-dir/entry": "hidden\n",
			"home/ro-dir/kept":     "visible",
		}
		for name, content := range files {
			path := filepath.Join(bundle, name)
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	bundle, out, err := oci.RunToCompletion(oci.NewID("fixture-masked"), cfg, prepare)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	got := oci.Lines(out)
	for _, c := range []struct{ key, want, desc string }{
		{"masked_file_bytes", "0", "a masked file reads as empty"},
		{"masked_dir_entries", "0", "a masked directory lists as empty"},
		{"readonly_write", "denied", "a read-only path refuses writes"},
		{"readonly_read", "visible", "a read-only path still reads its content"},
		{"other_write", "ok", "paths not listed stay writable"},
	} {
		t.Check(got[c.key] == c.want, c.desc, fmt.Sprintf("%s=%q want %q; output %q", c.key, got[c.key], c.want, out))
	}
}
