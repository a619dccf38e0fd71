// Package daemon keeps the pinned state in line with the configuration:
// it adopts what is pinned, enables the cgroups the configuration names
// (globs are expanded again every rescan interval, so new pods are picked
// up), disables the ones it no longer names or that were removed, reloads
// the configuration on request, and reports a full sockhash.
//
// Node addresses (which pod addresses are unique on the node, for pairing
// across namespaces) are refreshed at the same rescan, for the same reason:
// a netlink subscription per pod namespace would have to follow namespaces
// as they come and go, while the rescan sees every change within one
// interval.
//
// New cgroups are found by a periodic rescan rather than inotify: cgroupfs
// needs one inotify watch per directory level, a glob such as
// kubepods.slice/*/* spans levels that appear and vanish with pods, and a
// missed event would leave a pod unaccelerated for good, while expanding a
// few hundred directories every couple of seconds costs next to nothing.
package daemon

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/logrepeat"
)

// Daemon reconciles the pinned state with a configuration.
type Daemon struct {
	log *zap.Logger
	dp  *dataplane.Dataplane

	mu  sync.Mutex
	cfg *config.Config
	// owners are the targets of the last reconcile by cgroup id, for
	// the fallback events (watchEvents).
	owners map[uint64]Target

	// warnings keeps a failing rescan step from warning at every rescan.
	warnings logrepeat.Warner

	// lastInsertFailures is the total of insert failures at the last
	// check, to report a full sockhash once per increase.
	lastInsertFailures uint64

	// source, when set, selects cgroups beside the configuration's globs
	// (the pods of a Kubernetes node); see SetSource.
	source Source
	// health is what Ready reports, and the failure counters.
	health health
}

// New returns a daemon over dp with the configuration cfg.
func New(dp *dataplane.Dataplane, cfg *config.Config, log *zap.Logger) *Daemon {
	return &Daemon{log: log, dp: dp, cfg: cfg, health: newHealth()}
}

// Config returns the configuration in force.
func (d *Daemon) Config() *config.Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

// SetConfig replaces the configuration; the next Reconcile applies it.
func (d *Daemon) SetConfig(cfg *config.Config) {
	d.mu.Lock()
	d.cfg = cfg
	d.mu.Unlock()
}

// Result says what one Reconcile changed.
type Result struct {
	Enabled, Disabled []uint64
}

