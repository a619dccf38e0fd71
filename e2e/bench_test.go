package e2e

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/e2e/workload"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

var (
	benchRuns     = flag.Int("runs", 5, "alternating runs per case and mode (median reported)")
	benchDuration = flag.Duration("duration", time.Second, "length of one run")
	benchOut      = flag.String("out", "results", "directory for results.json and results.md")
	benchCases    = flag.String("cases", "", "run only the cost cases whose name matches this regular expression")
)

// BenchmarkLoopbackPlainVsAccelerated measures request/response latency and
// stream throughput over 127.0.0.1, plain and accelerated side by side in
// one run, and prints a table (medians of alternating runs, with spread).
// Run it with make bench; timings are reported, never asserted.
func BenchmarkLoopbackPlainVsAccelerated(b *testing.B) {
	_, plain, accel := plainAndAccelerated(b)
	for i := 0; i < b.N; i++ {
		results, err := workload.Compare(plain, accel, workload.DefaultCases, *benchRuns, *benchDuration, nil)
		if err != nil {
			b.Fatal(err)
		}
		workload.PrintTable(os.Stdout, results, *benchRuns)
		writeResults(b, "loopback", results, func(w io.Writer) {
			fmt.Fprintf(w, "# Go-native loopback: plain vs accelerated (medians of %d alternating runs of %v)\n\n", *benchRuns, *benchDuration)
			workload.PrintTable(w, results, *benchRuns)
		})
	}
}

// plainAndAccelerated installs a dataplane of tb's own and makes two
// cgroups: plain, not enabled, and accel, enabled (default options).
func plainAndAccelerated(tb testing.TB) (dp *dataplane.Dataplane, plain, accel cgroup.Cgroup) {
	tb.Helper()
	dp = dptest.Install(tb)
	plain, accel = testutil.NewCgroup(tb), testutil.NewCgroup(tb)
	// The defaults, as the demo enables: the workloads' servers serve a
	// warm-up connection first (workload.Connect), which ends probation.
	if _, err := dp.Enable(accel, dataplane.EnableOptions{}); err != nil {
		tb.Fatal(err)
	}
	return dp, plain, accel
}

// writeResults writes name.json (v) and name.md (what md prints) into
// -out, for e2e/cmd/benchreport to put into README.md.
func writeResults(tb testing.TB, name string, v any, md func(io.Writer)) {
	if err := os.MkdirAll(*benchOut, 0o755); err != nil {
		tb.Fatal(err)
	}
	data, _ := json.MarshalIndent(v, "", "  ")
	if err := os.WriteFile(filepath.Join(*benchOut, name+".json"), data, 0o644); err != nil {
		tb.Fatal(err)
	}
	f, err := os.Create(filepath.Join(*benchOut, name+".md"))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	md(f)
}

// tcCostCases are the stream cases whose cost TC accounting must not raise
// by more than 3%.
var tcCostCases = []workload.Case{
	{Name: "stream 16KiB, TC on lo vs none", Kind: workload.KindStream, Size: 16 << 10, CPUs: workload.Unpinned},
	{Name: "stream 128KiB, TC on lo vs none", Kind: workload.KindStream, Size: 128 << 10, CPUs: workload.Unpinned},
}

// compareTCCost measures plain loopback streams (no sockhash, no sk_msg)
// with TC accounting attached to lo ("accelerated" column) and with no
// program at all ("plain" column), alternating attach and detach. It
// fails when a run's column is not what it says: lo's TC program attached
// for the one, detached for the other.
func compareTCCost(tb testing.TB, dp *dataplane.Dataplane, runs int, dur time.Duration) []workload.Result {
	tb.Helper()
	plain := testutil.NewCgroup(tb)
	owner := testutil.NewCgroup(tb) // enabled only to own the TC attachment
	tb.Cleanup(func() { dp.Disable(owner.ID) })
	results, err := workload.CompareModes(tcCostCases, runs, dur, nil, func(withTC bool) (cgroup.Cgroup, error) {
		var err error
		if withTC {
			_, err = dp.Enable(owner, dataplane.EnableOptions{TCDevices: []dataplane.TCDevice{dataplane.DefaultTCDevice}, NoProbation: true})
		} else {
			_, err = dp.Disable(owner.ID)
		}
		if err != nil {
			return plain, err
		}
		st, err := dp.Status()
		if err != nil {
			return plain, err
		}
		if attached := len(st.TCDevices) == 1 && st.TCDevices[0].ProgramID != 0; attached != withTC || len(st.TCDevices) > 1 {
			return plain, fmt.Errorf("TC accounting wanted on lo: %v; TC devices attached: %+v", withTC, st.TCDevices)
		}
		return plain, nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return results
}

// BenchmarkTCAccountingCost prints plain loopback throughput with only the
// TC accounting attached against no programs at all ("accelerated" is the
// run with TC). Target: at most 3% slower.
func BenchmarkTCAccountingCost(b *testing.B) {
	dp := dptest.Install(b)
	for i := 0; i < b.N; i++ {
		results := compareTCCost(b, dp, *benchRuns, *benchDuration)
		fmt.Println("TC accounting cost (plain = no programs, accelerated = TC egress program on lo):")
		workload.PrintTable(os.Stdout, results, *benchRuns)
	}
}
