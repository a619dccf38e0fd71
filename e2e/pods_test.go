package e2e

import (
	"fmt"
	"io"
	"os"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/e2e/workload"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

// podCases are the pod-to-pod request/response cases: both ends on CPU 0,
// and unpinned.
var podCases = []workload.Case{
	{Name: "pod to pod rr 64B 1cpu", Kind: workload.KindRR, Size: 64, CPUs: workload.CPUs{Client: 0, Server: 0}},
	{Name: "pod to pod rr 64B", Kind: workload.KindRR, Size: 64, CPUs: workload.Unpinned},
	{Name: "pod to pod stream 128KiB", Kind: workload.KindStream, Size: 128 << 10, CPUs: workload.Unpinned},
}

// comparePods measures two pods joined by a veth (10.9.5.1 -> 10.9.5.2):
// plain = the same two namespaces from cgroups that are not enabled,
// accelerated = from the pods' enabled cgroups. It returns the results and
// the sum of the two pods' counters.
func comparePods(tb testing.TB, runs int, dur time.Duration) ([]workload.Result, dataplane.CgroupCounters) {
	tb.Helper()
	dp := dptest.Install(tb)
	a, b := testutil.NewPod(tb), testutil.NewPod(tb)
	testutil.Link(tb, a, "10.9.5.1/24", b, "10.9.5.2/24", "sbxpa", "sbxpb")
	for _, p := range []*testutil.Pod{a, b} {
		if _, err := dp.Enable(p.Cgroup, dataplane.EnableOptions{NoProbation: true}); err != nil {
			tb.Fatal(err)
		}
	}
	if addrs, err := dp.RefreshNodeAddrs(); err != nil || addrs.Unique != 2 {
		tb.Fatalf("node addresses %+v, %v", addrs, err)
	}
	plainA, plainB := testutil.NewCgroup(tb), testutil.NewCgroup(tb)
	results, err := workload.CompareConnect(podCases, runs, dur, nil, func(accel bool) (workload.Pair, error) {
		cgA, cgB := plainA, plainB
		if accel {
			cgA, cgB = a.Cgroup, b.Cgroup
		}
		inA := func(fn func()) { testutil.InCgroup(tb, cgA, func() { testutil.InNetNS(tb, a.Netns, fn) }) }
		inB := func(fn func()) { testutil.InCgroup(tb, cgB, func() { testutil.InNetNS(tb, b.Netns, fn) }) }
		return workload.ConnectTo(inA, [4]byte{10, 9, 5, 2}, inB)
	})
	if err != nil {
		tb.Fatal(err)
	}
	counters, err := dp.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	pods := counters[a.Cgroup.ID]
	pods.Add(counters[b.Cgroup.ID])
	return results, pods
}

// BenchmarkPodToPod prints pod-to-pod (two network namespaces joined by a
// veth) plain vs accelerated. Goal: RR p50 at least 1.5x faster with both
// ends on one CPU.
func BenchmarkPodToPod(b *testing.B) {
	for i := 0; i < b.N; i++ {
		results, _ := comparePods(b, *benchRuns, *benchDuration)
		fmt.Println("Pod to pod over a veth (two network namespaces):")
		workload.PrintTable(os.Stdout, results, *benchRuns)
		writeResults(b, "pod-to-pod", results, func(w io.Writer) {
			fmt.Fprintf(w, "# Pod to pod over a veth (medians of %d alternating runs of %v)\n\n", *benchRuns, *benchDuration)
			workload.PrintTable(w, results, *benchRuns)
		})
	}
}

// TestPodToPodQuick is the CI run of the pod-to-pod comparison: it must
// verify its bytes, and every accelerated connection must pair across the
// namespaces (both ends inserted) and redirect every byte from the first:
// none through the stack, all of them to the other namespace.
func TestPodToPodQuick(t *testing.T) {
	const runs = 1
	results, pods := comparePods(t, runs, 150*time.Millisecond)
	// Each measured connection comes after a warm-up connection to the
	// same listener (workload.ConnectTo), which pairs too (the pods are
	// enabled without probation).
	if want := uint64(2 * 2 * runs * len(podCases)); pods.SocketsInserted != want {
		t.Errorf("%d sockets joined the sockhash, want both ends of the %d accelerated connections and of their warm-ups: %+v", pods.SocketsInserted, runs*len(podCases), pods)
	}
	if pods.RedirectedXnsBytes == 0 || pods.RedirectedXnsBytes != pods.RedirectedBytes || pods.PassedBytes != 0 {
		t.Errorf("redirected %d bytes, %d of them across namespaces, %d through the stack: want every byte redirected across: %+v",
			pods.RedirectedBytes, pods.RedirectedXnsBytes, pods.PassedBytes, pods)
	}
	for _, r := range results {
		t.Logf("%s %s: plain %.2f %s, accelerated %.2f %s (%.2fx)", r.Case, r.Metric, r.PlainMedian, r.Unit, r.AccelMedian, r.Unit, r.Ratio)
	}
}
