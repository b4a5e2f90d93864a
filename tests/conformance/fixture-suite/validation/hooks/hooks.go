// Command hooks checks prestart, poststart and poststop hooks: each runs once, in that
// order, and reads the container state on its stdin.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

func hook(bundle, name string) map[string]any {
	script := fmt.Sprintf("cat > %s/%s.state; echo %s >> %s/hook-order", bundle, name, name, bundle)
	return map[string]any{"path": "/bin/sh", "args": []string{"sh", "-c", script}}
}

func main() {
	t := oci.NewTAP(6)
	// The hooks write into the bundle, so the bundle must exist before the config does.
	cfg := oci.Config("/bin/true")
	id := oci.NewID("fixture-hooks")
	var bundleDir string
	prepare := func(bundle string) error {
		bundleDir = bundle
		cfg["hooks"] = map[string]any{
			"prestart":  []map[string]any{hook(bundle, "prestart")},
			"poststart": []map[string]any{hook(bundle, "poststart")},
			"poststop":  []map[string]any{hook(bundle, "poststop")},
		}
		data, err := json.Marshal(cfg)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644)
	}
	bundle, _, err := oci.RunToCompletion(id, cfg, prepare)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if !t.Check(err == nil, "the container runs to completion and is deleted", oci.Diag(err)) {
		t.SkipRest("container did not run")
		return
	}
	order, _ := os.ReadFile(filepath.Join(bundleDir, "hook-order"))
	got := strings.Fields(string(order))
	want := []string{"prestart", "poststart", "poststop"}
	t.Check(strings.Join(got, ",") == strings.Join(want, ","),
		"each hook ran once, in the order prestart, poststart, poststop",
		fmt.Sprintf("order %q", got))
	for _, name := range want {
		var st oci.State
		data, err := os.ReadFile(filepath.Join(bundleDir, name+".state"))
		if err == nil {
			err = json.Unmarshal(data, &st)
		}
		ok := err == nil && st.ID == id && st.Bundle == bundleDir
		if name != "poststop" {
			ok = ok && st.Pid > 0
		}
		t.Check(ok, name+" reads the container state on stdin",
			fmt.Sprintf("state %q err=%v", data, err))
	}
	abs, _ := filepath.Abs(bundleDir)
	t.Check(abs == bundleDir, "the bundle path is absolute", bundleDir)
}
