package semantics

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
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

// Install creates a private installation at pinDir with accel enabled and
// plain not, and returns the two environments, whose connections are made
// in netns. The accelerated environment's Disrupt disables, uninstalls and
// installs again (an upgrade); its counters carry across. close uninstalls.
func Install(pinDir string, plain, accel cgroup.Cgroup, netns ns.NetNS) (m Modes, close func(), err error) {
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir})
	if err != nil {
		return Modes{}, nil, err
	}
	close = func() {
		if d, err := dataplane.Open(dataplane.Options{PinDir: pinDir}); err == nil {
			d.Uninstall()
		}
		dp.Close()
	}
	if _, err := dp.Enable(accel, dataplane.EnableOptions{}); err != nil {
		close()
		return Modes{}, nil, err
	}
	connectIn := func(cg cgroup.Cgroup) func() (Pair, error) {
		return func() (p Pair, err error) {
			rerr := cg.RunIn(func() {
				err = netns.Do(func(ns.NetNS) error {
					p, err = ConnectLoopback()
					return err
				})
			})
			return p, errors.Join(rerr, err)
		}
	}
	var carried dataplane.CgroupCounters
	disrupt := func() error {
		if c, err := dp.Counters(); err == nil {
			carried.Add(c[accel.ID])
		}
		if _, err := dp.Disable(accel.ID); err != nil {
			return err
		}
		if err := dp.Uninstall(); err != nil {
			return err
		}
		if dp, err = dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir}); err != nil {
			return err
		}
		_, err := dp.Enable(accel, dataplane.EnableOptions{})
		return err
	}
	return Modes{
		Plain:       &Env{Connect: connectIn(plain)},
		Accelerated: &Env{Connect: connectIn(accel), Disrupt: disrupt},
		Counters: func() (dataplane.CgroupCounters, error) {
			c, err := dp.Counters()
			sum := carried
			sum.Add(c[accel.ID])
			return sum, err
		},
	}, close, nil
}
