// Package soak is the churn soak of issue 27: for SOAK_DURATION (2
// minutes by default, which `make test` runs; `make soak` runs 20) it
// drives connections of every kind (allKinds) on loopback and between pods
// over veth at once, against a sockbypass install of its own, while pods,
// cgroups and listeners come and go and cgroups are disabled, enabled and
// the install upgraded. It samples every pinned map's entry count each
// second (dataplane.MapEntryCounts; sock_state, socket storage, through
// the kernel's socket diagnostics: this kernel refuses to load a
// bpf_sk_storage_map iterator), with the kernel's slab and TCP memory,
// writes them as CSV and an SVG plot, and checks at the end, once the
// load has stopped and every socket is closed:
//
//   - every map is back to its baseline (the slots of cgroups excepted,
//     which are kept by design: at most one per cgroup made), and what a
//     map kept is put down to the workload and the path it came from;
//   - every byte arrived intact, and no connection failed that its
//     workload did not break on purpose;
//   - no member of the sockhash sent a byte through the stack
//     (passed_bytes is 0 in every cgroup of the soak, except where that is
//     the design: a member whose peer was reset, a member leaving after a
//     late SO_RCVLOWAT; those are listed);
//   - memory came back (slab and TCP sockets within bounds).
//
// The leaks and errors it finds that are not fixed yet (knownLeaks,
// knownErrors) are reported as skipped subtests with their counts, and
// fail with SOAK_STRICT=1 (make soak); anything else fails.
//
// Meanwhile it does what the daemon does at every rescan (env.rescan:
// listeners, reaping pair handshakes that never completed, forgetting
// what removed cgroups left, node addresses), every 2 s. It reaps
// handshakes older than SOAK_REAP_AGE: 30s by default, so that the
// 2-minute run settles within a minute; SOAK_REAP_AGE=3m reaps as the
// daemon does (dataplane.PairReapAge), and make soak does.
//
// SOAK_ONLY=kind[,kind] runs some workload kinds only, to put a leak down
// to one; SOAK_RESULTS names the results directory (default
// e2e/results/soak-<time>/); SOAK_SETTLE bounds the wait for the maps
// after the load (default 2 × SOAK_REAP_AGE + 15s).
package soak

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

type config struct {
	duration time.Duration
	only     []string
	strict   bool
	results  string
	settle   time.Duration
	// reapAge is the age beyond which the rescan reaps pair handshakes
	// (see env.rescan).
	reapAge time.Duration
}

// rescanInterval is the daemon's default (config.DefaultRescanInterval).
const rescanInterval = 2 * time.Second

func readConfig(t *testing.T) config {
	t.Helper()
	cfg := config{duration: 2 * time.Minute, reapAge: 30 * time.Second, results: os.Getenv("SOAK_RESULTS")}
	for name, d := range map[string]*time.Duration{"SOAK_DURATION": &cfg.duration, "SOAK_SETTLE": &cfg.settle, "SOAK_REAP_AGE": &cfg.reapAge} {
		if v := os.Getenv(name); v != "" {
			parsed, err := time.ParseDuration(v)
			if err != nil || parsed <= 0 {
				t.Fatalf("%s=%q: want a duration such as 20m", name, v)
			}
			*d = parsed
		}
	}
	if v := os.Getenv("SOAK_ONLY"); v != "" {
		for _, k := range strings.Split(v, ",") {
			k = strings.TrimSpace(k)
			if _, ok := workloads[k]; !ok {
				t.Fatalf("SOAK_ONLY=%q: unknown kind %q; the kinds are %s", v, k, strings.Join(allKinds, ", "))
			}
			cfg.only = append(cfg.only, k)
		}
	} else {
		cfg.only = allKinds
	}
	cfg.strict = os.Getenv("SOAK_STRICT") == "1"
	if cfg.settle == 0 {
		// Long enough for the last handshakes of the load to be reaped,
		// and for the offer hints they left to be zeroed with their
		// epoch (two epochs of reapAge at the most, see "Offer hints" in
		// bpf/sockbypass.h).
		cfg.settle = 2*cfg.reapAge + 15*time.Second
	}
	return cfg
}

