package soak

import "testing"

// TestKindPortRanges: every kind has a workload, and its server ports lie
// below the ephemeral range (32768), where no client port can take them,
// so that a port in a map's key names its kind.
func TestKindPortRanges(t *testing.T) {
	for _, k := range allKinds {
		if _, ok := workloads[k]; !ok {
			t.Errorf("kind %s has no workload", k)
		}
	}
	if len(workloads) != len(allKinds) {
		t.Errorf("%d workloads, %d kinds", len(workloads), len(allKinds))
	}
	if top := portBase + len(allKinds)*portsOfKind; top > 32768 {
		t.Errorf("server ports reach %d, into the ephemeral range", top)
	}
	r := registry{next: map[string]int{}}
	for _, k := range allKinds {
		for i := 0; i < portsOfKind+3; i++ {
			if p := r.port(k); kindOfPort(p) != k {
				t.Fatalf("port %d of %s is read back as %q", p, k, kindOfPort(p))
			}
		}
	}
	if kindOfPort(meshSidecarPort) != "mesh" || kindOfPort(1234) != "" {
		t.Error("the sidecar's port is mesh's, ports below the ranges are nobody's")
	}
}
