package workload

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
)

// Kind is the kind of a workload.
type Kind string

// Workload kinds.
const (
	KindRR     Kind = "rr"
	KindStream Kind = "stream"
	// KindConnRate opens, uses once (a Size-byte request and response)
	// and closes connections, one after another: what short connections
	// cost.
	KindConnRate Kind = "connrate"
)

// Case is one workload to compare.
type Case struct {
	Name string
	Kind Kind
	// Size is the message size (rr) or the write size (stream).
	Size int
	CPUs CPUs
	// Blocking, for a connection-rate case, makes its sockets blocking
	// (ConnRateOpts.Blocking): connections sockbypass leaves plain.
	// Request/response and stream cases block or not as the Setup's
	// Connect makes their pair.
	Blocking bool
	// GoSockopts, for a connection-rate case, sets Go's options on both
	// ends of every connection (ConnRateOpts.GoSockopts), as Go's net
	// package does on every dialed and accepted connection.
	GoSockopts bool
}

// ConnRateOpts are the options of a connection-rate case's loop: its size,
// the client's CPU, blocking sockets, Go's options. The caller places the
// sockets (Addr, ListenIn, DialIn).
func (c Case) ConnRateOpts() ConnRateOpts {
	return ConnRateOpts{Size: c.Size, CPU: c.CPUs.Client, Blocking: c.Blocking, GoSockopts: c.GoSockopts}
}

// DefaultCases are the cases of the loopback benchmark: request/response
// at 64 B and 4 KiB (unpinned, and both ends on CPU 0), stream at 16 KiB
// and 128 KiB writes.
var DefaultCases = []Case{
	{Name: "rr 64B", Kind: KindRR, Size: 64, CPUs: Unpinned},
	{Name: "rr 4KiB", Kind: KindRR, Size: 4096, CPUs: Unpinned},
	{Name: "rr 64B 1cpu", Kind: KindRR, Size: 64, CPUs: CPUs{0, 0}},
	{Name: "rr 4KiB 1cpu", Kind: KindRR, Size: 4096, CPUs: CPUs{0, 0}},
	{Name: "stream 16KiB", Kind: KindStream, Size: 16 << 10, CPUs: Unpinned},
	{Name: "stream 128KiB", Kind: KindStream, Size: 128 << 10, CPUs: Unpinned},
}

// MetricStalled is the metric of a connection-rate case that counts the
// connections of a run that took longer than StallAfter.
const MetricStalled = "connections over 200 ms"

// Comparison compares the runs of one metric, plain vs accelerated. The e2e
// suite's cases and these workloads report it alike.
type Comparison struct {
	Metric string `json:"metric"`
	Unit   string `json:"unit"`
	// LowerIsBetter is true for latencies and costs.
	LowerIsBetter bool      `json:"lower_is_better"`
	Plain         []float64 `json:"plain"`
	Accelerated   []float64 `json:"accelerated"`
	PlainMedian   float64   `json:"plain_median"`
	AccelMedian   float64   `json:"accelerated_median"`
	// Ratio is accelerated / plain (medians; 0 when plain's is 0).
	Ratio float64 `json:"ratio"`
	// Spreads are (max-min)/median of the runs, in percent.
	PlainSpread float64 `json:"plain_spread_pct"`
	AccelSpread float64 `json:"accelerated_spread_pct"`
}

// NewComparison summarises the plain and accelerated runs of metric
// (measured in unit): their medians, spreads and ratio.
func NewComparison(metric, unit string, lowerIsBetter bool, plain, accel []float64) Comparison {
	c := Comparison{Metric: metric, Unit: unit, LowerIsBetter: lowerIsBetter, Plain: plain, Accelerated: accel}
	c.PlainMedian, c.PlainSpread = MedianSpread(plain)
	c.AccelMedian, c.AccelSpread = MedianSpread(accel)
	if c.PlainMedian > 0 {
		c.Ratio = c.AccelMedian / c.PlainMedian
	}
	return c
}

// Result compares one metric of a case, plain vs accelerated.
type Result struct {
	Case string `json:"case"`
	Comparison
}

// Progress, when set, receives a line per measurement.
type Progress func(format string, args ...any)

// Compare runs every case runs times in each mode, alternating plain and
// accelerated, over connections made in plainCg and accelCg (which must be
// enabled), each run lasting dur, and returns the medians.
func Compare(plainCg, accelCg cgroup.Cgroup, cases []Case, runs int, dur time.Duration, progress Progress) ([]Result, error) {
	return CompareModes(cases, runs, dur, progress, func(accel bool) (cgroup.Cgroup, error) {
		if accel {
			return accelCg, nil
		}
		return plainCg, nil
	})
}

// CompareModes is Compare with the two modes set up by setMode, which is
// called before every run with the mode to measure ("accelerated" true or
// false) and returns the cgroup to make the connection in. It lets a
// benchmark compare other pairs, such as no programs vs TC accounting.
func CompareModes(cases []Case, runs int, dur time.Duration, progress Progress, setMode func(accel bool) (cgroup.Cgroup, error)) ([]Result, error) {
	return CompareConnect(cases, runs, dur, progress, func(accel bool) (Pair, error) {
		cg, err := setMode(accel)
		if err != nil {
			return Pair{}, err
		}
		return Connect(cg)
	})
}

