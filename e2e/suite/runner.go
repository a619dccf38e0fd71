package suite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// RunCase runs c plain and accelerated, alternating which mode goes first,
// cfg.Runs times each, and summarises. An error (a program that failed, an
// integrity check that did not pass) is returned and also recorded in the
// result.
func (env *Env) RunCase(ctx context.Context, c Case, cfg Config) (res CaseResult, err error) {
	began := time.Now()
	res = CaseResult{Name: c.Name, Topology: c.Topology, Workload: c.Workload, Size: c.Size, Kind: c.Kind()}
	defer func() {
		res.Elapsed = time.Since(began)
		if err != nil {
			err = fmt.Errorf("%s: %w", c.Name, err)
			res.Error = err.Error()
		}
	}()
	if cfg.Runs < 1 {
		cfg.Runs = 1
	}
	topo := env.Topologies[c.Topology]
	if topo == nil {
		return res, fmt.Errorf("unknown topology %q", c.Topology)
	}
	modes := []*Mode{env.Plain, env.Accel}
	insts := map[*Mode]instance{}
	defer func() {
		for _, inst := range insts {
			if stopErr := inst.stop(); stopErr != nil && err == nil {
				err = stopErr
			}
		}
	}()
	for _, m := range modes {
		dir := filepath.Join(env.TempDir, strings.NewReplacer("/", "_", " ", "_").Replace(c.Name)+"-"+m.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return res, err
		}
		inst, err := c.start(ctx, &runContext{env: env, topo: topo, mode: m, cfg: cfg, dir: dir})
		if err != nil {
			return res, fmt.Errorf("start %s servers: %w", m.Label(), err)
		}
		insts[m] = inst
	}
	// As the daemon does at each rescan: servers that make their listener
	// non-blocking after listen() (redis) are recorded as such.
	if _, err := env.DP.RefreshListeners(); err != nil {
		return res, fmt.Errorf("refresh listeners: %w", err)
	}

	samples := map[*Mode][]Sample{}
	traffic := map[*Mode]*Traffic{env.Plain: &res.PlainTraffic, env.Accel: &res.AccelTraffic}
	checks := map[string]bool{}
	for r := 0; r < cfg.Runs; r++ {
		order := modes
		if r%2 == 1 {
			order = []*Mode{env.Accel, env.Plain}
		}
		for _, m := range order {
			if err := ctx.Err(); err != nil {
				return res, err
			}
			before, err := env.DP.Counters()
			if err != nil {
				return res, err
			}
			s, err := insts[m].run(ctx)
			if err != nil {
				return res, fmt.Errorf("%s run %d: %w", m.Label(), r+1, err)
			}
			after, err := env.DP.Counters()
			if err != nil {
				return res, err
			}
			addTraffic(traffic[m], before, after, m)
			if rc, ok := insts[m].(runChecker); ok {
				check, err := rc.check(ctx)
				if err != nil {
					return res, fmt.Errorf("%s run %d: %w", m.Label(), r+1, err)
				}
				s.Checks = append(s.Checks, check)
			}
			samples[m] = append(samples[m], s)
			for _, ch := range s.Checks {
				checks[m.Label()+": "+ch] = true
			}
			if cfg.Progress != nil {
				cfg.Progress("%s run %d/%d %s: %s", c.Name, r+1, cfg.Runs, m.Label(), formatValues(c.Metrics, s))
			}
		}
	}
	for _, m := range modes {
		done, err := insts[m].verify(ctx)
		if err != nil {
			return res, fmt.Errorf("%s integrity: %w", m.Label(), err)
		}
		for _, ch := range done {
			checks[m.Label()+": "+ch] = true
		}
	}
	for _, spec := range c.Metrics {
		res.Metrics = append(res.Metrics, newMetricResult(spec, values(samples[env.Plain], spec.Name), values(samples[env.Accel], spec.Name)))
	}
	if len(c.Metrics) > 0 {
		head := c.Metrics[0].Name
		if i := medianRun(samples[env.Plain], head); i >= 0 {
			res.PlainPercentiles = samples[env.Plain][i].Percentiles
		}
		if i := medianRun(samples[env.Accel], head); i >= 0 {
			res.AccelPercentiles = samples[env.Accel][i].Percentiles
		}
	}
	for _, m := range modes {
		for ch := range checks {
			if strings.HasPrefix(ch, m.Label()+": ") {
				res.Checks = append(res.Checks, ch)
			}
		}
	}
	sortStrings(res.Checks)
	res.Paired = res.AccelTraffic.RedirectedBytes > 0
	if err := c.verdict(&res, cfg.Runs); err != nil {
		return res, err
	}
	return res, nil
}

