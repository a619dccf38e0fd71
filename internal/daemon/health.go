package daemon

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockbypass/sockbypass/cgroup"
)

// ErrNotReconciled is returned by Ready before the first reconcile.
var ErrNotReconciled = errors.New("not ready: the configuration has not been applied yet")

// ErrNothingMatched is wrapped by Ready when requireMatch is set and the
// configured cgroups match nothing on this node.
var ErrNothingMatched = errors.New("the configured cgroups match no cgroup on this node (requireMatch)")

// nothingMatched says what to check when nothing matched, naming the
// cgroup2 mount this host really has (/sys/fs/cgroup/unified on a hybrid
// layout).
func nothingMatched() error {
	mounts, err := cgroup.ReadMounts()
	switch {
	case err != nil:
		return fmt.Errorf("%w: check that the node has cgroup v2 (%v)", ErrNothingMatched, err)
	case mounts.V2 == "":
		return fmt.Errorf("%w: this node has no cgroup v2 mount (cgroup v1 only): sockbypass needs cgroup v2", ErrNothingMatched)
	}
	return fmt.Errorf("%w: check the globs, relative to the cgroup2 mount %s, against ls %s", ErrNothingMatched, mounts.V2, mounts.V2)
}

// health is what the last reconcile and the last reload left, for Ready
// and the failure metrics.
type health struct {
	mu      sync.Mutex
	done    bool
	err     error
	pending []string
	matched int
	refused error

	enableFailures prometheus.Counter
	reloadFailures prometheus.Counter
	reconciles     prometheus.Counter
}

func newHealth() health {
	return health{
		enableFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockbypass_enable_failures_total",
			Help: "Cgroups that could not be enabled (each failed attempt; the pod gets a Kubernetes Event in Kubernetes mode).",
		}),
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockbypass_config_reload_failures_total",
			Help: "Configuration reloads refused (the previous configuration stays in force, and the daemon is not Ready until the file is fixed).",
		}),
		reconciles: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockbypass_reconciles_total",
			Help: "Reconciles the daemon finished, failed ones included: at start, every rescan interval, after a reload and on a change of its Kubernetes selection.",
		}),
	}
}

// reconciled records what a finished reconcile left, and counts it.
func (h *health) reconciled(err error, pending []string, matched int) {
	h.reconciles.Inc()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.done, h.err, h.pending, h.matched = true, err, pending, matched
}

func (h *health) configRefused(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refused = err
}

// Ready returns nil when the current selection is applied: the last
// reconcile enabled every selected cgroup without an error, no selected
// pod lacks its cgroup, the configuration file in force is the one on
// disk (the last reload was not refused), and, with requireMatch, at least
// one cgroup is selected. Otherwise it returns why not.
func (d *Daemon) Ready() error {
	h := &d.health
	require := d.Config().RequireMatch.Value
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.refused != nil:
		return fmt.Errorf("not ready: configuration reload refused, the previous configuration stays in force: %w", h.refused)
	case !h.done:
		return ErrNotReconciled
	case h.err != nil:
		return fmt.Errorf("not ready: %w", h.err)
	case len(h.pending) > 0:
		return fmt.Errorf("not ready: %d selected pods have no cgroup on this node: %s", len(h.pending), strings.Join(h.pending, ", "))
	case require && h.matched == 0:
		return fmt.Errorf("not ready: %w", nothingMatched())
	}
	return nil
}

// Collectors returns the daemon's own metrics: the failure counters, the
// reconcile counter and sockbypass_ready.
func (d *Daemon) Collectors() []prometheus.Collector {
	ready := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "sockbypass_ready",
		Help: "1 when the current selection is applied (what /readyz answers), else 0.",
	}, func() float64 {
		if d.Ready() == nil {
			return 1
		}
		return 0
	})
	return []prometheus.Collector{d.health.enableFailures, d.health.reloadFailures, d.health.reconciles, ready}
}
