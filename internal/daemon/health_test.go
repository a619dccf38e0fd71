package daemon

import (
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
)

// TestNothingMatchedNamesTheRealCgroup2Mount: the requireMatch hint names
// the cgroup2 mount this host has (/sys/fs/cgroup/unified on a hybrid
// layout), not a fixed /sys/fs/cgroup.
func TestNothingMatchedNamesTheRealCgroup2Mount(t *testing.T) {
	mounts, err := cgroup.ReadMounts()
	if err != nil || mounts.V2 == "" {
		t.Skipf("no cgroup2 mount: %v", err)
	}
	cfg, err := config.Parse([]byte("cgroups: ['sockbypass-nothing-matches-*']\nrequireMatch: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := New(nil, cfg, zap.NewNop())
	d.health.reconciled(nil, nil, 0)
	err = d.Ready()
	if !errors.Is(err, ErrNothingMatched) || !strings.Contains(err.Error(), "ls "+mounts.V2) || strings.Count(err.Error(), "requireMatch") != 1 {
		t.Errorf("Ready with nothing matched = %v, want it to name ls %s", err, mounts.V2)
	}
}
