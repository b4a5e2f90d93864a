// Package oci holds what the fixture programs share: TAP output, busybox bundles laid out the
// way the runtime-tools validation programs lay them out, and calls of the runtime under test.
package oci

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// TAP prints a TAP version 13 stream with a fixed plan.
type TAP struct{ n, plan int }

// NewTAP prints the header and the plan.
func NewTAP(plan int) *TAP {
	fmt.Println("TAP version 13")
	fmt.Printf("1..%d\n", plan)
	return &TAP{plan: plan}
}

// Check prints one test line, with diag as a YAML block when it fails, and returns ok.
func (t *TAP) Check(ok bool, desc string, diag string) bool {
	t.n++
	if ok {
		fmt.Printf("ok %d - %s\n", t.n, desc)
		return true
	}
	fmt.Printf("not ok %d - %s\n", t.n, desc)
	if diag != "" {
		fmt.Printf("  ---\n  error: %q\n  ...\n", diag)
	}
	return false
}

// SkipRest reports every test not yet run as skipped, so the plan always completes.
func (t *TAP) SkipRest(reason string) {
	for t.n < t.plan {
		t.n++
		fmt.Printf("ok %d # SKIP %s\n", t.n, reason)
	}
}

// Runtime is the runtime under test: $RUNTIME, runc by default.
func Runtime() string {
	if r := os.Getenv("RUNTIME"); r != "" {
		return r
	}
	return "runc"
}

// NewID returns a container id unique to this process and moment.
func NewID(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), time.Now().UnixNano())
}

// Config is a minimal config.json for a busybox bundle whose root is the bundle itself.
func Config(args ...string) map[string]any {
	return map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{
			"terminal": false,
			"user":     map[string]any{"uid": 0, "gid": 0},
			"args":     args,
			"env":      []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
			"cwd":      "/",
		},
		"root":     map[string]any{"path": ".", "readonly": false},
		"hostname": "fixture-host",
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc"},
			{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
				"options": []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		},
		"linux": map[string]any{
			"namespaces": []map[string]any{
				{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
			},
		},
	}
}

// PrepareBundle unpacks rootfs-<GOARCH>.tar.gz from the working directory into a new temporary
// bundle, copies ./runtimetest into it and writes cfg as its config.json.
func PrepareBundle(cfg map[string]any) (string, error) {
	bundle, err := os.MkdirTemp("", "ocitest")
	if err != nil {
		return "", err
	}
	tarball := fmt.Sprintf("rootfs-%s.tar.gz", runtime.GOARCH)
	if out, err := exec.Command("tar", "-xf", tarball, "-C", bundle).CombinedOutput(); err != nil {
		return bundle, fmt.Errorf("untar %s: %v: %s", tarball, err, out)
	}
	data, err := os.ReadFile("runtimetest")
	if err != nil {
		return bundle, err
	}
	if err := os.WriteFile(filepath.Join(bundle, "runtimetest"), data, 0o755); err != nil {
		return bundle, err
	}
	encoded, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return bundle, err
	}
	return bundle, os.WriteFile(filepath.Join(bundle, "config.json"), encoded, 0o644)
}

// Run calls the runtime with its stdout sent to stdout (nil: discarded) and returns its
// stderr. Stderr goes through a file, never a pipe: after create the container process keeps
// the runtime's stdio open until it exits, so a pipe would not reach end of file.
func Run(stdout *os.File, args ...string) (string, error) {
	errFile, err := os.CreateTemp("", "runtime-stderr")
	if err != nil {
		return "", err
	}
	defer os.Remove(errFile.Name())
	defer errFile.Close()
	cmd := exec.Command(Runtime(), args...)
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.Stderr = errFile
	err = cmd.Run()
	msg, _ := os.ReadFile(errFile.Name())
	if err != nil {
		return strings.TrimSpace(string(msg)), fmt.Errorf("%s %s: %v: %s",
			Runtime(), strings.Join(args, " "), err, strings.TrimSpace(string(msg)))
	}
	return strings.TrimSpace(string(msg)), nil
}

// Create creates container id from bundle, its stdout and stderr going to files in the bundle.
func Create(id, bundle string, extra ...string) error {
	out, err := os.Create(filepath.Join(bundle, "container-stdout"))
	if err != nil {
		return err
	}
	defer out.Close()
	args := append([]string{"create", "--bundle", bundle}, extra...)
	_, err = Run(out, append(args, id)...)
	return err
}

// Output is what the container process wrote to its stdout so far.
func Output(bundle string) string {
	data, _ := os.ReadFile(filepath.Join(bundle, "container-stdout"))
	return strings.TrimSpace(string(data))
}

// State is the state document of the OCI runtime specification.
type State struct {
	OCIVersion string `json:"ociVersion"`
	ID         string `json:"id"`
	Status     string `json:"status"`
	Pid        int    `json:"pid"`
	Bundle     string `json:"bundle"`
}

// GetState runs "state id" and decodes its output.
func GetState(id string) (State, error) {
	var st State
	out, err := exec.Command(Runtime(), "state", id).Output()
	if err != nil {
		return st, fmt.Errorf("state %s: %v", id, err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("state output %q: %v", out, err)
	}
	return st, nil
}

// WaitStatus polls the state until it reports want or the deadline passes.
func WaitStatus(id, want string, within time.Duration) (State, error) {
	deadline := time.Now().Add(within)
	for {
		st, err := GetState(id)
		if err == nil && st.Status == want {
			return st, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("status %q after %s, want %q", st.Status, within, want)
			}
			return st, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ForceDelete removes the container whatever its state; for deferred cleanup.
func ForceDelete(id string) {
	_, _ = Run(nil, "delete", "--force", id)
}

// Diag formats an error for a TAP diagnostic ("" for nil).
func Diag(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// RunToCompletion creates and starts a container from cfg, waits until it stops, deletes it
// and returns its stdout. prepare, when set, runs on the bundle before create.
func RunToCompletion(id string, cfg map[string]any, prepare func(bundle string) error) (string, string, error) {
	bundle, err := PrepareBundle(cfg)
	if err != nil {
		return bundle, "", err
	}
	if prepare != nil {
		if err := prepare(bundle); err != nil {
			return bundle, "", err
		}
	}
	if err := Create(id, bundle); err != nil {
		return bundle, "", err
	}
	defer ForceDelete(id)
	if _, err := Run(nil, "start", id); err != nil {
		return bundle, "", err
	}
	if _, err := WaitStatus(id, "stopped", 20*time.Second); err != nil {
		return bundle, Output(bundle), err
	}
	if _, err := Run(nil, "delete", id); err != nil {
		return bundle, Output(bundle), err
	}
	return bundle, Output(bundle), nil
}

// Lines splits output of "key=value" lines into a map.
func Lines(output string) map[string]string {
	values := map[string]string{}
	for _, line := range strings.Split(output, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			values[k] = strings.TrimSpace(v)
		}
	}
	return values
}