// knownLeak is a leak the soak found and that is not fixed yet: entries
// of mapName from workload kind whose description holds every string of
// match. Unless SOAK_STRICT=1 it is reported as a skipped subtest (make
// test lists it, with the count and examples, among the skipped tests),
// not failed; any other entry a map keeps fails the test.
type knownLeak struct {
	mapName, kind string
	match         []string
	// what the entries are, in a few words (the skip reason must stay
	// short: make test shows its last line); why, at length.
	what, why string
}

// knownLeaks are the leaks of issue 27 that the soak finds today: remove
// an entry once the datapath frees those entries (the soak then fails if
// they come back). Fixed since the soak first ran (and so failing if they
// return): pairs offers of handshakes that never completed and account-only
// pairs closed while disabled (ReapPairs), listeners closed while their
// cgroup was disabled (disable, ForgetRemovedCgroups), sidecar endpoints of
// sockets closed while disabled (ForgetRemovedCgroups), socket_cgroups of
// sockets closed while their cgroup was disabled (ForgetRemovedCgroups);
// and the error of an upgrade over a cgroup removed while enabled (upgrade
// disables it).
var knownLeaks = []knownLeak{}

// knownError is an error the soak runs into that is not fixed yet: an
// error of workload kind whose text holds match. Unless SOAK_STRICT=1 it
// is reported as a skipped subtest, not failed.
type knownError struct {
	kinds     []string
	match     string
	what, why string
}

var knownErrors = []knownError{}

// knownErrorOf returns the index of the known error that err of kind
// matches, or -1.
func knownErrorOf(kind string, err error) int {
	for i, ke := range knownErrors {
		for _, k := range ke.kinds {
			if k == kind && strings.Contains(err.Error(), ke.match) {
				return i
			}
		}
	}
	return -1
}

// knownLeakOf returns the index of the known leak that covers an entry,
// or -1.
func knownLeakOf(mapName string, e leftEntry) int {
	for i, l := range knownLeaks {
		if l.mapName != mapName || l.kind != e.kind {
			continue
		}
		all := true
		for _, m := range l.match {
			if !strings.Contains(e.detail, m) {
				all = false
				break
			}
		}
		if all {
			return i
		}
	}
	return -1
}

func newLogger(path string) (*zap.Logger, func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, nil, err
	}
	enc := zap.NewDevelopmentEncoderConfig()
	file := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(f), zap.DebugLevel)
	stderr := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(os.Stderr), zap.InfoLevel)
	log := zap.New(zapcore.NewTee(file, stderr))
	return log, func() { log.Sync(); f.Close() }, nil
}

