package daemon

import (
	"errors"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	tu "github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

// listSource is a Source with a fixed selection, recording failures.
type listSource struct {
	targets []Target
	pending []string
	mu      sync.Mutex
	failed  map[string]error
}

func (s *listSource) Targets(cgroup.Mounts, *config.Config) ([]Target, []string, error) {
	return s.targets, s.pending, nil
}

func (s *listSource) EnableFailed(t Target, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failed[t.Owner] = err
}

func (s *listSource) Changed() <-chan struct{} { return nil }

// TestEnableFailureIsCountedReportedAndNotReady: a selected cgroup that
// cannot be enabled (here: removed after it was resolved, as a pod that
// goes away between the informer and the attach) is counted in
// sockbypass_enable_failures_total, reported to its source (the pod's
// Event) and keeps the daemon from being Ready; the others are enabled.
func TestEnableFailureIsCountedReportedAndNotReady(t *testing.T) {
	tu.RequirePrivileged(t)
	dp := dptest.Install(t)
	cfg, err := config.Parse([]byte("cgroups: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	good := tu.NewCgroup(t)
	gone := tu.NewCgroup(t)
	if err := os.Remove(gone.Path); err != nil {
		t.Fatal(err)
	}
	src := &listSource{failed: map[string]error{}, targets: []Target{
		{Cgroup: good, Owner: "default/good"},
		{Cgroup: gone, Owner: "default/gone"},
	}}
	d := New(dp, cfg, zap.NewNop())
	d.SetSource(src)
	if err := d.Ready(); !errors.Is(err, ErrNotReconciled) {
		t.Errorf("Ready before the first reconcile: %v", err)
	}
	res, err := d.Reconcile()
	if err == nil || !strings.Contains(err.Error(), gone.Path) {
		t.Errorf("Reconcile: %v, want the failure naming %s", err, gone.Path)
	}
	if len(res.Enabled) != 1 || res.Enabled[0] != good.ID {
		t.Errorf("enabled %v, want only %d", res.Enabled, good.ID)
	}
	if n := testutil.ToFloat64(d.health.enableFailures); n != 1 {
		t.Errorf("sockbypass_enable_failures_total = %v, want 1", n)
	}
	if src.failed["default/gone"] == nil || src.failed["default/good"] != nil {
		t.Errorf("failures reported to the source: %v", src.failed)
	}
	if err := d.Ready(); err == nil || !strings.Contains(err.Error(), gone.Path) {
		t.Errorf("Ready after a failed enable: %v", err)
	}

	// Once the selection no longer names it: Ready. A pending pod (no
	// cgroup on the node) is not.
	src.targets = src.targets[:1]
	if _, err := d.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if err := d.Ready(); err != nil {
		t.Errorf("Ready: %v", err)
	}
	src.pending = []string{"default/nowhere"}
	d.Reconcile()
	if err := d.Ready(); err == nil || !strings.Contains(err.Error(), "default/nowhere") {
		t.Errorf("Ready with a pending pod: %v", err)
	}
}