// CompareConnect is Compare with connections made by connect, which gets
// the mode to measure: for topologies other than one cgroup on loopback,
// such as two pods joined by a veth.
func CompareConnect(cases []Case, runs int, dur time.Duration, progress Progress, connect func(accel bool) (Pair, error)) ([]Result, error) {
	multi, err := CompareN(cases, []string{"plain", "accelerated"}, runs, dur, progress, Setup{Connect: func(mode int) (Pair, error) {
		return connect(mode == 1)
	}})
	if err != nil {
		return nil, err
	}
	var out []Result
	for _, m := range multi {
		plain, accel := m.Modes[0], m.Modes[1]
		out = append(out, Result{Case: m.Case,
			Comparison: NewComparison(m.Metric, m.Unit, m.LowerIsBetter, plain.Values, accel.Values)})
	}
	return out, nil
}

// ModeValues are one mode's measurements of one metric.
type ModeValues struct {
	Mode   string    `json:"mode"`
	Values []float64 `json:"values"`
	Median float64   `json:"median"`
	// Spread is (max-min)/median of the runs, in percent.
	Spread float64 `json:"spread_pct"`
}

// MultiResult compares one metric across several modes measured in the
// same run.
type MultiResult struct {
	Case          string       `json:"case"`
	Metric        string       `json:"metric"`
	Unit          string       `json:"unit"`
	LowerIsBetter bool         `json:"lower_is_better"`
	Modes         []ModeValues `json:"modes"`
}

// Ratio is the median of mode a over the median of mode b (0 when b's is 0).
func (r MultiResult) Ratio(a, b int) float64 {
	if r.Modes[b].Median == 0 {
		return 0
	}
	return r.Modes[a].Median / r.Modes[b].Median
}

// Setup says how CompareN puts each mode in place; both get the mode's
// index.
type Setup struct {
	// Connect makes a connection of the mode (rr and stream cases).
	Connect func(mode int) (Pair, error)
	// RunIn runs fn where the mode's sockets are created, such as in its
	// cgroup (connection-rate cases; nil when there are none or when
	// ConnRate is set).
	RunIn func(mode int, fn func()) error
	// ConnRate, when set, measures a connection-rate case in a mode
	// (for topologies other than one cgroup on loopback: it calls
	// ConnRateWith with its own ListenIn and DialIn).
	ConnRate func(mode int, c Case, dur time.Duration) (ConnRateResult, error)
}