func TestSoak(t *testing.T) {
	cfg := readConfig(t)
	testutil.RequirePrivileged(t)
	began := time.Now()
	dir, err := resultsDir(cfg)
	if err != nil {
		t.Fatal(err)
	}
	log, closeLog, err := newLogger(filepath.Join(dir, "soak.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeLog)
	log.Info("churn soak", zap.Duration("duration", cfg.duration), zap.Strings("kinds", cfg.only), zap.String("results", dir),
		zap.Duration("reap_age", cfg.reapAge), zap.Duration("settle", cfg.settle))

	e := newEnv(t, cfg, log)
	var kinds []*kind
	for _, name := range cfg.only {
		k := &kind{name: name, e: e, tolerant: workloads[name].tolerant, static: map[string]cgroup.Cgroup{}, churned: map[uint64]dataplane.CgroupCounters{}}
		if err := workloads[name].setup(k); err != nil {
			t.Fatalf("set up %s: %v", name, err)
		}
		kinds = append(kinds, k)
	}
	if err := e.refreshNodeAddrs(); err != nil {
		t.Fatal(err)
	}

	// Baseline: the static cgroups enabled, nothing else.
	s := newSampler(e, kinds)
	if _, err := s.read(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	base, err := s.read()
	if err != nil {
		t.Fatal(err)
	}
	baseEntries, err := e.readEntries()
	if err != nil {
		t.Fatal(err)
	}
	baseSocks, err := e.storageSockets()
	if err != nil {
		t.Fatal(err)
	}
	setupTook := time.Since(began)

	// Load.
	ctx, cancel := context.WithTimeout(context.Background(), cfg.duration)
	defer cancel()
	var wg sync.WaitGroup
	running := map[string]bool{}
	var runMu sync.Mutex
	s.startLoad()
	loadStart := time.Now()
	// The daemon's rescans, through the load and the settle.
	stopRescans := make(chan struct{})
	rescansDone := e.rescanEvery(rescanInterval, cfg.reapAge, stopRescans)
	rescansStopped := false
	endRescans := func() {
		if !rescansStopped {
			rescansStopped = true
			close(stopRescans)
			<-rescansDone
		}
	}
	s.run(time.Second, func(smp sample) {
		log.Info(fmt.Sprintf("t=%.0fs ok=%d failed=%d sockhash=%d pairs=%d listeners=%d socket_cgroups=%d sock_state=%d node_addrs=%d mesh_endpoints=%d slab=%.0fMiB tcp_alloc=%d sample=%v (maps %v, sock_diag %v)",
			smp.at.Seconds(), smp.ok, smp.failed, smp.counts[dataplane.PinSockhash], smp.counts[dataplane.PinPairs], smp.counts[dataplane.PinListeners],
			smp.counts[dataplane.PinSocketCgs], smp.counts[sockStateMap], smp.counts[dataplane.PinNodeAddrs], smp.counts[dataplane.PinMeshEndpoints],
			float64(smp.mem.slabKiB)/1024, smp.mem.tcpAlloc, smp.took.Round(time.Millisecond), smp.tookMaps.Round(time.Millisecond), smp.tookSocks.Round(time.Millisecond)))
	})
	// Whatever happens, the workloads stop and the sampler too before the
	// environment goes.
	stopped := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		select {
		case <-stopped:
		case <-time.After(3 * time.Minute):
			t.Errorf("workloads still running 3 minutes after the end: %v", runningKinds(&runMu, running))
		}
		s.close()
		endRescans()
	})
	for _, k := range kinds {
		wg.Add(1)
		runMu.Lock()
		running[k.name] = true
		runMu.Unlock()
		go func() {
			defer wg.Done()
			workloads[k.name].run(ctx, k)
			runMu.Lock()
			delete(running, k.name)
			runMu.Unlock()
			log.Info("workload stopped", zap.String("kind", k.name))
		}()
	}
	go func() { wg.Wait(); close(stopped) }()
	<-ctx.Done()
	loadEnd := time.Since(loadStart)
	s.setPhase(phaseStop)
	log.Info("load stops; waiting for the workloads to close everything")
	select {
	case <-stopped:
	case <-time.After(3 * time.Minute):
		t.Fatalf("workloads still running 3 minutes after the load stopped: %v", runningKinds(&runMu, running))
	}
	stopTook := time.Since(loadStart) - loadEnd
	s.close()

	// Settle: every map back to its baseline, or SOAK_SETTLE.
	s.setPhase(phaseSettle)
	if err := e.refreshNodeAddrs(); err != nil {
		t.Error(err)
	}
	settleStart := time.Now()
	var final sample
	for {
		final, err = s.read()
		if err != nil {
			t.Fatal(err)
		}
		if backToBaseline(base, final) || time.Since(settleStart) > cfg.settle {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	settleTook := time.Since(settleStart)
	endRescans()
	finalEntries, err := e.readEntries()
	if err != nil {
		t.Fatal(err)
	}
	finalSocks, err := e.storageSockets()
	if err != nil {
		t.Fatal(err)
	}

	// Report.
	samples := s.samples()
	left := e.leftovers(baseEntries, finalEntries, baseSocks, finalSocks)
	ids := e.reg.cgroupIDs()
	rows := summarize(samples, base, final, left, len(ids))
	kindRows, err := e.kindRows(kinds)
	if err != nil {
		t.Fatal(err)
	}
	var sum strings.Builder
	fmt.Fprintf(&sum, "# Churn soak, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&sum, "Load %v (%s), stop %v, settle %v (bound %v), whole test %v; %d samples, %d cgroups. "+
		"A rescan as the daemon's every %v (listeners, pair handshakes older than %v reaped, removed cgroups forgotten, node addresses).\n\n",
		loadEnd.Round(time.Second), strings.Join(cfg.only, ", "), stopTook.Round(time.Second), settleTook.Round(100*time.Millisecond),
		cfg.settle, time.Since(began).Round(time.Second), len(samples), len(ids), rescanInterval, cfg.reapAge)
	writeMapTable(&sum, rows)
	fmt.Fprintln(&sum)
	writeLeftoverDetails(&sum, rows)
	fmt.Fprintln(&sum)
	writeKindTable(&sum, kindRows)
	fmt.Fprintln(&sum)
	writeMemTable(&sum, base.mem, peakMem(samples), final.mem)
	for _, r := range kindRows {
		for _, p := range r.passedOK {
			fmt.Fprintf(&sum, "\n- %s: passed_bytes by design: %s", r.name, p)
		}
	}
	for _, k := range kinds {
		for i, errs := range k.st.known {
			fmt.Fprintf(&sum, "\n- %s: KNOWN ERROR, %d times: %s (e.g. %s)", k.name, len(errs), knownErrors[i].what, errs[0])
		}
		for _, n := range k.sortedNotes() {
			fmt.Fprintf(&sum, "\n- %s: %s", k.name, n)
		}
	}
	fmt.Fprintf(&sum, "\nsetup %v, sampling took %v on average\n", setupTook.Round(100*time.Millisecond), avgTook(samples))
	if err := os.WriteFile(filepath.Join(dir, "summary.md"), []byte(sum.String()), 0o644); err != nil {
		t.Error(err)
	}
	if err := writeCSV(filepath.Join(dir, "maps.csv"), samples); err != nil {
		t.Error(err)
	}
	if err := writeSVG(filepath.Join(dir, "maps.svg"), samples, rows, loadEnd, fmt.Sprintf("sockbypass churn soak: %v of %s", loadEnd.Round(time.Second), strings.Join(cfg.only, ", "))); err != nil {
		t.Error(err)
	}
	t.Log("\n" + sum.String())
	t.Logf("results: %s (summary.md, maps.csv, maps.svg, soak.log)", dir)
	log.Info("results", zap.String("dir", dir))

	// Assertions.
	for _, r := range kindRows {
		st := r.st
		if n := st.integrity.Load(); n > 0 {
			t.Errorf("%s: %d connections whose bytes did not arrive intact: %s", r.name, n, strings.Join(st.badBytes, "; "))
		}
		if n := st.failed.Load(); n > 0 {
			t.Errorf("%s: %d unexpected errors: %s", r.name, n, strings.Join(st.failures, "; "))
		}
		if st.ok.Load() == 0 {
			t.Errorf("%s: no connection completed in %v", r.name, loadEnd)
		}
		if len(r.passed) > 0 {
			t.Errorf("%s: members sent bytes through the stack (passed_bytes): %s", r.name, strings.Join(r.passed, ", "))
		}
		for i, errs := range st.known {
			ke := knownErrors[i]
			msg := fmt.Sprintf("%s: %d times: %s; why: %s", r.name, len(errs), strings.Join(errs[:min(3, len(errs))], "; "), ke.why)
			if cfg.strict {
				t.Error(msg)
				continue
			}
			t.Run(fmt.Sprintf("known error of %s", r.name), func(t *testing.T) {
				t.Log(msg)
				t.Skipf("KNOWN ERROR, not failed here (SOAK_STRICT=1 fails it): %s, %d times: %s", r.name, len(errs), ke.what)
			})
		}
		if workloads[r.name].neverRedirects && r.counters.RedirectedBytes > 0 {
			t.Errorf("%s: %d bytes redirected: its connections must never be accelerated", r.name, r.counters.RedirectedBytes)
		}
	}
	for _, r := range rows {
		if r.rule == ruleKept {
			if !r.ok {
				t.Errorf("%s: %d entries at the end, more than its baseline %d plus one per cgroup the soak made (%d) and slot 0", r.name, r.final, r.baseline, len(ids))
			}
			continue
		}
		if r.rule == ruleState {
			if !r.ok {
				t.Errorf("%s: %d entries at the end, want at most the one user space keeps", r.name, r.final)
			}
			continue
		}
		if r.ok && len(r.left.byKind) == 0 {
			continue
		}
		if len(r.left.entries) == 0 {
			t.Errorf("%s: %d entries at the end, %d at the baseline (not attributable to a workload)", r.name, r.final, r.baseline)
			continue
		}
		checkLeftovers(t, cfg, r)
	}
	if d := final.mem.slabKiB - base.mem.slabKiB; d > 64<<10 {
		t.Errorf("slab grew by %d MiB over the run (baseline %d MiB, final %d MiB): memory did not come back", d>>10, base.mem.slabKiB>>10, final.mem.slabKiB>>10)
	}
	if d := final.mem.tcpAlloc - base.mem.tcpAlloc; d > 64 {
		t.Errorf("%d more TCP sockets allocated at the end than at the baseline (%d, %d)", d, base.mem.tcpAlloc, final.mem.tcpAlloc)
	}
}

func runningKinds(mu *sync.Mutex, running map[string]bool) []string {
	mu.Lock()
	defer mu.Unlock()
	var out []string
	for k := range running {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// backToBaseline reports whether every map that must return exactly has.
func backToBaseline(base, s sample) bool {
	for name, n := range base.counts {
		if mapRule(name) == ruleExact && s.counts[name] != n {
			return false
		}
	}
	return true
}

func avgTook(samples []sample) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	var sum time.Duration
	for _, s := range samples {
		sum += s.took
	}
	return (sum / time.Duration(len(samples))).Round(time.Millisecond)
}

// kindRows sums each kind's cgroups' counters (read now, or when the
// cgroup went) and lists the cgroups whose members passed bytes.
func (e *env) kindRows(kinds []*kind) ([]kindRow, error) {
	counters, err := e.dp.Counters()
	if err != nil {
		return nil, err
	}
	var rows []kindRow
	for _, k := range kinds {
		r := kindRow{name: k.name, st: &k.st, churn: k.churnEvents.Load()}
		for _, id := range e.reg.cgroupIDs() {
			info, _ := e.reg.cgroup(id)
			if info.kind != k.name {
				continue
			}
			r.cgroups++
			c, ok := counters[id]
			if !ok {
				k.mu.Lock()
				c = k.churned[id]
				k.mu.Unlock()
			}
			r.counters.Add(c)
			if c.PassedBytes > 0 {
				what := fmt.Sprintf("%s %d bytes in %d messages", cgName(info), c.PassedBytes, c.PassedMsgs)
				if info.passOK != "" {
					r.passedOK = append(r.passedOK, what+": "+info.passOK)
				} else {
					r.passed = append(r.passed, what)
				}
			}
		}
		rows = append(rows, r)
	}
	return rows, nil
}

// checkLeftovers fails t for every group of entries a map kept, by
// workload, except the known leaks (skipped subtests, unless strict).
func checkLeftovers(t *testing.T, cfg config, r mapRow) {
	type group struct {
		n        int
		examples []string
	}
	unknown := map[string]*group{}
	knownG := map[int]*group{}
	for _, e := range r.left.entries {
		var g *group
		if i := knownLeakOf(r.name, e); i >= 0 {
			if g = knownG[i]; g == nil {
				g = &group{}
				knownG[i] = g
			}
		} else if g = unknown[e.kind]; g == nil {
			g = &group{}
			unknown[e.kind] = g
		}
		g.n++
		if len(g.examples) < 5 {
			g.examples = append(g.examples, e.detail)
		}
	}
	var kinds []string
	for k := range unknown {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		g := unknown[k]
		t.Errorf("%s keeps %d entries from workload %s after the load (baseline %d, final %d), e.g.: %s",
			r.name, g.n, orUnattributed(k), r.baseline, r.final, strings.Join(g.examples, "; "))
	}
	var idx []int
	for i := range knownG {
		idx = append(idx, i)
	}
	sort.Ints(idx)
	for _, i := range idx {
		l, g := knownLeaks[i], knownG[i]
		msg := fmt.Sprintf("%s keeps %d entries from workload %s after the load (baseline %d, final %d), e.g.: %s. Why: %s",
			r.name, g.n, l.kind, r.baseline, r.final, strings.Join(g.examples, "; "), l.why)
		if cfg.strict {
			t.Error(msg)
			continue
		}
		t.Run(fmt.Sprintf("known leak %s from %s", r.name, l.kind), func(t *testing.T) {
			t.Log(msg)
			t.Skipf("KNOWN LEAK (issue 27), not failed here (SOAK_STRICT=1 fails it): %s keeps %d entries from workload %s: %s",
				r.name, g.n, l.kind, l.what)
		})
	}
}
