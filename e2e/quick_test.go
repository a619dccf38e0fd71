package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/e2e/workload"
)

// TestWorkloadsQuick is the CI subset of the benchmark: every workload runs
// briefly, plain and accelerated, verifies its bytes, and the accelerated
// one must take the fast path (redirect counters move) while the plain one
// must not. Timings are printed, never asserted.
func TestWorkloadsQuick(t *testing.T) {
	dp, plain, accel := plainAndAccelerated(t)
	for _, c := range workload.DefaultCases {
		t.Run(c.Name, func(t *testing.T) {
			before, err := dp.Counters()
			if err != nil {
				t.Fatal(err)
			}
			results, err := workload.Compare(plain, accel, []workload.Case{c}, 1, 150*time.Millisecond, nil)
			if err != nil {
				t.Fatal(err)
			}
			after, err := dp.Counters()
			if err != nil {
				t.Fatal(err)
			}
			// A pair redirects from its first byte: nothing of the
			// accelerated runs may take the stack.
			if d := after[accel.ID].Sub(before[accel.ID]); d.RedirectedBytes == 0 || d.PassedBytes != 0 {
				t.Errorf("accelerated run did not take the fast path from its first byte: %+v", d)
			}
			// The plain sockets are in no enabled cgroup: no counter of any
			// other cgroup (key 0 included) may show redirected bytes.
			for id, c := range after {
				if id == accel.ID {
					continue
				}
				if d := c.Sub(before[id]); d.RedirectedBytes != 0 || d.SocketsInserted != 0 {
					t.Errorf("plain run was accelerated (counters of cgroup %d): %+v", id, d)
				}
			}
			for _, r := range results {
				t.Logf("%s %s: plain %.2f %s, accelerated %.2f %s (%.2fx)", r.Case, r.Metric, r.PlainMedian, r.Unit, r.AccelMedian, r.Unit, r.Ratio)
			}
		})
	}
}

// TestPerMessageCostQuick runs the per-message comparison once, briefly:
// the minimal redirector must hold both ends of its connections, sockbypass
// must redirect every byte, the plain cgroup nothing, and the per-program
// costs must be readable. Timings are printed only.
func TestPerMessageCostQuick(t *testing.T) {
	r := comparePerMessage(t, costCases[:1], 1, 150*time.Millisecond)
	if len(r.Hooks) == 0 {
		t.Fatal("no BPF program cost was recorded")
	}
	var sb strings.Builder
	printCost(&sb, "per-message cost", r, 1, [][2]int{{modeSockbypass, modeMinimal}})
	t.Log("\n" + sb.String())
}
