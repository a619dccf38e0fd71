package workload

import (
	"strings"
	"testing"
)

// TestDemoExplainsSlowerRowsAndSummarises: a row that reads "slower"
// gets a one-line explanation (noise when within the spread), and the
// summary counts faster, noise and slower rows.
func TestDemoExplainsSlowerRowsAndSummarises(t *testing.T) {
	rows := []Result{
		{Case: "rr 64B 1cpu", Comparison: Comparison{Metric: "p50 RTT", LowerIsBetter: true, PlainMedian: 17, AccelMedian: 14, Ratio: 14.0 / 17, PlainSpread: 4, AccelSpread: 4}},
		{Case: "stream 16KiB", Comparison: Comparison{Metric: "throughput", PlainMedian: 10, AccelMedian: 8.2, Ratio: 0.82, PlainSpread: 58, AccelSpread: 18}},
		{Case: "rr 64B 1cpu", Comparison: Comparison{Metric: "p99 RTT", LowerIsBetter: true, PlainMedian: 60, AccelMedian: 66, Ratio: 1.1, PlainSpread: 2, AccelSpread: 2}},
	}
	if e := Explain(rows[0], 3); e != "" {
		t.Errorf("a faster row is explained: %q", e)
	}
	if e := Explain(rows[1], 3); !strings.Contains(e, "0.82x reads slower") || !strings.Contains(e, "no measurable difference") {
		t.Errorf("a slower row within its spread: %q", e)
	}
	if e := Explain(rows[2], 3); !strings.Contains(e, "by more than the run-to-run spread") || !strings.Contains(e, "one CPU") {
		t.Errorf("a slower row beyond its spread: %q", e)
	}
	s := Summary(rows)
	if !strings.Contains(s, "in 1 of 3 rows (rr 64B 1cpu p50 RTT 0.82x)") || !strings.Contains(s, "1 within noise, 1 slower") {
		t.Errorf("summary %q", s)
	}
}
