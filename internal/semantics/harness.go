package semantics

import (
	"fmt"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Verdicts of a case on this kernel.
const (
	VerdictPreserved = "preserved"
	VerdictFallback  = "falls back automatically"
	VerdictKnown     = "broken: known limitation"
	VerdictBroken    = "BROKEN"
)

// Result is one case run plain and accelerated.
type Result struct {
	Case        string      `json:"case"`
	Expect      Expectation `json:"expected"`
	How         string      `json:"how"`
	Plain       string      `json:"plain"`
	Accelerated string      `json:"accelerated"`
	// Same reports whether the two runs observed the same thing.
	Same bool `json:"same"`
	// Counters moved by the accelerated run.
	RedirectedBytes uint64 `json:"redirected_bytes"`
	PassedBytes     uint64 `json:"passed_bytes"`
	Fallbacks       uint64 `json:"fallbacks"`
	// Verdict is one of the Verdict constants.
	Verdict string `json:"verdict"`
	// Err is set when a run failed outright.
	Err string `json:"error,omitempty"`
}

// Modes are the two environments a case runs in, and how to read the
// accelerated cgroup's counters.
type Modes struct {
	Plain, Accelerated *Env
	Counters           func() (dataplane.CgroupCounters, error)
}

func fallbackTotal(c dataplane.CgroupCounters) uint64 {
	return c.FallbackRcvlowat + c.FallbackTCPInq + c.FallbackOOBInline + c.FallbackWaitall + c.FallbackOOBRead
}

// RunCase runs c plain, then accelerated, and classifies it.
func RunCase(c Case, m Modes) Result {
	r := Result{Case: c.Name, Expect: c.Expect, How: c.How}
	plain, err := c.Run(m.Plain)
	if err != nil {
		r.Err = fmt.Sprintf("plain run: %v", err)
		r.Verdict = VerdictBroken
		return r
	}
	before, err := m.Counters()
	if err != nil {
		r.Err = err.Error()
		r.Verdict = VerdictBroken
		return r
	}
	accel, err := c.Run(m.Accelerated)
	after, cerr := m.Counters()
	r.Plain, r.Accelerated = plain, accel
	if err != nil {
		r.Err = fmt.Sprintf("accelerated run: %v", err)
	} else if cerr != nil {
		r.Err = cerr.Error()
	}
	if after.RedirectedBytes >= before.RedirectedBytes { // a re-install resets counters
		d := after.Sub(before)
		r.RedirectedBytes, r.PassedBytes, r.Fallbacks = d.RedirectedBytes, d.PassedBytes, fallbackTotal(d)
	}
	r.Same = r.Err == "" && plain == accel
	switch {
	case !r.Same && c.Expect == Limitation:
		r.Verdict = VerdictKnown
	case !r.Same:
		r.Verdict = VerdictBroken
	case r.RedirectedBytes > 0 && c.Expect != Fallback:
		r.Verdict = VerdictPreserved
	default:
		r.Verdict = VerdictFallback
	}
	return r
}

// RunAll runs every case.
func RunAll(m Modes) []Result {
	var out []Result
	for _, c := range Cases() {
		out = append(out, RunCase(c, m))
	}
	return out
}
