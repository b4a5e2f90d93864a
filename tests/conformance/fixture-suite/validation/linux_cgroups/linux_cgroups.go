// Command linux_cgroups checks that resource limits land in the cgroup named by cgroupsPath,
// that the container process is in it, and that delete removes it. Values are read from the
// host, as the runtime-tools cgroup programs do.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"example.invalid/kata-conformance-fixture/internal/oci"
)

const memLimit = 64 << 20

func read(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "error: " + err.Error()
	}
	return strings.TrimSpace(string(data))
}

func main() {
	t := oci.NewTAP(6)
	id := oci.NewID("fixture-cg")
	cgPath := "/kata-fixture/" + id
	cfg := oci.Config("/bin/sh", "-c", "echo ready; while :; do sleep 0.1; done")
	linux := cfg["linux"].(map[string]any)
	linux["cgroupsPath"] = cgPath
	linux["resources"] = map[string]any{
		"memory": map[string]any{"limit": memLimit},
		"pids":   map[string]any{"limit": 32},
		"cpu":    map[string]any{"shares": 512},
	}
	bundle, err := oci.PrepareBundle(cfg)
	if bundle != "" {
		defer os.RemoveAll(bundle)
	}
	if err == nil {
		err = oci.Create(id, bundle)
	}
	defer oci.ForceDelete(id)
	var st oci.State
	if err == nil {
		_, err = oci.Run(nil, "start", id)
	}
	if err == nil {
		st, err = oci.WaitStatus(id, "running", 10*time.Second)
	}
	if !t.Check(err == nil, "the container is running", oci.Diag(err)) {
		t.SkipRest("container not running")
		return
	}

	// cgroup v2 (unified hierarchy at /sys/fs/cgroup) or v1 (one hierarchy per controller).
	unified := false
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		unified = true
	}
	dir := func(controller string) string {
		if unified {
			return filepath.Join("/sys/fs/cgroup", cgPath)
		}
		return filepath.Join("/sys/fs/cgroup", controller, cgPath)
	}
	var memFile, cpuFile, wantCPU string
	if unified {
		// runc's conversion of shares to weight: 1 + ((shares-2)*9999)/262142.
		memFile, cpuFile, wantCPU = "memory.max", "cpu.weight", strconv.Itoa(1+((512-2)*9999)/262142)
	} else {
		memFile, cpuFile, wantCPU = "memory.limit_in_bytes", "cpu.shares", "512"
	}
	got := read(filepath.Join(dir("memory"), memFile))
	t.Check(got == strconv.Itoa(memLimit), "the memory limit is set", fmt.Sprintf("%s=%q", memFile, got))
	got = read(filepath.Join(dir("pids"), "pids.max"))
	t.Check(got == "32", "the pids limit is set", fmt.Sprintf("pids.max=%q", got))
	got = read(filepath.Join(dir("cpu"), cpuFile))
	t.Check(got == wantCPU, "the cpu shares are set", fmt.Sprintf("%s=%q want %q", cpuFile, got, wantCPU))
	procs := strings.Fields(read(filepath.Join(dir("memory"), "cgroup.procs")))
	found := false
	for _, p := range procs {
		found = found || p == strconv.Itoa(st.Pid)
	}
	t.Check(found, "the container process is in the cgroup", fmt.Sprintf("pid %d, cgroup.procs %v", st.Pid, procs))

	_, err = oci.Run(nil, "kill", id, "KILL")
	if err == nil {
		_, err = oci.WaitStatus(id, "stopped", 20*time.Second)
	}
	if err == nil {
		_, err = oci.Run(nil, "delete", id)
	}
	// Every hierarchy: v1 has one per controller (and named ones such as systemd).
	left, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgPath))
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", cgPath)); err == nil {
		left = append(left, filepath.Join("/sys/fs/cgroup", cgPath))
	}
	t.Check(err == nil && len(left) == 0, "delete removes the cgroup in every hierarchy",
		fmt.Sprintf("delete: %v; left: %v", err, left))
	parents, _ := filepath.Glob("/sys/fs/cgroup/*/kata-fixture")
	for _, p := range append(parents, "/sys/fs/cgroup/kata-fixture") {
		os.Remove(p) // fails, harmlessly, while another run still uses it
	}
}
