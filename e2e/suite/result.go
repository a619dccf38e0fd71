package suite

import (
	"sort"
	"time"

	"github.com/sockbypass/sockbypass/e2e/workload"
)

// MetricSpec declares one metric a case reports.
type MetricSpec struct {
	Name string
	Unit string
	// LowerIsBetter is true for latencies and costs.
	LowerIsBetter bool
}

// Percentile is one point of a latency distribution.
type Percentile struct {
	// P is the percentile, 0 for the minimum and 100 for the maximum.
	P float64 `json:"p"`
	// Us is the latency at P, in microseconds.
	Us float64 `json:"us"`
}

// Sample is what one run of a case measured.
type Sample struct {
	// Values holds one value per MetricSpec name.
	Values map[string]float64
	// Percentiles is the latency distribution of the run, when it has one.
	Percentiles []Percentile
	// Checks lists the integrity checks the run passed.
	Checks []string
}

// MetricResult compares one metric, plain vs accelerated.
type MetricResult = workload.Comparison

// Traffic is what the sockbypass counters saw during the runs of one mode.
type Traffic struct {
	RedirectedBytes uint64 `json:"redirected_bytes"`
	RedirectedMsgs  uint64 `json:"redirected_msgs"`
	PassedBytes     uint64 `json:"passed_bytes"`
	// StackEgressBytes is the TCP payload the mode's sockets sent through
	// the stack to local peers, on any device (the cgroup's egress
	// accounting): unpaired connections and whatever a pair passed.
	StackEgressBytes uint64 `json:"stack_egress_bytes"`
	SocketsInserted  uint64 `json:"sockets_inserted"`
	// SocketsBlocking counts the connections left plain because an end
	// blocks.
	SocketsBlocking uint64 `json:"sockets_blocking"`
	// ConnectionsShortLived counts the connections left plain because
	// their listener's connections are short-lived.
	ConnectionsShortLived uint64 `json:"connections_short_lived"`
	// LateBlocking counts the members that turned blocking after they
	// joined (a client that connects non-blocking and then blocks, as
	// hiredis's blocking context in redis-benchmark's setup does): their
	// pair dissolves, and their later bytes take the stack.
	LateBlocking uint64 `json:"late_blocking"`
	// PairsAbandoned counts the pairs given up because their client sent
	// before its server joined: their bytes take the stack by design.
	PairsAbandoned uint64 `json:"pairs_abandoned"`
	// RedirectFailures counts the messages of a redirecting socket whose
	// peer was gone (it closed): passed on.
	RedirectFailures uint64 `json:"redirect_failures"`
}

// RedirectedShare is the part of the payload that was redirected:
// redirected / (redirected + stack egress), 0 when nothing was sent.
func (t Traffic) RedirectedShare() float64 {
	total := t.RedirectedBytes + t.StackEgressBytes
	if total == 0 {
		return 0
	}
	return float64(t.RedirectedBytes) / float64(total)
}

// CaseResult is the outcome of one case.
type CaseResult struct {
	Name     string `json:"name"`
	Topology string `json:"topology"`
	Workload string `json:"workload"`
	// Size is the message, write or body size in bytes (0 when none).
	Size int `json:"size_bytes,omitempty"`
	// Kind is the case's kind (Case.Kind): accelerated, short-lived or
	// control.
	Kind    string         `json:"kind"`
	Metrics []MetricResult `json:"metrics"`
	// Plain and Accelerated are the counter deltas over all runs of each
	// mode (Plain sums every cgroup: it must stay zero).
	PlainTraffic Traffic `json:"plain_traffic"`
	AccelTraffic Traffic `json:"accelerated_traffic"`
	// Paired is true when the accelerated runs took the fast path.
	Paired bool `json:"paired"`
	// Checks lists the integrity checks passed, per mode.
	Checks []string `json:"checks"`
	// Note explains the result (for example why a blocking workload was
	// not accelerated).
	Note string `json:"note,omitempty"`
	// Error is set when the case failed; a failed integrity check fails
	// the suite.
	Error string `json:"error,omitempty"`
	// Latency distributions of the median run of each mode.
	PlainPercentiles []Percentile `json:"plain_percentiles,omitempty"`
	AccelPercentiles []Percentile `json:"accelerated_percentiles,omitempty"`
	// Elapsed is the wall time of the case.
	Elapsed time.Duration `json:"elapsed_ns"`
}

// newMetricResult summarises the runs of one metric.
func newMetricResult(spec MetricSpec, plain, accel []float64) MetricResult {
	return workload.NewComparison(spec.Name, spec.Unit, spec.LowerIsBetter, plain, accel)
}

// medianRun returns the index of the run whose value of metric is the
// median (the lower middle for an even count), or -1.
func medianRun(samples []Sample, metric string) int {
	if len(samples) == 0 {
		return -1
	}
	idx := make([]int, len(samples))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return samples[idx[a]].Values[metric] < samples[idx[b]].Values[metric] })
	return idx[(len(idx)-1)/2]
}

// sortPercentiles orders a distribution by percentile.
func sortPercentiles(p []Percentile) {
	sort.Slice(p, func(i, j int) bool { return p[i].P < p[j].P })
}
