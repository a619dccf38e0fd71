package main

import (
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

// TestEnableShowsSettingsAndWhatChanged: every per-cgroup setting shows in
// status (text and JSON), and an enable that drops one says so.
func TestEnableShowsSettingsAndWhatChanged(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	out := mustSockbypass(t, "enable", "--cgroup", cg.Path, "--stack-ports", "8080,8081", "--all-connections", "--no-probation", "--bpffs-dir", pinDir)
	if !strings.Contains(out, "stack ports 8080,8081") || !strings.Contains(out, "probation off") || !strings.Contains(out, "all connections on") {
		t.Errorf("first enable does not print its settings:\n%s", out)
	}
	st := statusOf(t, pinDir)
	if len(st.Cgroups) != 1 || st.Cgroups[0].Settings == nil {
		t.Fatalf("status --json has no settings: %+v", st.Cgroups)
	}
	if s := st.Cgroups[0].Settings; !s.AllConnections || !reflect.DeepEqual(s.StackPorts, []uint16{8080, 8081}) || s.AccountOnly || !s.NoProbation {
		t.Errorf("status --json settings %+v, want all_connections, no_probation and stack ports 8080,8081", s)
	}
	text := mustSockbypass(t, "status", "--bpffs-dir", pinDir)
	if !strings.Contains(text, "settings: account-only off, all connections on, probation off, stack ports 8080,8081") {
		t.Errorf("status does not show the settings:\n%s", text)
	}

	out = mustSockbypass(t, "enable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	for _, want := range []string{"stack ports: 8080,8081 -> (none)", "all connections: on -> off", "probation: off -> on"} {
		if !strings.Contains(out, want) {
			t.Errorf("enable without the flags does not say %q:\n%s", want, out)
		}
	}
	if s := statusOf(t, pinDir).Cgroups[0].Settings; s.AllConnections || s.NoProbation || len(s.StackPorts) != 0 || s.StackPorts == nil {
		t.Errorf("after dropping them: settings %+v, want stack_ports [] and no all_connections", s)
	}
	out = mustSockbypass(t, "enable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	if !strings.Contains(out, "nothing changed") {
		t.Errorf("enable with the same settings: %s", out)
	}

	// The sockhash's size is fixed at creation: say so.
	code, _, errOut := sockbypass(t, "enable", "--cgroup", cg.Path, "--sockhash-size", "1024", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(errOut, "--sockhash-size 1024 ignored") || !strings.Contains(errOut, "sockbypass uninstall") {
		t.Errorf("enable --sockhash-size on an install: exit %d, stderr %q", code, errOut)
	}
	if c := statusOf(t, pinDir).SockhashCapacity; c == 1024 {
		t.Errorf("sockhash capacity %d: the warning is wrong", c)
	}
}

// jsonKeys returns the keys of a JSON object.
func jsonKeys(t *testing.T, v any) []string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestStatusJSONIsSupersetOfStats: every top-level key of stats --json is
// in status --json, also with no cgroup at all (disabled_cgroups: []).
func TestStatusJSONIsSupersetOfStats(t *testing.T) {
	st := &dataplane.Status{PinDir: "/sys/fs/bpf/x", Cgroups: []dataplane.CgroupStatus{}, DisabledCgroups: []dataplane.CgroupStatus{}}
	now := time.Now()
	statusKeys := map[string]bool{}
	for _, k := range jsonKeys(t, newStatusJSON(st, "/sys/fs/cgroup", now)) {
		statusKeys[k] = true
	}
	for _, k := range jsonKeys(t, stats.FromStatus(st, "/sys/fs/cgroup", now)) {
		if !statusKeys[k] {
			t.Errorf("stats --json has %q, status --json does not", k)
		}
	}
	data, _ := json.Marshal(newStatusJSON(st, "/sys/fs/cgroup", now))
	if !strings.Contains(string(data), `"disabled_cgroups":[]`) || !strings.Contains(string(data), `"cgroups":[]`) {
		t.Errorf("status --json without cgroups: %s", data)
	}
}

// TestDaemonSaysSockhashSizeIsIgnoredOnAnInstall: the daemon's
// sockhashSize, like enable --sockhash-size, only sizes a new sockhash.
func TestDaemonSaysSockhashSizeIsIgnoredOnAnInstall(t *testing.T) {
	pinDir, cg := newInstallDir(t)
	mustSockbypass(t, "enable", "--cgroup", cg.Path, "--bpffs-dir", pinDir)
	d := startDaemonWith(t, pinDir, fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nmetricsAddr: ''\nrescanInterval: 200ms\nsockhashSize: 1024\n", cg.Path), cg)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(d.logs.String(), "sockhashSize ignored") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(d.logs.String(), "sockhashSize ignored") || !strings.Contains(d.logs.String(), "sockbypass uninstall") {
		t.Errorf("the daemon does not say its sockhashSize is ignored:\n%s", d.logs.String())
	}
}
