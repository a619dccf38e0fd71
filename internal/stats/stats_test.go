package stats

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

func TestBypassRatio(t *testing.T) {
	f := FiguresOf(dataplane.CgroupCounters{RedirectedBytes: 99, StackEgressBytes: 1})
	if f.BypassRatio == nil || *f.BypassRatio != 0.99 {
		t.Errorf("ratio = %v, want 0.99", f.BypassRatio)
	}
	if f := FiguresOf(dataplane.CgroupCounters{}); f.BypassRatio != nil {
		t.Errorf("ratio without traffic = %v, want null", *f.BypassRatio)
	}
}

func TestReportJSONFieldsAndRelativePaths(t *testing.T) {
	st := &dataplane.Status{
		PinDir: "/sys/fs/bpf/sockbypass",
		Cgroups: []dataplane.CgroupStatus{
			{ID: 7, Path: "/sys/fs/cgroup/unified/pods/a", Mode: "accelerate", LiveSockets: 2,
				Counters: dataplane.CgroupCounters{RedirectedBytes: 10}},
			{ID: 8, Path: "", Mode: "accelerate"},
		},
	}
	r := FromStatus(st, "/sys/fs/cgroup/unified", time.Unix(0, 0))
	if r.Cgroups[0].Cgroup != "/pods/a" || r.Cgroups[1].Cgroup != "(removed)" {
		t.Errorf("relative paths: %q %q", r.Cgroups[0].Cgroup, r.Cgroups[1].Cgroup)
	}
	data, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{`"cgroup":"/pods/a"`, `"live_sockets":2`, `"redirected_bytes":10`, `"bypass_ratio":1`, `"stack_egress_bytes":0`, `"unattributed":`, `"tc_devices":`} {
		if !strings.Contains(string(data), field) {
			t.Errorf("JSON lacks %s: %s", field, data)
		}
	}
}

// TestFiguresCarryEveryCounter: each counter of the datapath reaches the
// figures (stats --json, status --json, the metrics) under its own JSON
// name with its value, the fallbacks in their map. Found missing once: the
// sidecar-mode counters read 0 everywhere but status's text.
func TestFiguresCarryEveryCounter(t *testing.T) {
	var c dataplane.CgroupCounters
	v := reflect.ValueOf(&c).Elem()
	for i := 0; i < v.NumField(); i++ {
		v.Field(i).SetUint(uint64(1000 + i))
	}
	raw, err := json.Marshal(FiguresOf(c))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	fallbacks, _ := got["fallbacks"].(map[string]any)
	for i := 0; i < v.NumField(); i++ {
		name := strings.Split(v.Type().Field(i).Tag.Get("json"), ",")[0]
		want := float64(1000 + i)
		if reason, ok := strings.CutPrefix(name, "fallback_"); ok {
			if fallbacks[reason] != want {
				t.Errorf("counter %s: fallbacks[%q] = %v, want %v", name, reason, fallbacks[reason], want)
			}
			continue
		}
		if got[name] != want {
			t.Errorf("counter %s: figures have %v, want %v", name, got[name], want)
		}
	}
}