// Reconcile makes the enabled cgroups those the configuration names now:
// it enables the missing ones (with the configured TC devices and mode,
// which Enable also re-applies to those already enabled) and disables the
// enabled ones it no longer names, including cgroups that were removed. It
// goes on after a failure with one cgroup and returns the first error.
func (d *Daemon) Reconcile() (Result, error) {
	var res Result
	cfg := d.Config()
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return res, err
	}
	desired, err := cfg.Expand(mounts)
	if err != nil {
		d.health.reconciled(err, nil, 0)
		return res, err
	}
	targets, pending, err := d.targets(cfg, mounts, desired)
	if err != nil {
		d.health.reconciled(err, nil, 0)
		return res, err
	}
	enabled, err := d.dp.EnabledCgroupIDs()
	if err != nil {
		d.health.reconciled(err, nil, 0)
		return res, err
	}
	isEnabled := map[uint64]bool{}
	for _, id := range enabled {
		isEnabled[id] = true
	}
	want := map[uint64]bool{}
	owners := make(map[uint64]Target, len(targets))
	for _, t := range targets {
		owners[t.Cgroup.ID] = t
	}
	d.mu.Lock()
	d.owners = owners
	d.mu.Unlock()
	var firstErr error
	for _, t := range targets {
		cg := t.Cgroup
		want[cg.ID] = true
		opts := dataplane.EnableOptions{TCDevices: cfg.TCDevicesOrDefault(), AccountOnly: cfg.AccountOnly.Value, AllConnections: cfg.AllConnections.Value, NoProbation: cfg.NoProbation.Value, Mesh: t.Mesh, StackPorts: cfg.StackPortValues()}
		changed, err := d.dp.Enable(cg, opts)
		if err != nil {
			// The cgroup may have gone between the glob and the attach.
			err = fmt.Errorf("enable %s: %w", cg.Path, err)
			d.log.Warn("enable failed", zap.String("cgroup", cg.Path), zap.String("owner", t.Owner), zap.Error(err))
			d.health.enableFailures.Inc()
			if d.source != nil {
				d.source.EnableFailed(t, err)
			}
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if changed { // the dataplane logs it
			res.Enabled = append(res.Enabled, cg.ID)
		}
	}
	for _, id := range enabled {
		if want[id] {
			continue
		}
		path, _ := mounts.PathByID(id)
		if _, err := d.dp.Disable(id); err != nil {
			d.log.Warn("disable failed", zap.Uint64("cgroup_id", id), zap.Error(err))
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		res.Disabled = append(res.Disabled, id)
		if path == "" {
			d.log.Info("cgroup removed: detached its programs", zap.Uint64("cgroup_id", id))
		} else {
			d.log.Info("cgroup no longer configured: disabled", zap.String("cgroup", path), zap.Uint64("cgroup_id", id))
		}
	}
	// Listeners that became non-blocking after listen() (redis), and
	// those of processes that existed before their cgroup was enabled.
	if _, err := d.dp.RefreshListeners(); err != nil {
		d.warnings.Warn(d.log, "refresh listeners", "refresh listeners", err)
	} else {
		d.warnings.Clear("refresh listeners")
	}
	// Pair handshakes that no socket will remove (aborted handshakes).
	if n, err := d.dp.ReapPairs(dataplane.PairReapAge); err != nil {
		d.log.Warn("reap pair handshakes", zap.Error(err))
	} else if n > 0 {
		d.log.Info("reaped stale pair handshakes", zap.Int("count", n))
	}
	if _, err := d.dp.ForgetRemovedCgroups(); err != nil {
		d.log.Warn("forget removed cgroups", zap.Error(err))
	}
	if _, err := d.dp.RefreshNodeAddrs(cfg.ExtraNetnsPaths()...); err != nil {
		d.log.Warn("refresh node addresses", zap.Error(err))
		if firstErr == nil {
			firstErr = err
		}
	}
	d.checkSockhash()
	d.health.reconciled(firstErr, pending, len(targets))
	return res, firstErr
}

// checkSockhash logs once per increase when sockets could not be inserted.
func (d *Daemon) checkSockhash() {
	counters, err := d.dp.Counters()
	if err != nil {
		return
	}
	var total uint64
	for _, c := range counters {
		total += c.InsertFailures
	}
	if total > d.lastInsertFailures {
		d.log.Warn("sockhash full: new connections take the normal TCP path; raise sockhashSize",
			zap.Uint64("sockets_not_inserted", total-d.lastInsertFailures),
			zap.Uint64("sockets_not_inserted_total", total))
	}
	d.lastInsertFailures = total
}

// Run reconciles now and then every rescan interval, and reloads the
// configuration with load whenever reload receives; a configuration that
// fails to load is logged with its line and the previous one stays in
// force. Meanwhile it logs the datapath's fallback events (watchEvents).
// Run returns when ctx is done.
func (d *Daemon) Run(ctx context.Context, reload <-chan struct{}, load func() (*config.Config, error)) {
	go d.watchEvents(ctx)
	if _, err := d.Reconcile(); err != nil {
		d.log.Warn("reconcile", zap.Error(err))
	}
	var changed <-chan struct{}
	if d.source != nil {
		changed = d.source.Changed()
	}
	for {
		timer := time.NewTimer(d.Config().Rescan())
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-reload:
			timer.Stop()
			cfg, err := load()
			if err != nil {
				d.health.reloadFailures.Inc()
				d.health.configRefused(err)
				d.log.Error("config reload refused; keeping the previous configuration", zap.Error(err))
				continue
			}
			d.health.configRefused(nil)
			d.SetConfig(cfg)
			d.log.Info("config reloaded")
		case <-changed:
			timer.Stop()
		case <-timer.C:
		}
		if _, err := d.Reconcile(); err != nil {
			d.log.Warn("reconcile", zap.Error(err))
		}
	}
}

// String describes the daemon for logs.
func (d *Daemon) String() string { return fmt.Sprintf("daemon(%s)", d.dp.PinDir()) }
