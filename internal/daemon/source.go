package daemon

import (
	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Target is one cgroup to keep enabled.
type Target struct {
	Cgroup cgroup.Cgroup
	// Mesh is the cgroup's sidecar mode (nil: none).
	Mesh *dataplane.MeshOptions
	// Owner names what the cgroup belongs to in logs ("namespace/pod"),
	// "" for a cgroup named by the configuration.
	Owner string
}

// Source selects cgroups beside the configuration's globs: the pods of a
// Kubernetes node (internal/k8s). Its methods are called from the
// daemon's goroutine.
type Source interface {
	// Targets returns the cgroups to keep enabled now, and Pending: what
	// is selected but has no cgroup on this node (Ready stays false while
	// any is pending). An error keeps the daemon from disabling anything.
	Targets(mounts cgroup.Mounts, cfg *config.Config) (targets []Target, pending []string, err error)
	// EnableFailed reports a target that could not be enabled (an Event
	// on its pod).
	EnableFailed(t Target, err error)
	// Changed receives when the selection may have changed: the daemon
	// reconciles at once instead of at the next rescan.
	Changed() <-chan struct{}
}

// SetSource adds a source of cgroups; call it before Run.
func (d *Daemon) SetSource(s Source) { d.source = s }

// targets joins the configuration's cgroups (in the configuration's
// sidecar mode) and the source's (in their own); a cgroup both name takes
// the source's mode.
func (d *Daemon) targets(cfg *config.Config, mounts cgroup.Mounts, desired []cgroup.Cgroup) ([]Target, []string, error) {
	out := make([]Target, 0, len(desired))
	index := map[uint64]int{}
	for _, cg := range desired {
		index[cg.ID] = len(out)
		out = append(out, Target{Cgroup: cg, Mesh: cfg.MeshOptions()})
	}
	if d.source == nil {
		return out, nil, nil
	}
	more, pending, err := d.source.Targets(mounts, cfg)
	if err != nil {
		return nil, nil, err
	}
	for _, t := range more {
		if i, ok := index[t.Cgroup.ID]; ok {
			out[i] = t
			continue
		}
		index[t.Cgroup.ID] = len(out)
		out = append(out, t)
	}
	return out, pending, nil
}
