package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

func TestBadConfigsNameTheLine(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"unknown key", "cgroups: []\nfrobnicate: 3\n", "line 2: unknown key frobnicate (valid keys: cgroups, tcDevices,"},
		{"wrong type", "cgroups: []\nsockhashSize: lots\n", "line 2"},
		{"bad glob", "cgroups:\n  - ok-*\n  - 'pods/[a-'\n", "line 3: cgroups: bad glob"},
		{"missing cgroup", "cgroups:\n  - no-such-cgroup-for-sure\n", "line 2: cgroups: cgroup \"no-such-cgroup-for-sure\""},
		{"bad duration", "rescanInterval: soon\n", "line 1"},
		{"bad level", "cgroups: []\nlogLevel: loud\n", "line 2: logLevel \"loud\""},
		{"bad address", "metricsAddr: 9464\n", "line 1: metricsAddr"},
		{"bad device", "tcDevices: ['relative:lo']\n", "line 1: tcDevices"},
		// A device that does not exist is refused at load (and reload), not
		// warned about at every rescan.
		{"missing device", "cgroups: []\ntcDevices: [lo, nodev-xyz]\n", `line 2: tcDevices: tc device nodev-xyz: no interface "nodev-xyz"`},
		{"stack port 0", "cgroups: []\nstackPorts: [8080, 0]\n", "line 2: stackPorts: 0 is not a port"},
		{"list expected", "cgroups: kubepods\n", "line 1"},
		{"zero sockhash", "sockhashSize: 0\n", "line 1: sockhashSize 0"},
		{"unknown mesh", "mesh:\n  name: consul\n", "line 2: mesh: mesh \"consul\""},
		{"bad mesh cidr", "mesh:\n  name: istio\n  excludeCIDRs: [10.0.0.0]\n", "line 3: mesh.excludeCIDRs"},
		{"unknown mesh key", "mesh:\n  name: istio\n  outbound: 1\n", "line 3: unknown key mesh.outbound (valid keys in mesh: name, intercept,"},
	}
	for _, c := range cases {
		_, err := Parse([]byte(c.yaml))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Parse = %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

func TestDefaults(t *testing.T) {
	cfg, err := Parse([]byte("cgroups: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Metrics() != DefaultMetricsAddr || cfg.Rescan() != DefaultRescanInterval || len(cfg.TCDevicesOrDefault()) != 0 || cfg.Level().String() != "info" {
		t.Errorf("defaults: %q %v %v %v", cfg.Metrics(), cfg.Rescan(), cfg.TCDevicesOrDefault(), cfg.Level())
	}
	cfg, err = Parse([]byte("tcDevices: []\nmetricsAddr: ''\nrescanInterval: 500ms\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Metrics() != "" || cfg.Rescan() != 500*time.Millisecond || len(cfg.TCDevicesOrDefault()) != 0 {
		t.Errorf("explicit values: %q %v %v", cfg.Metrics(), cfg.Rescan(), cfg.TCDevicesOrDefault())
	}
}

func TestExpandGlobs(t *testing.T) {
	parent := testutil.NewCgroup(t)
	var made []string
	for _, name := range []string{"pod-a", "pod-b", "other"} {
		dir := filepath.Join(parent.Path, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		made = append(made, dir)
	}
	t.Cleanup(func() {
		for _, d := range made {
			os.Remove(d)
		}
	})
	rel := strings.TrimPrefix(parent.Rel, "/")
	cfg, err := Parse([]byte("cgroups:\n  - " + rel + "/pod-*\n  - " + parent.Path + "/pod-a\n  - " + rel + "/none-*\n"))
	if err != nil {
		t.Fatal(err)
	}
	mounts, _ := cgroup.ReadMounts()
	got, err := cfg.Expand(mounts)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !strings.HasSuffix(got[0].Path, "pod-a") || !strings.HasSuffix(got[1].Path, "pod-b") {
		t.Errorf("Expand = %v, want pod-a and pod-b once each", got)
	}
}

func TestMeshSection(t *testing.T) {
	cfg, err := Parse([]byte("mesh:\n  name: linkerd\n  intercept: true\n  outboundPort: 4000\n  excludePorts: [9090]\n  excludeCIDRs: [10.0.0.0/8]\n"))
	if err != nil {
		t.Fatal(err)
	}
	m := cfg.MeshOptions()
	if m == nil || !m.Intercept || m.SidecarUID != 2102 || m.OutboundPort != 4000 || m.InboundPort != 4143 || len(m.ExcludePorts) != 1 || len(m.ExcludeCIDRs) != 1 {
		t.Errorf("mesh options %+v", m)
	}
}

// TestConfigErrorsNameTheLineOnce: yaml.v3's own "line N:" is not repeated.
func TestConfigErrorsNameTheLineOnce(t *testing.T) {
	for _, c := range []string{"cgroups: []\ntcDevices: []\nsockhashSize: abc\n", "cgroups: []\nrequireMatch: maybe\n", "mesh:\n  name: istio\n  intercept: x\n"} {
		_, err := Parse([]byte(c))
		if err == nil || strings.Count(err.Error(), "line ") != 1 {
			t.Errorf("Parse(%q) = %v, want one line number", c, err)
		}
	}
}
