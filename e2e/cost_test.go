package e2e

import (
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/e2e/bpfstats"
	"github.com/sockbypass/sockbypass/e2e/minimal"
	"github.com/sockbypass/sockbypass/e2e/workload"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

// costCases are the cases of the cost benchmarks: request/response at 64 B
// with both ends on CPU 0 (the figure the targets are set on) and unpinned,
// and short connections (open, one 64 B exchange, close) on CPU 0, with
// non-blocking sockets, with non-blocking sockets that get the options Go's
// net package sets on every connection (go-sockopts: five setsockopt calls
// per end, which a cgroup/setsockopt program would cost the kernel's hook
// each: sockbypass attaches none, the empty hooks neither), and with
// blocking ones (which sockbypass leaves plain, the minimal redirector
// does not).
var costCases = []workload.Case{
	{Name: "rr 64B 1cpu", Kind: workload.KindRR, Size: 64, CPUs: workload.CPUs{Client: 0, Server: 0}},
	{Name: "rr 64B", Kind: workload.KindRR, Size: 64, CPUs: workload.Unpinned},
	{Name: "short connections 64B 1cpu", Kind: workload.KindConnRate, Size: 64, CPUs: workload.CPUs{Client: 0, Server: 0}},
	{Name: "short connections 64B go-sockopts 1cpu", Kind: workload.KindConnRate, Size: 64, CPUs: workload.CPUs{Client: 0, Server: 0}, GoSockopts: true},
	{Name: "short connections 64B blocking 1cpu", Kind: workload.KindConnRate, Size: 64, CPUs: workload.CPUs{Client: 0, Server: 0}, Blocking: true},
}

// selectedCostCases is costCases filtered by -cases.
func selectedCostCases(tb testing.TB) []workload.Case {
	if *benchCases == "" {
		return costCases
	}
	re, err := regexp.Compile(*benchCases)
	if err != nil {
		tb.Fatalf("-cases %q: %v", *benchCases, err)
	}
	var cases []workload.Case
	for _, c := range costCases {
		if re.MatchString(c.Name) {
			cases = append(cases, c)
		}
	}
	if len(cases) == 0 {
		tb.Fatalf("-cases %q matches none of the cost cases; pick from rr 64B 1cpu, rr 64B, short connections 64B 1cpu, short connections 64B go-sockopts 1cpu, short connections 64B blocking 1cpu", *benchCases)
	}
	return cases
}

// costReport is what a cost comparison measured.
type costReport struct {
	Results []workload.MultiResult
	// Hooks is what each BPF program cost over all the runs.
	Hooks []bpfstats.Cost
}

// Modes of the per-message comparison.
const (
	modePlain = iota
	modeMinimal
	modeSockbypass
	modeEmptyHooks
)

// comparePerMessage measures the same non-blocking request/response
// workload over loopback in four cgroups, rotating: plain (no programs),
// the minimal redirector (e2e/minimal: insert and redirect, nothing else),
// sockbypass with every transparency rule in force, and the empty hooks
// (sock_ops and cgroup/sock_release programs that return at once: the
// floor under any design on those hooks). It fails when a
// mode did not do what it stands for: the minimal redirector must have
// inserted both ends of each connection, sockbypass must have redirected
// every byte, and the plain cgroup nothing.
func comparePerMessage(tb testing.TB, cases []workload.Case, runs int, dur time.Duration) costReport {
	tb.Helper()
	dp := dptest.Install(tb)
	plain, minCg, accel, emptyCg := testutil.NewCgroup(tb), testutil.NewCgroup(tb), testutil.NewCgroup(tb), testutil.NewCgroup(tb)
	if _, err := dp.Enable(accel, dataplane.EnableOptions{NoProbation: true}); err != nil {
		tb.Fatal(err)
	}
	min, err := minimal.Attach(minCg.Path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := min.Close(); err != nil {
			tb.Errorf("close the minimal redirector: %v", err)
		}
	})
	empty, err := minimal.AttachEmptyHooks(emptyCg.Path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := empty.Close(); err != nil {
			tb.Errorf("close the empty hooks: %v", err)
		}
	})
	countersBefore, err := dp.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	cgs := []cgroup.Cgroup{plain, minCg, accel, emptyCg}
	modes := []string{"plain", "minimal", "sockbypass", "empty hooks"}
	setup := workload.Setup{
		Connect: func(mode int) (workload.Pair, error) {
			p, err := workload.Connect(cgs[mode])
			if err != nil || mode != modeMinimal {
				return p, err
			}
			// Both ends are in the minimal sockhash once connected.
			if n, err := min.SocketsInserted(); err != nil || n < 2 {
				p.Close()
				return workload.Pair{}, fmt.Errorf("the minimal redirector holds %d sockets (%v), want both ends", n, err)
			}
			return p, nil
		},
		RunIn: func(mode int, fn func()) error { return cgs[mode].RunIn(fn) },
	}
	// The ratios, with BPF statistics off: they cost every program run
	// two clock reads, which plain TCP would not pay.
	results, err := workload.CompareN(cases, modes, runs, dur, nil, setup)
	if err != nil {
		tb.Fatal(err)
	}
	counters, err := dp.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	// Every byte of the request/response connections is redirected
	// (short connections are left plain as short-lived or blocking).
	rr := false
	for _, c := range cases {
		rr = rr || c.Kind == workload.KindRR
	}
	if d := counters[accel.ID].Sub(countersBefore[accel.ID]); (rr && d.RedirectedBytes == 0) || d.PassedBytes != 0 {
		tb.Fatalf("sockbypass runs did not redirect every byte: %+v", d)
	}
	if d := counters[plain.ID].Sub(countersBefore[plain.ID]); d.RedirectedBytes != 0 || d.SocketsInserted != 0 {
		tb.Fatalf("plain runs were accelerated: %+v", d)
	}

	// What each program costs per run: one more pass with statistics on.
	stats, err := bpfstats.Enable()
	if err != nil {
		tb.Fatal(err)
	}
	defer stats.Close()
	progs := min.Programs()
	for name, p := range empty.Programs() {
		progs[name] = p
	}
	before, err := bpfstats.Take(dp.PinDir(), progs)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := workload.CompareN(cases, modes, 1, dur, nil, setup); err != nil {
		tb.Fatal(err)
	}
	after, err := bpfstats.Take(dp.PinDir(), progs)
	if err != nil {
		tb.Fatal(err)
	}
	return costReport{Results: results, Hooks: after.Since(before)}
}