// CompareN runs every case runs times in each of the named modes, rotating
// which mode goes first from run to run, each run lasting dur, and returns
// the medians and spreads per mode.
func CompareN(cases []Case, modes []string, runs int, dur time.Duration, progress Progress, setup Setup) ([]MultiResult, error) {
	var out []MultiResult
	for _, c := range cases {
		// metric name -> mode -> values
		vals := map[string][][]float64{}
		var metrics []string
		add := func(metric string, mode int, v float64) {
			if vals[metric] == nil {
				vals[metric] = make([][]float64, len(modes))
				metrics = append(metrics, metric)
			}
			vals[metric][mode] = append(vals[metric][mode], v)
		}
		for r := 0; r < runs; r++ {
			for i := range modes {
				mode := (r + i) % len(modes) // rotate who goes first
				if c.Kind == KindConnRate {
					var res ConnRateResult
					var err error
					if setup.ConnRate != nil {
						res, err = setup.ConnRate(mode, c, dur)
					} else if rerr := setup.RunIn(mode, func() {
						res, err = ConnRateWith(c.ConnRateOpts(), dur)
					}); rerr != nil {
						return nil, fmt.Errorf("%s: %s: %w", c.Name, modes[mode], rerr)
					}
					if err != nil {
						return nil, fmt.Errorf("%s: %s: %w", c.Name, modes[mode], err)
					}
					add("connections/s", mode, res.Rate)
					// A stalled connection (a retransmitted SYN waits 1 s)
					// ruins its run's rate: say how many there were.
					add(MetricStalled, mode, float64(res.Stalled))
					if progress != nil {
						progress("%s run %d/%d %s done", c.Name, r+1, runs, modes[mode])
					}
					continue
				}
				p, err := setup.Connect(mode)
				if err != nil {
					return nil, fmt.Errorf("%s: %s: connect: %w", c.Name, modes[mode], err)
				}
				switch c.Kind {
				case KindRR:
					lat, err := RR(p, c.Size, dur, c.CPUs)
					p.Close()
					if err != nil {
						return nil, fmt.Errorf("%s: %s: %w", c.Name, modes[mode], err)
					}
					add("p50 RTT", mode, us(Percentile(lat, 50)))
					add("p99 RTT", mode, us(Percentile(lat, 99)))
				case KindStream:
					bps, err := Stream(p, c.Size, dur, c.CPUs)
					p.Close()
					if err != nil {
						return nil, fmt.Errorf("%s: %s: %w", c.Name, modes[mode], err)
					}
					add("throughput", mode, bps*8/1e9)
				}
				if progress != nil {
					progress("%s run %d/%d %s done", c.Name, r+1, runs, modes[mode])
				}
			}
		}
		for _, m := range metrics {
			res := MultiResult{Case: c.Name, Metric: m}
			switch {
			case m == MetricStalled:
				res.Unit, res.LowerIsBetter = "conns", true
			case c.Kind == KindRR:
				res.Unit, res.LowerIsBetter = "us", true
			case c.Kind == KindConnRate:
				res.Unit = "conn/s"
			default:
				res.Unit = "Gbit/s"
			}
			for i, name := range modes {
				mv := ModeValues{Mode: name, Values: vals[m][i]}
				mv.Median, mv.Spread = MedianSpread(mv.Values)
				res.Modes = append(res.Modes, mv)
			}
			out = append(out, res)
		}
	}
	return out, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// MedianSpread returns the median of v and its spread (max-min)/median in
// percent.
func MedianSpread(v []float64) (median, spreadPct float64) {
	if len(v) == 0 {
		return 0, 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		median = s[n/2]
	} else {
		median = (s[n/2-1] + s[n/2]) / 2
	}
	if median > 0 {
		spreadPct = (s[n-1] - s[0]) / median * 100
	}
	return median, spreadPct
}

// PrintTable writes results as a markdown table.
func PrintTable(w io.Writer, results []Result, runs int) {
	fmt.Fprintf(w, "| case | metric | plain | accelerated | accelerated/plain | spread plain / accel (max-min, %d runs) |\n", runs)
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|")
	for _, r := range results {
		verdict := "faster"
		if (r.LowerIsBetter && r.Ratio > 1) || (!r.LowerIsBetter && r.Ratio < 1) {
			verdict = "slower"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %.2fx (%s) | ±%.0f%% / ±%.0f%% |\n",
			r.Case, r.Metric, fmtVal(r.PlainMedian, r.Unit), fmtVal(r.AccelMedian, r.Unit),
			r.Ratio, verdict, r.PlainSpread/2, r.AccelSpread/2)
	}
}

func fmtVal(v float64, unit string) string {
	return strings.TrimSpace(fmt.Sprintf("%.2f %s", v, unit))
}

// Verdicts of a demo row (Classify).
const (
	// VerdictFaster: accelerated beat plain by more than the runs' spread.
	VerdictFaster = "faster"
	// VerdictSlower: accelerated lost by more than the runs' spread.
	VerdictSlower = "slower"
	// VerdictNoise: the difference is within the runs' spread.
	VerdictNoise = "within noise"
)

// Classify says whether r's accelerated median is better or worse than
// plain's by more than the half-spread PrintTable shows (±), the larger
// of the two modes', or within it.
func Classify(r Result) string {
	if r.PlainMedian == 0 || r.Ratio == 0 {
		return VerdictNoise
	}
	diff := (r.Ratio - 1) * 100
	if r.LowerIsBetter {
		diff = -diff
	}
	noise := max(r.PlainSpread, r.AccelSpread) / 2
	switch {
	case diff > noise:
		return VerdictFaster
	case -diff > noise:
		return VerdictSlower
	}
	return VerdictNoise
}

// Explain returns a one-line explanation for a row whose ratio reads
// "slower" in PrintTable, "" for the others.
func Explain(r Result, runs int) string {
	if (r.LowerIsBetter && r.Ratio <= 1) || (!r.LowerIsBetter && r.Ratio >= 1) {
		return ""
	}
	what := fmt.Sprintf("%s %s: %.2fx reads slower", r.Case, r.Metric, r.Ratio)
	if Classify(r) == VerdictNoise {
		return fmt.Sprintf("%s, but by less than the run-to-run spread (±%.0f%% / ±%.0f%% over %d runs): no measurable difference on this host; more runs (RUNS=7 DURATION=2s) narrow it",
			what, r.PlainSpread/2, r.AccelSpread/2, runs)
	}
	why := "sockbypass's work per message (the sk_msg verdict, the peer's progress read) cost more than the stack it skipped"
	if strings.Contains(r.Case, "1cpu") {
		why = "with both ends on one CPU, " + why
	}
	return fmt.Sprintf("%s, by more than the run-to-run spread (±%.0f%% / ±%.0f%%): in these runs %s; make bench-loopback measures it with more runs",
		what, r.PlainSpread/2, r.AccelSpread/2, why)
}

// Summary returns one line: how many rows were faster, within noise and
// slower, naming the faster ones.
func Summary(results []Result) string {
	var faster []string
	counts := map[string]int{}
	for _, r := range results {
		v := Classify(r)
		counts[v]++
		if v == VerdictFaster {
			faster = append(faster, fmt.Sprintf("%s %s %.2fx", r.Case, r.Metric, r.Ratio))
		}
	}
	s := fmt.Sprintf("accelerated faster beyond the runs' spread in %d of %d rows", counts[VerdictFaster], len(results))
	if len(faster) > 0 {
		s += " (" + strings.Join(faster, ", ") + ")"
	}
	return s + fmt.Sprintf("; %d within noise, %d slower", counts[VerdictNoise], counts[VerdictSlower])
}