// verdict checks what the counters saw in runs runs of each mode against
// what the README claims of the case, and sets res.Note: plain runs are
// never accelerated; a blocking workload is never accelerated, and each of
// its connections is counted as blocking (the reason it stays plain);
// every other workload, over loopback and pod to pod over the veth alike,
// redirects at least c.MinRedirected of its payload.
func (c Case) verdict(res *CaseResult, runs int) error {
	plain, accel := res.PlainTraffic, res.AccelTraffic
	switch {
	case plain.RedirectedBytes != 0 || plain.SocketsInserted != 0:
		return fmt.Errorf("plain runs were accelerated (%d bytes redirected, %d sockets inserted): the plain cgroup must not be accelerated",
			plain.RedirectedBytes, plain.SocketsInserted)
	case c.Blocking != "" && (accel.RedirectedBytes != 0 || accel.SocketsInserted != 0):
		return fmt.Errorf("accelerated runs were accelerated although %s (%d bytes redirected, %d sockets inserted): blocking sockets must never join the sockhash",
			c.Blocking, accel.RedirectedBytes, accel.SocketsInserted)
	case c.Blocking != "" && accel.SocketsBlocking < uint64(runs*c.BlockingConns):
		return fmt.Errorf("accelerated runs stayed plain, but not all because they block (%s): sockets_blocking moved by %d, want %d connections of %d runs (%+v)",
			c.Blocking, accel.SocketsBlocking, runs*c.BlockingConns, runs, accel)
	case c.Blocking != "":
		res.Note = "not accelerated: " + c.Blocking
		return nil
	case c.ShortLived:
		// Each connection inserts two sockets when it pairs.
		paired := accel.SocketsInserted / 2
		left := accel.ConnectionsShortLived
		if left == 0 || float64(left) < MinShortLived*float64(left+paired) {
			return fmt.Errorf("accelerated runs of short connections left %d of %d connections plain as short-lived, want at least %.0f%%: the listener did not learn that its connections are short (%+v)",
				left, left+paired, 100*MinShortLived, accel)
		}
		res.Note = fmt.Sprintf("short-lived: %.0f%% of connections left plain", 100*float64(left)/float64(left+paired))
		return nil
	}
	share := accel.RedirectedShare()
	if accel.RedirectedBytes == 0 || share < c.MinRedirected {
		res.Note = fmt.Sprintf("NOT REDIRECTED: %.1f%%", 100*share)
		return fmt.Errorf("accelerated runs redirected %.2f%% of their payload (%d bytes redirected, %d through the stack), want at least %.0f%%",
			100*share, accel.RedirectedBytes, accel.StackEgressBytes, 100*c.MinRedirected)
	}
	return nil
}

// addTraffic adds the counter delta of one run: the mode's cgroup for the
// accelerated mode, every cgroup for the plain one (all must stay zero).
func addTraffic(t *Traffic, before, after map[uint64]dataplane.CgroupCounters, m *Mode) {
	var d dataplane.CgroupCounters
	if m.Accelerated {
		d = after[m.Cgroup.ID].Sub(before[m.Cgroup.ID])
	} else {
		for id, a := range after {
			d.Add(a.Sub(before[id]))
		}
	}
	t.RedirectedBytes += d.RedirectedBytes
	t.RedirectedMsgs += d.RedirectedMsgs
	t.PassedBytes += d.PassedBytes
	t.StackEgressBytes += d.StackEgressBytes
	t.SocketsInserted += d.SocketsInserted
	t.SocketsBlocking += d.SocketsBlocking
	t.ConnectionsShortLived += d.ConnectionsShortLived
	t.LateBlocking += d.LateBlocking
	t.PairsAbandoned += d.PairsAbandoned
	t.RedirectFailures += d.RedirectFailures
}

func values(samples []Sample, metric string) []float64 {
	var v []float64
	for _, s := range samples {
		v = append(v, s.Values[metric])
	}
	return v
}

func formatValues(specs []MetricSpec, s Sample) string {
	var parts []string
	for _, spec := range specs {
		parts = append(parts, fmt.Sprintf("%s %s", spec.Name, formatValue(s.Values[spec.Name], spec.Unit)))
	}
	return strings.Join(parts, ", ")
}