// BenchmarkPerMessageCost prints request/response latency of plain TCP,
// the minimal redirector and sockbypass, measured side by side in one run
// (medians of rotating runs with their spread), and what each BPF program
// cost per run. Target: sockbypass within 2% of the minimal redirector on
// rr 64B 1cpu.
func BenchmarkPerMessageCost(b *testing.B) {
	for i := 0; i < b.N; i++ {
		r := comparePerMessage(b, selectedCostCases(b), *benchRuns, *benchDuration)
		ratios := [][2]int{{modeMinimal, modePlain}, {modeSockbypass, modePlain}, {modeSockbypass, modeMinimal}, {modeEmptyHooks, modePlain}}
		title := "Per-message cost: plain TCP, the minimal redirector, sockbypass, the empty hooks"
		printCost(os.Stdout, title, r, *benchRuns, ratios)
		writeResults(b, "cost-per-message", r, func(w io.Writer) {
			fmt.Fprintf(w, "# %s\n\n", title)
			printCost(w, "", r, *benchRuns, ratios)
		})
	}
}

// Modes of the bystander comparison.
const (
	modeIdle = iota
	modeOtherEnabled
	modeOtherEnabledTC
)

// compareBystander measures a request/response workload in a cgroup that
// is not enabled, rotating: while no cgroup is enabled (the install idle:
// nothing node-wide attached), while another cgroup is enabled the default
// way, and while it is enabled with TC accounting on lo (a TC program runs
// for every packet of the device, bystanders' included). It fails when the
// bystander's sockets were touched or when the idle install left node-wide
// programs attached.
func compareBystander(tb testing.TB, cases []workload.Case, runs int, dur time.Duration) costReport {
	tb.Helper()
	dp := dptest.Install(tb)
	bystander, other := testutil.NewCgroup(tb), testutil.NewCgroup(tb)
	tb.Cleanup(func() { dp.Disable(other.ID) })
	stats, err := bpfstats.Enable()
	if err != nil {
		tb.Fatal(err)
	}
	defer stats.Close()
	// Programs come and go with the modes: sum each program's runs
	// between enabling and disabling.
	costs := map[string]bpfstats.Cost{}
	var before bpfstats.Snapshot
	collect := func() error {
		if before == nil {
			return nil
		}
		after, err := bpfstats.Take(dp.PinDir(), nil)
		if err != nil {
			return err
		}
		for _, c := range after.Since(before) {
			sum := costs[c.Program]
			sum.Program, sum.Runs, sum.Runtime = c.Program, sum.Runs+c.Runs, sum.Runtime+c.Runtime
			costs[c.Program] = sum
		}
		before = nil
		return nil
	}
	countersBefore, err := dp.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	modes := []string{"nothing enabled", "another cgroup enabled", "another cgroup enabled, --tc-dev lo"}
	setMode := func(mode int) error {
		if err := collect(); err != nil {
			return err
		}
		if _, err := dp.Disable(other.ID); err != nil {
			return err
		}
		if mode == modeIdle {
			st, err := dp.Status()
			if err != nil {
				return err
			}
			if len(st.TCDevices) != 0 {
				return fmt.Errorf("no cgroup enabled, yet TC devices stay attached: %+v", st.TCDevices)
			}
			return nil
		}
		var opts dataplane.EnableOptions
		if mode == modeOtherEnabledTC {
			opts.TCDevices = []dataplane.TCDevice{dataplane.DefaultTCDevice}
		}
		if _, err := dp.Enable(other, opts); err != nil {
			return err
		}
		before, err = bpfstats.Take(dp.PinDir(), nil)
		return err
	}
	results, err := workload.CompareN(cases, modes, runs, dur, nil, workload.Setup{
		Connect: func(mode int) (workload.Pair, error) {
			if err := setMode(mode); err != nil {
				return workload.Pair{}, err
			}
			return workload.Connect(bystander)
		},
		RunIn: func(mode int, fn func()) error {
			if err := setMode(mode); err != nil {
				return err
			}
			return bystander.RunIn(fn)
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	// End idle, whatever order the modes ran in (with one run, idle ran
	// first, before any TC device was attached): disabling the last
	// cgroup must detach everything node-wide. setMode collects the last
	// mode's program costs first.
	if err := setMode(modeIdle); err != nil {
		tb.Fatal(err)
	}
	counters, err := dp.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	for id, c := range counters {
		if d := c.Sub(countersBefore[id]); d.RedirectedBytes != 0 || d.SocketsInserted != 0 {
			tb.Fatalf("the bystander's sockets were accelerated (counters of cgroup %d): %+v", id, d)
		}
	}
	var hooks []bpfstats.Cost
	for _, c := range costs {
		hooks = append(hooks, c)
	}
	sort.Slice(hooks, func(i, j int) bool { return hooks[i].Program < hooks[j].Program })
	return costReport{Results: results, Hooks: hooks}
}

// BenchmarkBystanderCost prints the request/response latency of sockets in
// a cgroup that is not enabled, with no cgroup enabled and with another
// cgroup enabled, side by side in one run, and what each node-wide program
// cost per run. Target: at most 1% slower.
func BenchmarkBystanderCost(b *testing.B) {
	for i := 0; i < b.N; i++ {
		r := compareBystander(b, selectedCostCases(b), *benchRuns, *benchDuration)
		ratios := [][2]int{{modeOtherEnabled, modeIdle}, {modeOtherEnabledTC, modeIdle}}
		title := "Bystander cost: a cgroup that is not enabled, while another one is"
		printCost(os.Stdout, title, r, *benchRuns, ratios)
		writeResults(b, "cost-bystander", r, func(w io.Writer) {
			fmt.Fprintf(w, "# %s\n\n", title)
			printCost(w, "", r, *benchRuns, ratios)
		})
	}
}

// printCost writes a cost comparison: medians and spreads per mode, the
// ratios asked for (mode a over mode b), and the per-program costs.
func printCost(w io.Writer, title string, r costReport, runs int, ratios [][2]int) {
	if title != "" {
		title += " "
	}
	fmt.Fprintf(w, "%s(medians of %d rotating runs, ± half the max-min spread):\n\n", title, runs)
	if len(r.Results) == 0 {
		return
	}
	modes := r.Results[0].Modes
	fmt.Fprint(w, "| case | metric |")
	for _, m := range modes {
		fmt.Fprintf(w, " %s |", m.Mode)
	}
	for _, ab := range ratios {
		fmt.Fprintf(w, " %s / %s |", modes[ab[0]].Mode, modes[ab[1]].Mode)
	}
	fmt.Fprint(w, "\n|---|---|")
	for range len(modes) + len(ratios) {
		fmt.Fprint(w, "---:|")
	}
	fmt.Fprintln(w)
	for _, res := range r.Results {
		fmt.Fprintf(w, "| %s | %s |", res.Case, res.Metric)
		if res.Metric == workload.MetricStalled {
			for _, m := range res.Modes {
				fmt.Fprintf(w, " %s |", stalledCell(m))
			}
			fmt.Fprintln(w, strings.Repeat(" |", len(ratios)))
			continue
		}
		for _, m := range res.Modes {
			fmt.Fprintf(w, " %.2f %s ±%.0f%% |", m.Median, res.Unit, m.Spread/2)
		}
		for _, ab := range ratios {
			fmt.Fprintf(w, " %.3fx |", res.Ratio(ab[0], ab[1]))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
	bpfstats.Print(w, r.Hooks)
	fmt.Fprintln(w)
}
